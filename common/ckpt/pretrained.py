"""Weights for evaluation and --init: the one place that knows which keys hold the backbone
in every supported checkpoint layout (ours, facebookresearch/moco and moco-v3, classifiers,
torchvision), and `--pretrained PATH|imagenet|none`."""
import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torchvision.models as tvm

from common.ckpt.io import METHODS, load_checkpoint
from common.ckpt.resume import check_arch
from common.data.channels import adapt_rgb_filters, first_conv_note
from common.data.datasets import SMALL_CROP_MAX, default_crop_size, resolve_channels
from common.errors import UserError, reason
from common.log.progress import log
from common.ckpt.vit_keys import is_timm_vit, timm_to_torchvision
from common.nets.backbones import HEAD_ATTRS, adopt_position_embedding, first_conv

# prefixes under which pretraining checkpoints keep the backbone, most specific first
# (MoCo v3, ours and facebookresearch/moco-v3: `base_encoder`; MoCo v1/v2: `encoder_q`; DINO: the
# teacher's, ours `module.teacher.backbone`, facebookresearch/dino's `backbone`, `module.backbone` under DDP)
BACKBONE_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.encoder_q.", "encoder_q.", "module.encoder.",
                     "encoder.", "module.teacher.backbone.", "teacher.backbone.", "module.backbone.", "backbone.")
# moco-v3's own names of the architectures torchvision also builds
REFERENCE_ARCHS = {"vit_base": "vit_b_16", "vit_large": "vit_l_16", "vit_huge": "vit_h_14"}


def checkpoint_arch(ckpt: Dict[str, Any]) -> Optional[str]:
    """The checkpoint's architecture under our name (moco-v3's `vit_base` is vit_b_16)."""
    arch = ckpt.get("arch")
    return REFERENCE_ARCHS.get(arch, arch)


