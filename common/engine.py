"""The pretraining epoch loop shared by MoCo and SimCLR. The method is the model: it
takes the two views and returns (loss, stats); everything else here is plumbing
(lr per iteration, AMP, progress line, mid-epoch stop)."""
import argparse
import contextlib
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from common.dist import DistEnv, all_reduce_max
from common.errors import UserError
from common.gpu_augment import ViewsToDevice
from common.logging import MeterBank, Progress, log
from common.schedule import set_lr


def amp_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16


def autocast(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(args))


def make_scaler(args: argparse.Namespace, device: torch.device) -> torch.amp.GradScaler:
    # only fp16 needs loss scaling; bf16 has fp32's range
    return torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == "fp16" and device.type == "cuda")


def place_model(model: nn.Module, env: DistEnv, args: argparse.Namespace,
                networks: Sequence[nn.Module] = ()) -> nn.Module:
    """Move to this worker's device (NHWC with --channels-last), torch.compile the
    `networks` with --compile, and wrap in DDP when distributed.

    Only the networks are compiled, each in place (nn.Module.compile keeps the state_dict
    keys, so checkpoints keep their contract); the method's glue around them (queue,
    momentum update, gathers, shuffle BN) stays eager, where it is cheap and graph breaks
    would buy nothing."""
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        for net in networks:
            net.compile(backend=args.compile_backend)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model


class LossGuard:
    """Stops a run whose loss went NaN/inf before a checkpoint can save its weights. The
    first bad iteration is recorded on the device (no host sync per step); `check()`
    reads it where the loop syncs anyway (progress lines, the epoch's end, before a
    mid-epoch checkpoint), agreed by all ranks so they stop together."""

    def __init__(self, device: torch.device, epoch: int, args: argparse.Namespace):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.epoch, self.args = epoch, args

    def update(self, loss: torch.Tensor, it: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), it, self.first_bad)

    def check(self) -> None:
        first = all_reduce_max(self.first_bad.clone())
        if int(first) < 0:
            return
        a = self.args
        fix = f"lower --lr (it is {a.lr})"
        if a.amp and a.amp_dtype == "fp16":
            fix += " or use --amp-dtype bf16 (fp16 overflows where bf16 does not)"
        last = os.path.join(a.output_dir, "checkpoint_last.pth.tar")
        kept = (f"{last} is the last good checkpoint (--resume auto continues from it)" if os.path.isfile(last)
                else "no checkpoint was written")
        raise UserError(f"the loss became NaN/inf at epoch {self.epoch}, iteration {int(first) + 1}; the run stopped "
                        f"before saving these weights and {kept}; {fix}")


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, iters_per_epoch: int, start_iter: int,
                    lr_fn: Callable[[float], float], args: argparse.Namespace, env: DistEnv,
                    after_step: Optional[Callable[[int, "LossGuard"], bool]] = None,
                    prepare: Optional[ViewsToDevice] = None) -> Tuple[Dict[str, float], int]:
    """One pass over `loader` (which already skips the first `start_iter` batches).

    `prepare` turns a batch's two views into device tensors (and runs --gpu-augment's
    photometric ops). `after_step(iterations_done, guard)` runs after every optimizer step
    (it must `guard.check()` before writing a checkpoint); when it returns True the epoch
    stops there (preemption). A NaN/inf loss stops the run with a UserError (LossGuard).
    Returns (epoch averages with `data_wait`, the share of the wall time spent waiting for
    the loader; iterations done).
    """
    model.train()
    prepare = prepare or ViewsToDevice(env.device, args.channels_last)
    meters = MeterBank(env.device)
    progress = Progress(epoch, args.epochs, iters_per_epoch, start_iter)
    guard = LossGuard(env.device, epoch, args)
    images_seen, it = 0, start_iter
    for it, (images, _) in enumerate(progress.timed(loader), start=start_iter):
        lr = lr_fn(epoch + it / iters_per_epoch)
        set_lr(optimizer, lr)
        im_q, im_k = prepare(images[:2])

        with autocast(args, env.device):
            loss, stats = model(im_q, im_k)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        n = im_q.shape[0]
        meters.update(n, loss=loss, **stats)
        guard.update(loss, it)
        images_seen += n * env.world_size
        if (it + 1) % args.print_freq == 0 or it + 1 == iters_per_epoch:
            # the only host sync of the loop: reading the meters for the line
            guard.check()
            log(progress.line(it, images_seen, meters.latest(), meters.averages(across_ranks=False), lr))
        if after_step is not None and after_step(it + 1, guard):
            return {**meters.averages(), "data_wait": progress.data_wait_share()}, it + 1
    guard.check()
    epoch_avg = meters.averages()
    epoch_avg["images_per_sec"] = images_seen / max(time.time() - progress.t0, 1e-9)
    epoch_avg["data_wait"] = progress.data_wait_share()
    return epoch_avg, it + 1
