"""The pretraining step loop shared by MoCo, SimCLR and inpainting (the epoch loop is in
the scripts). The method is the model: it takes a batch's views and returns (loss, stats);
everything else here is plumbing: lr per iteration, AMP, the progress line, and stopping
at an iteration boundary when SLURM asks (common/train/preempt.py)."""
import argparse
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol

import torch
import torch.nn as nn

from common.distributed.collectives import DistEnv
from common.log.progress import MeterBank, Progress, log
from common.nets.precision import Precision
from common.train.schedule import set_lr
from common.watch.loss_guard import LossGuard


class RunHooks(Protocol):
    """What the step loop asks of the run (common/train/run.py `PretrainRun`): where a
    mid-epoch resume starts, the progress lines' values (metrics log, watches), the stop
    request, and mid-epoch checkpoints.
    A protocol, so the run state can import this module and not the other way round."""
    start_epoch: int
    start_iter: int
    stop: object  # common.train.preempt.StopRequest: .agreed()

    def log_step(self, step: int, values: Dict[str, float]) -> None: ...

    def save_due(self, iterations: int) -> bool: ...

    def save_mid_epoch(self, epoch: int, iterations: int) -> None: ...


@dataclass
class EpochResult:
    stats: Dict[str, float]  # averages over this epoch's iterations, `data_wait`, `images_per_sec`
    iterations: int  # iterations of the epoch done, counting those before a mid-epoch resume
    stopped: bool = False  # every rank stopped after `iterations` (SLURM preemption)


def train_one_epoch(model: nn.Module, data, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    lr_fn: Callable[[float], float], epoch: int, args: argparse.Namespace, env: DistEnv,
                    run: Optional[RunHooks] = None,
                    per_step: Optional[Callable[[float], None]] = None,
                    after_backward: Optional[Callable[[], None]] = None,
                    after_step: Optional[Callable[[], None]] = None) -> EpochResult:
    """One pass over `data.loader` (a common.train.data.PretrainData, set to this epoch's order
    and past the iterations a mid-epoch resume has done; `data.to_device` turns a batch's two
    views into device tensors and runs --gpu-augment's photometric ops).

    `run` (common.train.run.PretrainRun; None in benchmarks) gives the first iteration,
    writes the --save-every-iters checkpoints (through the script's common/ckpt/checkpoints.py
    `Checkpoints`), and carries the stop request: once every rank
    agrees on one, the loop returns with `stopped` and the script checkpoints and requeues.
    A NaN/inf loss stops the run with a UserError (LossGuard) before anything is saved.
    `per_step(fractional epoch)` runs before each step, beside the lr: a schedule of the
    method's own (MoCo's --moco-m-cos). `after_backward()` runs between backward and the
    optimizer step (DINO: gradient clipping, the last layer's gradient dropped in its first
    epochs; it unscales through the scaler itself under fp16), `after_step()` after the step
    (DINO: the teacher's EMA of the stepped student).
    """
    model.train()
    precision = Precision.from_args(args)
    start_iter = run.start_iter if run is not None else 0
    data.set_epoch(epoch, start_iter)
    meters = MeterBank(env.device)
    progress = Progress(epoch, args.epochs, data.iters_per_epoch, start_iter)
    guard = LossGuard(env.device, epoch, args)
    images_seen, it = 0, start_iter - 1
    for it, (images, _) in enumerate(progress.timed(data.loader), start=start_iter):
        at = epoch + it / data.iters_per_epoch  # fractional epoch
        lr = lr_fn(at)
        set_lr(optimizer, lr)
        if per_step is not None:
            per_step(at)
        views = data.to_device(images)  # MoCo / SimCLR: two views; inpainting: masked, image, mask

        with precision.autocast(env.device):
            loss, stats = model(*views)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()

        n = views[0].shape[0]
        meters.update(n, loss=loss, **stats)
        guard.update(loss, it)
        images_seen += n * env.world_size
        if run is not None and epoch == run.start_epoch and (eta := progress.run_eta(it)):
            log(eta)
        if (it + 1) % args.print_freq == 0 or it + 1 == data.iters_per_epoch:
            # the only host sync of the loop: reading the meters for the line
            guard.check()
            log(progress.line(it, images_seen, meters.latest(), meters.averages(across_ranks=False), lr))
            if run is not None:
                run.log_step(epoch * data.iters_per_epoch + it + 1,
                             {**meters.latest(), "lr": lr, "data_wait": progress.data_wait_share()})
        if run is not None and run.stop.agreed():
            guard.check()  # never checkpoint NaN weights
            return EpochResult({**meters.averages(), "data_wait": progress.data_wait_share()}, it + 1, stopped=True)
        if run is not None and run.save_due(it + 1):
            guard.check()
            run.save_mid_epoch(epoch, it + 1)
    guard.check()
    stats = meters.averages()
    stats["images_per_sec"] = images_seen / max(time.time() - progress.t0, 1e-9)
    stats["data_wait"] = progress.data_wait_share()
    return EpochResult(stats, it + 1)
