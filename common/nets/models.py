"""Backbones from torchvision with the changes small images need."""
import contextlib
from typing import Callable, Iterator, Optional

import torch.nn as nn
import torchvision.models as tvm

from common.errors import UserError


def arch_names() -> list:
    return sorted(n for n, f in vars(tvm).items()
                  if n.islower() and not n.startswith("_") and callable(f) and n not in ("get_model", "get_weight", "list_models", "get_model_weights", "get_model_builder"))


def build_backbone(arch: str, num_classes: int = 1000, small_images: bool = False,
                   norm_layer: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
    """A torchvision classification model whose `fc` is the head.

    small_images swaps the ImageNet stem (7x7/2 conv + max-pool, which throws away most
    of a 32 px image) for a CIFAR stem: 3x3 conv, stride 1, no max-pool.
    """
    if arch not in arch_names():
        raise UserError(f"unknown architecture {arch!r}; pick a torchvision model such as "
                        f"resnet18, resnet50 or resnext50_32x4d")
    kwargs = {"num_classes": num_classes}
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    try:
        model = tvm.__dict__[arch](**kwargs)
    except TypeError as e:
        raise UserError(f"architecture {arch!r} cannot be built with these options ({e}); "
                        f"use a ResNet-family model")
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise UserError(f"architecture {arch!r} has no `fc` head; use a ResNet-family model "
                        f"(resnet18/34/50/101/152, resnext, wide_resnet, regnet)")
    if small_images:
        if not isinstance(getattr(model, "conv1", None), nn.Conv2d):
            raise UserError(f"--small-images needs a ResNet-style `conv1` stem, which {arch!r} lacks; "
                            f"pass --no-small-images")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


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
