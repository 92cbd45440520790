"""MoCo v3 (Chen, Xie and He, 2021): a base encoder with a projector and a predictor, a
momentum encoder with a projector, and a symmetric InfoNCE whose negatives are the other
keys of the global batch (no queue).

Names follow facebookresearch/moco-v3 (`base_encoder`, `momentum_encoder`, `predictor`;
the projector replaces the backbone's head, here always `fc`), so a checkpoint's keys are
`module.base_encoder.*`, `module.momentum_encoder.*`, `module.predictor.*` as theirs are."""
import math
from functools import reduce
from operator import mul
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed.collectives import concat_all_gather, get_rank
from common.nets.backbones import family
from common.nets.ema import momentum_update
from common.nets.mlp import build_mlp
from common.nets.models import feature_dim


def contrastive_loss(q: torch.Tensor, k_all: torch.Tensor, rank: int, T: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of this rank's queries against every rank's keys, scaled by 2T as moco-v3 does.

    q: (n, d) this rank's queries; k_all: (N, d) the keys of all ranks in rank order (N = n x
    world); both normalised here. Query i's positive is key rank*n + i, the other N-1 keys are
    its negatives. Returns (loss, acc1: % of queries whose positive scores highest)."""
    q, k_all = F.normalize(q.float(), dim=1), F.normalize(k_all.float(), dim=1)
    logits = q @ k_all.T / T  # (n, N)
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank  # (n,)
    loss = F.cross_entropy(logits, labels) * (2 * T)
    with torch.no_grad():
        acc1 = (logits.argmax(dim=1) == labels).float().mean() * 100.0
    return loss, acc1


class MoCoV3(nn.Module):
    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 256, mlp_dim: int = 4096,
                 T: float = 1.0, m: float = 0.99, stop_grad_conv1: bool = False):
        """base_encoder() builds a backbone whose `fc` is the head (common.nets.models.build_backbone).
        dim: output of projector and predictor; mlp_dim: their hidden width; T: temperature;
        m: momentum of the momentum encoder (the script sets it every step: cosine schedule).
        ResNets get moco-v3's 2-layer projector, ViTs its 3-layer one; the predictor has 2.
        stop_grad_conv1 (ViT): the patch projection keeps its random init (moco-v3's stability trick)."""
        super().__init__()
        self.T, self.m = T, m
        self.base_encoder = base_encoder()
        self.momentum_encoder = base_encoder()
        vit = family(self.base_encoder) == "VisionTransformer"
        hidden_dim = feature_dim(self.base_encoder)
        for enc in (self.base_encoder, self.momentum_encoder):
            enc.fc = build_mlp(3 if vit else 2, hidden_dim, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)
        if vit:
            proj = self.base_encoder.body.conv_proj
            # moco-v3's patch-embedding init: xavier uniform over the flattened patch
            val = math.sqrt(6.0 / float(3 * reduce(mul, proj.kernel_size, 1) + proj.out_channels))
            nn.init.uniform_(proj.weight, -val, val)
            nn.init.zeros_(proj.bias)
            if stop_grad_conv1:
                proj.weight.requires_grad_(False)
                proj.bias.requires_grad_(False)

        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False  # updated only by the momentum rule

    def networks(self) -> Tuple[nn.Module, nn.Module, nn.Module]:
        """What --compile compiles; the momentum update and the gathers stay outside."""
        return self.base_encoder, self.momentum_encoder, self.predictor

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta_b (buffers are each encoder's own)"""
        momentum_update(self.momentum_encoder, self.base_encoder, self.m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns ctr(q1, k2) + ctr(q2, k1) and {"acc1": mean of both directions' accuracy}."""
        q1 = self.predictor(self.base_encoder(x1))  # (n, dim)
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder()
            k1 = concat_all_gather(self.momentum_encoder(x1))  # (N, dim): every rank's keys
            k2 = concat_all_gather(self.momentum_encoder(x2))
        rank = get_rank()
        loss_12, acc_12 = contrastive_loss(q1, k2, rank, self.T)
        loss_21, acc_21 = contrastive_loss(q2, k1, rank, self.T)
        return loss_12 + loss_21, {"acc1": (acc_12 + acc_21) / 2}
