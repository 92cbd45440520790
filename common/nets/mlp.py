"""The projector / predictor MLP of moco-v3, which BYOL, SimSiam and the distillation head
share: Linear (no bias) + BN + ReLU between layers."""
import torch.nn as nn


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """moco-v3's MLP: Linear (no bias) + BN + ReLU between layers; the last Linear is
    followed by a BN without affine parameters (projector) or by nothing (predictor)."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)