def extract_backbone(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """Backbone weights (head `fc.*` dropped, prefix stripped) from any supported layout:
    MoCo (ours and facebookresearch/moco: `module.encoder_q.*`), MoCo v3 (ours and
    facebookresearch/moco-v3: `module.base_encoder.*`, the projector under `fc` for a ResNet
    and for our ViTs, under `head` for theirs, whose timm keys are renamed to torchvision's),
    SimCLR (`module.encoder.*`), DINO (ours: the teacher's `module.teacher.backbone.*`;
    facebookresearch/dino's `teacher` dict, `backbone.*`, its ViTs under timm's names), a classifier from main_lincls.py or torchvision (`module.*`
    or bare keys). Returns (weights, layout name)."""
    # torchvision's own ViT: its `encoder.*` is not SimCLR's
    for prefix in (BACKBONE_PREFIXES if "class_token" not in state_dict else ()):
        if any(k.startswith(prefix) for k in state_dict):
            layout = prefix.rstrip(".")
            break
    else:
        keys = list(state_dict)
        if any(k.startswith("module.") for k in keys):
            prefix, layout = "module.", "classifier"
        elif ("conv1.weight" in state_dict or "class_token" in state_dict or "cls_token" in state_dict
              or any(k.startswith(("layer1.", "body.", "features.", "stem.")) for k in keys)):
            # `body.*`: a non-ResNet family as common.nets.backbones.Backbone wraps it; `features.*`,
            # `stem.*`, `class_token`: torchvision's own ConvNeXt/EfficientNet/..., RegNet, ViT
            prefix, layout = "", "classifier"
        else:
            raise UserError(f"unknown checkpoint layout (first keys: {keys[:4]}); expected keys starting with "
                            f"{', '.join(BACKBONE_PREFIXES)} or a plain ResNet (or `body.*`) state_dict")
    heads = ("fc.", "head.") if "base_encoder" in prefix or "backbone" in prefix else ("fc.",)
    out = {k[len(prefix):]: v for k, v in state_dict.items()
           if k.startswith(prefix) and not k[len(prefix):].startswith(heads)}
    if is_timm_vit(out):  # moco-v3's ViT: under our wrapped ViT's names (common.nets.backbones.Backbone)
        out, layout = {"body." + k: v for k, v in timm_to_torchvision(out).items()}, layout + " (timm ViT)"
    return out, layout


def fit_first_layer(model: nn.Module, weights: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """RGB weights for a network built for another --in-channels: the first layer's filters
    summed (1 channel) or repeated and scaled (more), said in the log; weights trained on
    another count than 3 are left for load_backbone to refuse."""
    name, conv = first_conv(model)
    key = name + ".weight"
    saved = weights.get(key)
    if saved is None or saved.ndim != 4 or saved.shape[1] != 3 or conv.in_channels == 3:
        return weights
    log(f"=> {path}: its first layer reads RGB; for {conv.in_channels} channel(s), "
        f"{first_conv_note(conv.in_channels)}")
    return {**weights, key: adapt_rgb_filters(saved, conv.in_channels)}


def load_backbone(model: nn.Module, ckpt: Dict[str, Any], path: str = "checkpoint") -> str:
    """Load a checkpoint's backbone into `model` (a torchvision model; its `fc` is left
    alone). Any other missing or mismatched key is a plain error naming the likely cause."""
    if ckpt.get("arch") is None:
        pass  # foreign checkpoints (torchvision, reference repo) may not say; shapes decide
    weights, layout = extract_backbone(ckpt["state_dict"])
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    if any(k.startswith("body.") for k in own) and not any(k.startswith("body.") for k in weights):
        # torchvision's layout of a wrapped family (e.g. --pretrained imagenet): ours is under `body.`,
        # without the classifier's last Linear
        weights = {"body." + k: v for k, v in weights.items() if "body." + k in own or not k.startswith(HEAD_ATTRS)}
    adopt_position_embedding(model, weights)  # a ViT trained at another crop than it was built for
    weights = fit_first_layer(model, weights, path)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        saved = ckpt.get("arch", "an unknown architecture")
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[:3]}")
        raise UserError(f"checkpoint {path!r} ({saved}) does not fit this backbone ({detail}); pass the -a/--arch "
                        f"and --small-images/--no-small-images it was pretrained with")
    model.load_state_dict(weights, strict=False)
    return layout


def check_finite(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Refuse weights with NaN or inf: a diverged run's checkpoint gives features that are
    NaN everywhere, so a probe would report chance accuracy with val_loss nan and kNN
    garbage, instead of naming the problem."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        first = state_dict[bad[0]]
        n_bad = int((~torch.isfinite(first)).sum())
        raise UserError(f"{path!r} holds non-finite (NaN/inf) weights in {len(bad)} of {len(state_dict)} tensors, "
                        f"e.g. {bad[0]!r} ({n_bad} of its {first.numel()} values); the run that wrote it diverged: "
                        f"pass an earlier checkpoint of it (or retrain with a lower --lr)")


def torchvision_weights_path(arch: str) -> str:
    """Where torchvision caches `arch`'s default ImageNet weights (nothing is downloaded)."""
    try:
        weights = tvm.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"torchvision has no ImageNet weights for {arch!r}; pass a checkpoint file instead")
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def follow_checkpoint(args: argparse.Namespace, default_arch: str = "resnet50") -> None:
    """-a/--arch, --crop-size and --small-images from the `--pretrained` checkpoint where the
    command line left them unset (None), so `--pretrained ckpt` alone rebuilds the network
    the run trained and shows it images at the size it learned on (--recipe small may have
    chosen it); a given -a must match the checkpoint's. 'none'/'imagenet' (and checkpoints
    without args) fall back to `default_arch`, the dataset's default crop and the CIFAR stem
    for crops <= SMALL_CROP_MAX px."""
    saved_arch, saved_args, eval_size = None, {}, None
    if args.pretrained not in (None, "none", "imagenet"):
        ckpt = load_checkpoint(args.pretrained)
        ckpt["arch"] = saved_arch = checkpoint_arch(ckpt)
        saved_args, eval_size = ckpt.get("args") or {}, ckpt.get("eval_size")
        if args.arch:
            check_arch(ckpt, args.arch, args.pretrained)
        del ckpt
    args.arch = args.arch or saved_arch or default_arch
    if not args.crop_size and eval_size and eval_size != saved_args.get("crop_size"):
        log(f"=> evaluating at {eval_size} px, not the run's {saved_args.get('crop_size')} px crop: its views were cut "
            f"at the source's own scale and its payoff probe scored whole images best at this size (--crop-size "
            f"{saved_args.get('crop_size')} evaluates at the crop)")
    args.crop_size = args.crop_size or eval_size or saved_args.get("crop_size") or default_crop_size(args)
    if args.small_images is None:
        saved = saved_args.get("small_images")
        args.small_images = bool(saved) if saved is not None else args.crop_size <= SMALL_CROP_MAX
    # --in-channels and its statistics: the checkpoint's, else measured on the train images
    resolve_channels(args, "train", saved_args)


def load_pretrained(pretrained: str, arch: str) -> Optional[Dict[str, Any]]:
    """The checkpoint behind `--pretrained`: None for 'none' (random init); for 'imagenet'
    torchvision's weights if already cached (never a silent download); else a file from
    main_moco.py, main_simclr.py, main_lincls.py or facebookresearch/moco. Checks the
    architecture, that the file holds a backbone (extract_backbone knows the layouts) and
    that its weights are finite."""
    if pretrained == "none":
        return None
    if pretrained == "imagenet":
        path = torchvision_weights_path(arch)
        if not os.path.isfile(path):
            raise UserError(f"torchvision's ImageNet weights for {arch} are not cached at {path!r} and nothing is "
                            f"downloaded here; fetch them once (python -c \"import torchvision; "
                            f"torchvision.models.get_model('{arch}', weights='DEFAULT')\") or pass a checkpoint")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read the cached torchvision weights {path!r} ({reason(e)}); "
                            f"delete the file and fetch it again")
        check_finite(extract_backbone(state_dict)[0], path)
        return {"state_dict": state_dict, "arch": arch, "method": "torchvision"}
    return checked_checkpoint(load_checkpoint(pretrained), arch, pretrained)


def checked_checkpoint(ckpt: Dict[str, Any], arch: str, path: str) -> Dict[str, Any]:
    """A loaded checkpoint, refused in one sentence unless a pretraining run (ours, or a
    reference one, which says no method) or main_lincls.py wrote it, it holds weights of
    `arch` in a layout extract_backbone knows, and they are finite."""
    method = ckpt.get("method")
    if method is not None and method not in METHODS:
        raise UserError(f"{path!r} was written by an unknown method {method!r}, not by a pretraining run; "
                        f"pass a checkpoint from main_moco.py or main_simclr.py")
    if not isinstance(ckpt["state_dict"], dict) or not ckpt["state_dict"]:
        raise UserError(f"{path!r} holds no model weights; pass a checkpoint from main_moco.py or main_simclr.py")
    ckpt["arch"] = checkpoint_arch(ckpt)
    check_arch(ckpt, arch, path)
    # unknown layout or non-finite weights -> plain error now, before any data is read
    check_finite(extract_backbone(ckpt["state_dict"])[0], path)
    return ckpt
