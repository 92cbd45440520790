"""Schedules over a run: the learning rate (step `--schedule`, cosine `--cos`, linear warmup) and
the momentum (EMA) encoder's cosine momentum (`--moco-m-cos`; BYOL and DINO's teachers use the same)."""
import math
from typing import Sequence

import torch


def lr_at(epoch: float, base_lr: float, epochs: int, schedule: Sequence[int] = (),
          cos: bool = False, warmup_epochs: float = 0.0) -> float:
    """Learning rate at a (fractional) epoch; called every iteration."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * (epoch + 1e-8) / warmup_epochs
    if cos:
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return base_lr * 0.1 ** sum(epoch >= m for m in schedule)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr; a group may carry `lr_scale` (e.g. a slower backbone when fine-tuning)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def cosine_momentum(base_m: float, progress: float, epochs: int) -> float:
    """Momentum (EMA) encoder momentum at a fractional epoch, rising from base_m to 1 by a half cosine
    (BYOL, MoCo v3): m = 1 - (1 - base_m) * (cos(pi * progress / epochs) + 1) / 2."""
    t = min(max(progress / max(epochs, 1e-8), 0.0), 1.0)
    return 1.0 - (1.0 - base_m) * (math.cos(math.pi * t) + 1.0) / 2.0
