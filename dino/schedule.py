"""DINO's per-step pieces (facebookresearch/dino's utils.cosine_scheduler, clip_gradients and
cancel_gradients_last_layer): the lr (linear warmup from 0, then cosine to --min-lr), the
weight decay (cosine from --wd to --weight-decay-end), the per-tensor gradient clipping, and
the last layer's frozen first epochs."""
import math
from typing import Iterable

import torch
import torch.nn as nn


def cosine(start: float, end: float, t: float) -> float:
    """start at t = 0 to end at t = 1 by a half cosine."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def lr_at(epoch: float, base_lr: float, min_lr: float, epochs: int, warmup_epochs: float) -> float:
    """lr at a fractional epoch: 0 -> base_lr linearly over warmup_epochs, then cosine to min_lr."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    return cosine(base_lr, min_lr, (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8))


def weight_decay_at(epoch: float, weight_decay: float, weight_decay_end: float, epochs: int) -> float:
    """DINO's weight decay at a fractional epoch: cosine from weight_decay to weight_decay_end."""
    return cosine(weight_decay, weight_decay_end, epoch / max(epochs, 1e-8))


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], clip: float) -> None:
    """DINO's clipping: every tensor's gradient on its own to l2 norm <= clip (g *= clip / (|g| + 1e-6)
    where that factor is below 1), without a host sync per tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    for g, n in zip(grads, norms):
        g.mul_(torch.clamp(clip / (n + 1e-6), max=1.0))


def cancel_last_layer(head: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """The head's last layer learns nothing in the first `freeze_epochs` epochs (its gradient
    dropped before the step: no update, no weight decay, no optimizer state), DINO's
    --freeze_last_layer."""
    if epoch < freeze_epochs:
        for p in head.last_layer.parameters():
            p.grad = None
