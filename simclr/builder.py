"""SimCLR (Chen et al., 2020; v2: Chen et al., 2020b): one encoder, a projection head,
and NT-Xent between the two views of each image with every other image of the global
batch as a negative.

The projection head replaces the torchvision model's `fc`, so the checkpoint keys are
`module.encoder.*` with the head under `module.encoder.fc.*`: dropping `fc` gives a plain
torchvision backbone (common.ckpt.pretrained.extract_backbone)."""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from common.nets.models import feature_dim
from simclr.loss import nt_xent


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, bn: bool = True) -> nn.Sequential:
    """`layers` linear layers (2: SimCLR v1, 3: SimCLR v2) with ReLU between them.

    With `bn` every linear layer is followed by BatchNorm and has no bias (BN's shift does
    its job), as in the SimCLR code; the last BN has no learnable shift either (its bias is
    frozen at 0; the SimCLR code builds it with center=False).
    """
    if layers not in (2, 3):
        raise ValueError(f"projection head layers must be 2 or 3, got {layers}")
    mods = []
    d = in_dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(d, hidden_dim, bias=not bn))
        if bn:
            mods.append(nn.BatchNorm1d(hidden_dim))
        mods.append(nn.ReLU(inplace=True))
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=not bn))
    if bn:
        last = nn.BatchNorm1d(out_dim)
        last.bias.requires_grad_(False)
        mods.append(last)
    return nn.Sequential(*mods)


class SimCLR(nn.Module):
    def __init__(self, base_encoder: Callable[..., nn.Module], proj_dim: int = 128,
                 proj_hidden_dim: Optional[int] = None, proj_layers: int = 2, proj_bn: bool = True,
                 temperature: float = 0.1):
        """base_encoder() builds a torchvision-style model whose `fc` is replaced by the
        projection head; proj_hidden_dim defaults to the backbone's feature width (2048
        for a ResNet-50, as in SimCLR)."""
        super().__init__()
        self.temperature = temperature
        self.encoder = base_encoder()
        dim = feature_dim(self.encoder)
        self.encoder.fc = projection_head(dim, proj_hidden_dim or dim, proj_dim, proj_layers, proj_bn)

    def networks(self) -> Tuple[nn.Module]:
        """The networks (what --compile compiles); the loss and gathers stay outside."""
        return (self.encoder,)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns the NT-Xent loss and {"acc1": % of anchors whose positive scores highest}."""
        n = x1.shape[0]
        # both views in one pass: BatchNorm sees all 2n images of this process (SimCLR's
        # BN is over the whole batch; with SyncBatchNorm over every process)
        z = self.encoder(torch.cat([x1, x2]))
        loss, acc1 = nt_xent(z[:n], z[n:], self.temperature)
        return loss, {"acc1": acc1}
