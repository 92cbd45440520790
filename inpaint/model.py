"""Context encoder (Pathak et al., 2016) on a torchvision backbone of any family with a
spatial feature map: the encoder (the backbone up to its last feature map, no pooling, no
fc: common/nets/feature_maps.py) maps the masked image to a feature map, a decoder of 2x
transposed convolutions paints the whole image back, and the loss compares it with the
original, weighting the blanked-out patches by `masked_weight`.

The encoder is the backbone as common.nets.models.build_backbone makes it (torchvision's
layer names; `body.*` for a wrapped family) under `encoder.`, so a checkpoint's
`module.encoder.*` loads into main_lincls.py / main_knn.py with no conversion."""
import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.augment.transforms import IMAGENET_MEAN, IMAGENET_STD
from common.nets.feature_maps import check_has_feature_map, feature_map, map_shape

LOSSES = ("bce", "mse", "l1")


def decoder(in_channels: int, num_layers: int) -> nn.Sequential:
    """`num_layers` transposed convolutions, each doubling the side and halving the width
    (BN + ReLU between them); the last gives 3 channels of logits."""
    layers, c = [], in_channels
    for i in range(num_layers):
        last = i == num_layers - 1
        out = 3 if last else max(c // 2, 32)
        layers.append(nn.ConvTranspose2d(c, out, kernel_size=4, stride=2, padding=1, bias=last))
        if not last:
            layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    return nn.Sequential(*layers)


class ContextEncoder(nn.Module):
    def __init__(self, base_encoder: Callable[[], nn.Module], loss: str = "bce", masked_weight: float = 1.0):
        """base_encoder() builds a backbone (common.nets.models.build_backbone; its fc is
        dropped); the decoder reads its last feature map, whatever its width, and has as
        many 2x layers as the encoder halves the side (log2 of the stride: 5 for a ResNet
        with the ImageNet stem, 3 with the CIFAR stem, 2 for a ViT with 4 px patches)."""
        super().__init__()
        self.encoder = base_encoder()
        check_has_feature_map(self.encoder, "main_inpaint.py")
        self.encoder.fc = nn.Identity()
        width, self.stride = map_shape(self.encoder)
        self.decoder = decoder(width, max(1, round(math.log2(self.stride))))
        self.loss, self.masked_weight = loss, masked_weight
        # the encoder sees ImageNet-normalised images, as main_lincls.py / main_knn.py feed it
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def networks(self) -> Tuple[nn.Module]:
        """What --compile compiles: the whole model, since `features` calls the encoder's
        blocks one by one (a compiled encoder.forward would never run)."""
        return (self,)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's feature map, N x C x H/stride x W/stride."""
        return feature_map(self.encoder, x)

    def reconstruct(self, masked: torch.Tensor) -> torch.Tensor:
        """Logits of the painted-back image, the input's size (an input side that is not a
        multiple of the stride is resized back)."""
        logits = self.decoder(self.features((masked - self.mean) / self.std))
        if logits.shape[-2:] != masked.shape[-2:]:
            logits = F.interpolate(logits, size=masked.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def forward(self, masked: torch.Tensor, image: torch.Tensor, mask: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """masked, image: N x 3 x H x W in [0, 1]; mask: N x 1 x H x W, True where blanked.
        Returns the loss (mean over pixels, blanked ones weighted `masked_weight`) and
        {"masked_mse": the squared error inside the patches, what inpainting is about}."""
        logits = self.reconstruct(masked).float()
        image = image.float()
        if self.loss == "bce":
            per_pixel = F.binary_cross_entropy_with_logits(logits, image, reduction="none")
        elif self.loss == "mse":
            per_pixel = F.mse_loss(torch.sigmoid(logits), image, reduction="none")
        else:
            per_pixel = F.l1_loss(torch.sigmoid(logits), image, reduction="none")
        m = mask.to(per_pixel.dtype)
        weight = 1.0 + (self.masked_weight - 1.0) * m  # N x 1 x H x W, broadcast over colours
        loss = (per_pixel * weight).sum() / (weight.sum() * per_pixel.shape[1])
        with torch.no_grad():
            sq = (torch.sigmoid(logits) - image).square()
            masked_mse = (sq * m).sum() / (m.sum() * 3).clamp(min=1)
        return loss, {"masked_mse": masked_mse}
