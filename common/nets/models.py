"""Backbones from torchvision with the changes small images need."""
import contextlib
from typing import Callable, Iterator, Optional

import torch.nn as nn

from common.errors import UserError
from common.nets.backbones import TINY_CONVNEXT, TINY_VIT, arch_names, build_any, has_batchnorm  # noqa: F401 (re-exported)


def build_backbone(arch: str, num_classes: int = 1000, small_images: bool = False,
                   norm_layer: Optional[Callable[[int], nn.Module]] = None,
                   crop_size: Optional[int] = None, in_channels: int = 3) -> nn.Module:
    """A torchvision classification model whose `fc` is the head.

    Models with an `fc` Linear (ResNet, ResNeXt, Wide ResNet, RegNet, ...) come as torchvision
    builds them; other families (ConvNeXt, EfficientNet, MobileNet, DenseNet, Swin, ViT,
    MaxViT, VGG) as common.nets.backbones.Backbone: `body` (the model without its last
    Linear) + `fc`. For tests and CPUs: `vit_tiny` is a 2-layer, width-64 ViT with 4 px
    patches, `convnext_micro` a ConvNeXt of widths 32 .. 256.

    small_images swaps the ImageNet stem for one that keeps a 32 px image's resolution
    (ResNet: 3x3 conv, stride 1, no max-pool; others: common.nets.backbones._small_stem).
    norm_layer (e.g. SplitBatchNorm) replaces BatchNorm2d; LayerNorm networks have none.
    crop_size: the side a ViT's position embedding is built for (default 224, 32 with
    small_images or vit_tiny); other sides are interpolated. in_channels: what the first
    layer reads (--in-channels; common/data/channels.py).
    """
    if arch not in arch_names():
        raise UserError(f"unknown architecture {arch!r}; pick a torchvision model such as "
                        f"resnet18, resnet50, resnext50_32x4d, convnext_tiny, efficientnet_b0, vit_b_16 "
                        f"(or {', '.join(list(TINY_VIT) + list(TINY_CONVNEXT))}, a tiny ViT and ConvNeXt for tests)")
    return build_any(arch, num_classes, small_images, norm_layer, crop_size, int(in_channels))


def feature_dim(model: nn.Module) -> int:
    """Width of the representation that enters the head."""
    fc = model.fc
    first = fc if isinstance(fc, nn.Linear) else next(m for m in fc.modules() if isinstance(m, nn.Linear))
    return first.in_features


@contextlib.contextmanager
def without_head(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace `model.fc` by Identity, so model(x) gives backbone features."""
    head = model.fc
    model.fc = nn.Identity()
    try:
        yield model
    finally:
        model.fc = head
