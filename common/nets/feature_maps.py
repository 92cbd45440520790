"""The last spatial feature map of a backbone of any family (what main_inpaint.py decodes):
the layers common/nets/backbones.py's networks run before their global pooling, N x C x
H/stride x W/stride, channels first whatever the family keeps internally."""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.nets.backbones import Backbone, family, first_conv

# families whose `body.features` ends right before the pooling, channels first
FEATURES_FAMILIES = ("ConvNeXt", "EfficientNet", "MobileNetV2", "MobileNetV3", "VGG", "AlexNet")
# MaxViT is left out: its 7x7 attention windows at stride 32 fit only sides that are multiples of 224
MAP_FAMILIES = ("ResNet", "RegNet", "DenseNet", "SwinTransformer", "VisionTransformer", "MNASNet") + FEATURES_FAMILIES
PROBE_SIDE = 64  # the probe image: divisible by every stride up to 64, cheap for the largest members


def check_has_feature_map(model: nn.Module, user: str) -> str:
    """The family name, or a UserError when `user` needs a feature map this family lacks here."""
    fam = family(model)
    if fam not in MAP_FAMILIES:
        raise UserError(f"{user} decodes the backbone's last feature map, which the {fam} family has no "
                        f"single one of here; pick a model of another family ({', '.join(MAP_FAMILIES)})")
    return fam


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model's last feature map for images x (N x in_channels x H x W), N x C x h x w."""
    net = model.body if isinstance(model, Backbone) else model
    fam = family(model)
    if fam == "ResNet":
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))
    if fam == "RegNet":
        return net.trunk_output(net.stem(x))
    if fam == "VisionTransformer":  # the patch tokens, back on their grid
        gh, gw = x.shape[-2] // net.patch_size, x.shape[-1] // net.patch_size
        tokens = net.tokens(x)[:, 1:]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
    if fam == "SwinTransformer":  # NHWC inside; the norm its pooling sees
        return net.norm(net.features(x)).permute(0, 3, 1, 2)
    if fam == "DenseNet":  # its forward's ReLU after the last BatchNorm
        return F.relu(net.features(x))
    if fam == "MNASNet":
        return net.layers(x)
    return net.features(x)


@torch.no_grad()
def map_shape(model: nn.Module) -> Tuple[int, int]:
    """(channels, stride) of the feature map, from one probe image in eval mode (no BatchNorm
    statistic moves)."""
    was_training = model.training
    model.eval()
    try:
        # as many channels as the first layer reads (--in-channels)
        fmap = feature_map(model, torch.zeros(1, first_conv(model)[1].in_channels, PROBE_SIDE, PROBE_SIDE,
                                              device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    net = model.body if isinstance(model, Backbone) else model
    stride = net.patch_size if family(model) == "VisionTransformer" else PROBE_SIDE // fmap.shape[-1]
    return fmap.shape[1], stride
