"""DINO's projection head (facebookresearch/dino's DINOHead): an MLP (Linear, [BN], GELU,
... to a `bottleneck_dim` output), l2-normalised, then a weight-normalised Linear without
bias to `out_dim` prototypes whose norms g are fixed at 1 with `norm_last_layer` (DINO's
stability trick for ViTs). Its keys are DINO's: `mlp.*`, `last_layer.weight_g`,
`last_layer.weight_v` (torch.nn.utils.weight_norm's names, not the parametrization's)."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def weight_norm(module: nn.Module) -> nn.Module:
    """torch.nn.utils.weight_norm (deprecated for torch.nn.utils.parametrizations.weight_norm,
    whose keys are not DINO's `weight_g`/`weight_v`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, hidden_dim if i < nlayers - 2 else bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # N x bottleneck_dim
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # N x out_dim
