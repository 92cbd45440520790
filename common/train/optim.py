"""Optimizers for large-batch pretraining: SGD, Adam and LARS (You et al., 2017), with
BatchNorm and bias parameters in their own group (no weight decay, no LARS adaptation),
as SimCLR and MoCo v3 do."""
import argparse
import math
from typing import Iterable, List

import torch
import torch.nn as nn

from common.errors import UserError

OPTIMIZERS = ("lars", "sgd", "adam")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is scaled by the trust ratio
    eta * ||w|| / ||g + wd * w|| (SimCLR's trust ratio; lr applied outside the momentum
    buffer as in MoCo v3's PyTorch LARS, so an lr change takes effect at once). A group
    with `lars_exclude=True` (BN, biases) gets plain momentum SGD and no weight decay.

    Update, per tensor:  g <- g + wd * w;  g <- trust * g;  v <- m * v + g;  w <- w - lr * v
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # multi-tensor kernels: a per-tensor Python loop launched ~10 small kernels per
            # tensor and left the GPU idle (measured: docs/performance.md, LARS's update)
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # a zero norm (fresh zero-init layer, no gradient) keeps the plain step
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                grads = torch._foreach_mul(grads, list(trust.unbind(0)))
            bufs, steps = [], []  # momentum buffers that exist, and their tensors' steps
            for p, g in zip(params, grads):
                if "momentum_buffer" in self.state[p]:
                    bufs.append(self.state[p]["momentum_buffer"])
                    steps.append(g)
                else:  # the first step: v <- g
                    self.state[p]["momentum_buffer"] = torch.clone(g).detach()
            if bufs:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, steps)
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss


def split_decay_groups(model: nn.Module) -> List[dict]:
    """Two parameter groups: weights, and BN/bias (every tensor of <= 1 dimension), the
    second marked `lars_exclude` and without weight decay. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """The lr for a global batch: linear `base * B / 256`, sqrt `base * sqrt(B / 256)`, or `none`."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / 256)
    return base_lr


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """`--optimizer lars|sgd|adam` with `--momentum`, `--wd`; BN and biases are never decayed
    under LARS; SGD and Adam decay every weight, as the reference implementations do."""
    name = args.optimizer
    if name == "lars":
        return LARS(split_decay_groups(model), lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    eta=args.lars_eta)
    params: Iterable = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr, weight_decay=args.weight_decay)
    raise UserError(f"unknown --optimizer {name!r}; pick one of {', '.join(OPTIMIZERS)}")
