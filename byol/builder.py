"""BYOL (Grill et al., 2020) and SimSiam (Chen and He, 2021): an online network (backbone +
projector) and a predictor regress the projection of the other view made by a target
network: in BYOL an exponential moving average of the online backbone + projector, in
SimSiam the online network itself behind a stop-gradient. No negatives: the predictor and
the stop-gradient (with BYOL's slow target) are what keeps the output from collapsing.

Names follow facebookresearch/simsiam: `encoder` is the online backbone whose `fc` is the
projector, `predictor` the predictor; BYOL adds `target_encoder`. So a checkpoint's keys are
`module.encoder.*` (the projector under `module.encoder.fc.*`), `module.predictor.*` and for
BYOL `module.target_encoder.*`: common.ckpt.pretrained.extract_backbone takes the online
backbone, the one both papers evaluate."""
import copy
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from byol.loss import effective_rank, std_of_l2_normalized, symmetric_loss
from common.nets.ema import momentum_update
from common.nets.models import feature_dim
from common.nets.mlp import build_mlp


class BYOL(nn.Module):
    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 256, hidden_dim: Optional[int] = 4096,
                 pred_dim: int = 4096, m: float = 0.996, simsiam: bool = False, stop_grad: bool = True):
        """base_encoder() builds a backbone whose `fc` is the head (common.nets.models.build_backbone).

        BYOL: projector and predictor Linear(hidden_dim) + BN + ReLU + Linear(dim) (BYOL's
        4096 / 256); the target network is a copy of backbone + projector, moved towards the
        online one with momentum `m` (the script sets it every step: cosine to 1).
        SimSiam (`simsiam`): projector 3 Linear layers of the backbone's width, each followed
        by BN (the last without affine: SimSiam's), `hidden_dim` wide (None: the backbone's width),
        output `dim` (2048); predictor
        Linear(pred_dim) + BN + ReLU + Linear(dim), a bottleneck (512); no target copy.
        `stop_grad` False: the ablation of both papers whose output collapses: the targets are the
        online projections with their gradient (BYOL then has no target copy either); kept for
        checking the collapse watch."""
        super().__init__()
        self.m, self.simsiam, self.stop_grad = m, simsiam, stop_grad
        self.encoder = base_encoder()
        width = feature_dim(self.encoder)
        if simsiam:
            self.encoder.fc = build_mlp(3, width, hidden_dim or width, dim, last_bn=True)
        else:
            self.encoder.fc = build_mlp(2, width, hidden_dim, dim, last_bn=False)
        self.predictor = build_mlp(2, dim, pred_dim, dim, last_bn=False)
        self.momentum_target = not simsiam and stop_grad
        if self.momentum_target:
            # xi <- theta at the start (BYOL); then only the momentum rule moves it
            self.target_encoder = copy.deepcopy(self.encoder)
            for p in self.target_encoder.parameters():
                p.requires_grad = False

    def networks(self) -> Tuple[nn.Module, ...]:
        """What --compile compiles; the target update and the loss stay outside."""
        return (self.encoder, self.predictor) + ((self.target_encoder,) if self.momentum_target else ())

    @torch.no_grad()
    def update_target(self) -> None:
        """BYOL: xi <- tau * xi + (1 - tau) * theta, parameters only (BN buffers are each network's own).
        Run before the targets of a step are made, so the step's targets come from the online
        weights after the previous step's update: BYOL's order, one call earlier."""
        momentum_update(self.target_encoder, self.encoder, self.m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns the symmetrised loss and {"acc1": % of predictions whose own target is the
        batch's nearest, "std": std_of_l2_normalized of the online projections, "rank": their
        effective_rank}, each the mean over the two views."""
        z1 = self.encoder(x1)  # z1: NxC online projection of view 1
        z2 = self.encoder(x2)  # z2: NxC
        p1 = self.predictor(z1)  # p1: NxC prediction of view 2's target
        p2 = self.predictor(z2)  # p2: NxC
        if self.momentum_target:
            with torch.no_grad():
                self.update_target()
                t1 = self.target_encoder(x1)  # t1: NxC target projection z'
                t2 = self.target_encoder(x2)
        else:
            t1, t2 = (z1.detach(), z2.detach()) if self.stop_grad else (z1, z2)  # t: NxC, sg(z)
        loss, acc1 = symmetric_loss(p1, p2, t1, t2, self.simsiam)
        std = (std_of_l2_normalized(z1) + std_of_l2_normalized(z2)) / 2
        rank = (effective_rank(z1) + effective_rank(z2)) / 2
        return loss, {"acc1": acc1, "std": std, "rank": rank}
