"""Every torchvision classification family as a backbone whose `fc` is the head.

Models that already have an `fc` Linear (ResNet, ResNeXt, Wide ResNet, RegNet, GoogLeNet,
ShuffleNet) are used as they are: their state_dict keys stay those of torchvision and of
facebookresearch/moco checkpoints. Every other family (ConvNeXt, EfficientNet, MobileNet,
MNASNet, DenseNet, Swin, ViT, MaxViT, VGG, AlexNet) is wrapped in `Backbone`: `body` is
the torchvision model with its last Linear (and the Dropout in front of it) removed, so it
returns the pooled feature vector, and `fc` is a fresh Linear on it."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.vision_transformer import VisionTransformer

from common.errors import UserError

# a ViT small enough for CPU tests: patch 4 (32 px -> 8x8 tokens), 2 layers, 2 heads, width 64
TINY_VIT = {"vit_tiny": dict(patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)}
# ViT shapes torchvision lacks, as DINO, DeiT and timm name them: ViT-S/16, whose DINO weights are
# the most used (patch 4 with --small-images, as torchvision's ViTs)
MORE_VIT = {"vit_small": dict(patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)}
# a ConvNeXt as narrow: stages of width 32 .. 256 with 1, 1, 2, 1 blocks (torchvision's smallest is 28M parameters)
TINY_CONVNEXT = {"convnext_micro": [(32, 64, 1), (64, 128, 1), (128, 256, 2), (256, None, 1)]}
HEAD_ATTRS = ("classifier", "head", "heads")


class Backbone(nn.Module):
    """`fc(body(x))`; body gives the N x width feature vector."""

    def __init__(self, body: nn.Module, width: int, num_classes: int, family: str):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(width, num_classes)
        self.family = family

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class AnySizeViT(VisionTransformer):
    """torchvision's ViT that takes any image side divisible by the patch: the position
    embedding is interpolated (bicubic, as DINO/timm do) when the side differs from the
    one it was built for."""

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output, N x (1 + h/p * w/p) x width: the class token, then the patch
        tokens row by row (main_inpaint.py decodes those as a feature map)."""
        n, _, h, w = x.shape
        p = self.patch_size
        x = self.conv_proj(x)
        gh, gw = x.shape[-2], x.shape[-1]
        x = x.reshape(n, self.hidden_dim, gh * gw).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        pos = self.encoder.pos_embedding
        if (h, w) != (self.image_size, self.image_size):
            side = self.image_size // p
            grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
        enc = self.encoder
        return enc.ln(enc.layers(enc.dropout(x + pos)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.tokens(x)[:, 0])


def adopt_position_embedding(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Before `model` loads `state`: each AnySizeViT in it whose saved position embedding is
    for another grid than it was built for takes the saved grid (its image_size follows), so
    the weights load exactly as trained; forward still interpolates for other inputs. Why:
    main_moco_v3.py builds its ViT for --crop-size, and a probe or export rebuilding it
    without that crop found a 224 px embedding where the checkpoint had, say, a 64 px one."""
    for name, module in model.named_modules():
        if not isinstance(module, AnySizeViT):
            continue
        saved = state.get((name + "." if name else "") + "encoder.pos_embedding")
        own = module.encoder.pos_embedding
        if saved is None or saved.shape == own.shape or saved.ndim != 3 or saved.shape[2] != own.shape[2]:
            continue  # nothing to adopt, or a shape load_state_dict will name
        grid = int(round((saved.shape[1] - 1) ** 0.5))  # class token + grid x grid patches
        if grid * grid + 1 != saved.shape[1]:
            continue
        module.encoder.pos_embedding = nn.Parameter(torch.zeros_like(saved, device=own.device, dtype=own.dtype))
        module.image_size, module.seq_length = grid * module.patch_size, saved.shape[1]


class MNASNet(tvm.MNASNet):
    """torchvision's MNASNet, which refuses a state_dict without the layout version that only
    state_dict() itself records (a checkpoint's extracted backbone is a plain dict): such a
    dict is read as the current layout, the one every build here saves."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        local_metadata = {**local_metadata, "version": local_metadata.get("version", 2)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def arch_names() -> list:
    return sorted([n for n, f in vars(tvm).items()
                   if n.islower() and not n.startswith("_") and callable(f)
                   and n not in ("get_model", "get_weight", "list_models", "get_model_weights", "get_model_builder")]
                  + list(TINY_VIT) + list(MORE_VIT) + list(TINY_CONVNEXT))


def family(model: nn.Module) -> str:
    """The torchvision class of the network (e.g. ResNet, ConvNeXt, VisionTransformer)."""
    net = model.body if isinstance(model, Backbone) else model
    return "VisionTransformer" if isinstance(net, VisionTransformer) else type(net).__name__


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def replace_batchnorm(model: nn.Module, norm_layer: Callable[[int], nn.Module]) -> None:
    """Every BatchNorm2d becomes norm_layer(C) with the same eps, momentum and tensors."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            new = norm_layer(child.num_features)
            new.eps, new.momentum = child.eps, child.momentum
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            replace_batchnorm(child, norm_layer)


def _build_vit(arch: str, num_classes: int, small_images: bool, crop_size: Optional[int]) -> VisionTransformer:
    if arch in TINY_VIT:
        cfg = TINY_VIT[arch]
    elif arch in MORE_VIT:
        cfg = dict(MORE_VIT[arch], patch_size=4 if small_images else MORE_VIT[arch]["patch_size"])
    else:
        ref = tvm.__dict__[arch]()
        cfg = dict(patch_size=4 if small_images else ref.patch_size, num_layers=len(ref.encoder.layers),
                   num_heads=ref.encoder.layers[0].num_heads, hidden_dim=ref.hidden_dim, mlp_dim=ref.mlp_dim)
        del ref
    if crop_size is None:  # the side the position embedding is built for; others are interpolated
        crop_size = 32 if small_images or arch in TINY_VIT else 224
    side = crop_size - crop_size % cfg["patch_size"]
    return AnySizeViT(image_size=side, num_classes=num_classes, **cfg)


def _strip_head(model: nn.Module, arch: str) -> int:
    """Remove the last Linear of the classifier (and a Dropout right before it) in place;
    returns its in_features."""
    for attr in HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
            width = head[-1].in_features
            keep = list(head.children())[:-1]
            if keep and isinstance(keep[-1], nn.Dropout):
                keep = keep[:-1]
            setattr(model, attr, nn.Sequential(*keep) if keep else nn.Identity())
            return width
    raise UserError(f"architecture {arch!r} ({type(model).__name__}) has no linear classifier to replace; pick "
                    f"a ResNet, RegNet, ConvNeXt, EfficientNet, MobileNet, DenseNet, Swin or ViT model")


def _small_stem(model: nn.Module, arch: str) -> None:
    """--small-images: keep more of a 32 px image in the first layers."""
    fam = family(model)
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):  # ResNet
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif fam == "RegNet":
        model.stem[0].stride = (1, 1)
    elif fam == "DenseNet":
        c = model.features.conv0.out_channels
        model.features.conv0 = nn.Conv2d(3, c, kernel_size=3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    elif fam in ("EfficientNet", "MobileNetV2", "MobileNetV3", "MNASNet"):
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    elif fam in ("ConvNeXt", "SwinTransformer"):  # patchify 4x4/4 -> 2x2/2, same channels
        conv = model.features[0][0]
        model.features[0][0] = nn.Conv2d(3, conv.out_channels, kernel_size=2, stride=2)
    elif fam != "VisionTransformer":  # ViT: patch 4, built so
        raise UserError(f"--small-images has no small-image stem for the {fam} family ({arch!r}); "
                        f"pass --no-small-images")


def first_conv(model: nn.Module) -> Tuple[str, nn.Conv2d]:
    """(name, module) of the layer that reads the image: the first Conv2d of every family
    (ResNet conv1, ConvNeXt/Swin's patchify, ViT's conv_proj, EfficientNet's stem, ...)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise UserError(f"{type(model).__name__} has no convolution reading the image, so --in-channels cannot "
                    f"change its input; pick a convolutional network or a ViT")


def set_in_channels(model: nn.Module, in_channels: int) -> None:
    """The first layer rebuilt for `in_channels` inputs, drawn afresh with the family's RGB
    init scaled by sqrt(3 / in_channels), so its outputs keep their variance on inputs of
    the same per-channel variance (pretrained RGB filters are fitted instead by
    common/ckpt/init_weights.py)."""
    name, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups if conv.groups == 1 else in_channels, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.normal_(0.0, float(conv.weight.std()) * (3.0 / in_channels) ** 0.5)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def build_any(arch: str, num_classes: int, small_images: bool,
              norm_layer: Optional[Callable[[int], nn.Module]], crop_size: Optional[int],
              in_channels: int = 3) -> nn.Module:
    if arch in TINY_VIT or arch.startswith("vit_"):
        model = _build_vit(arch, num_classes, small_images, crop_size)
    elif arch in TINY_CONVNEXT:
        model = tvm.ConvNeXt([CNBlockConfig(*stage) for stage in TINY_CONVNEXT[arch]], num_classes=num_classes)
    else:
        kwargs = {"num_classes": num_classes}
        resnet_style = norm_layer is not None and "norm_layer" in _init_params(arch)
        if resnet_style:
            kwargs["norm_layer"] = norm_layer
        try:
            model = tvm.__dict__[arch](**kwargs)
        except TypeError as e:
            raise UserError(f"architecture {arch!r} cannot be built with these options ({e}); "
                            f"pick a torchvision classification model such as resnet50 or convnext_tiny")
        if isinstance(model, tvm.MNASNet):
            model.__class__ = MNASNet  # the same network, loading plain dicts
        if norm_layer is not None and not resnet_style:
            replace_batchnorm(model, norm_layer)
    if small_images:
        _small_stem(model, arch)
    if in_channels != 3:
        set_in_channels(model, in_channels)
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model
    fam = family(model)
    width = _strip_head(model, arch)
    return Backbone(model, width, num_classes, fam)


def _init_params(arch: str) -> List[str]:
    """Keyword names the ResNet/RegNet constructors take (others get BatchNorm replaced)."""
    probe = {"resnet": tvm.ResNet, "resnext": tvm.ResNet, "wide_resnet": tvm.ResNet, "regnet": tvm.RegNet}
    for prefix, cls in probe.items():
        if arch.startswith(prefix):
            return list(cls.__init__.__code__.co_varnames)
    return []


def block_names(model: nn.Module) -> List[str]:
    """The names --trainable-layers takes for this network: its top-level blocks (for a
    wrapped family, relative to `body`), stages of `features`/`trunk_output`/`encoder.layers`
    one by one; the head `fc` is always trainable and not listed."""
    net = model.body if isinstance(model, Backbone) else model
    out: List[str] = [n for n, _ in net.named_parameters(recurse=False)]

    def walk(module: nn.Module, prefix: str) -> None:
        out.extend(prefix + n for n, _ in module.named_parameters(recurse=False) if prefix)
        for name, child in module.named_children():
            if name == "fc" and module is net:
                continue
            if not any(True for _ in child.parameters()):
                continue
            if name in ("features", "trunk_output", "blocks", "encoder", "layers") and len(list(child.children())) > 1:
                walk(child, prefix + name + ".")
            else:
                out.append(prefix + name)

    walk(net, "")
    return out


def block_modules(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """The modules of these block_names (a parameter block such as ViT's class_token has none)."""
    net = model.body if isinstance(model, Backbone) else model
    modules = dict(net.named_modules())
    return [modules[n] for n in names if n in modules]
