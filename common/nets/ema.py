"""The momentum (EMA) encoder's update, shared by every method with a slow copy of its network:
MoCo's key encoder, MoCo v3's momentum encoder (and BYOL's target, DINO's teacher). Its
momentum over the run is common/train/schedule.py's cosine_momentum."""
import torch
import torch.nn as nn


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_source, parameters only (each encoder
    keeps its own BatchNorm statistics, as in the reference)."""
    params_s = [p.data for p in source.parameters()]
    params_t = [p.data for p in target.parameters()]
    # multi-tensor kernels: a few launches instead of two per parameter, same arithmetic
    torch._foreach_mul_(params_t, m)
    torch._foreach_add_(params_t, params_s, alpha=1.0 - m)
