"""A pretraining run's checkpoints, as the scripts' epoch loop writes them (main_moco.py,
main_moco_v3.py, main_simclr.py, main_inpaint.py): `--resume PATH|auto` restores model,
optimizer, scaler and RNG; the mid-epoch checkpoint (--save-every-iters, SLURM preemption);
the epoch's checkpoint with retention (--save-freq, --keep-checkpoints, --keep-epochs). What
a checkpoint holds and how it is written atomically: common/ckpt/io.py; which file --resume
picks: common/ckpt/resume.py."""
import argparse
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from common.ckpt.io import (
    check_free_space,
    checkpoint_bytes,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from common.ckpt.resume import check_arch, resolve_resume
from common.ckpt.retention import checkpoint_disk_plan, epoch_file_due, prune_epoch_checkpoints
from common.distributed.collectives import is_main_process
from common.log.progress import log


def resume_training(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                    method: str) -> Tuple[int, int]:
    """`--resume PATH|auto`: restore everything and return (epoch, iteration) to continue at;
    (0, 0) for a fresh start."""
    path = resolve_resume(args.resume, args.output_dir)
    if not path:
        if args.resume == "auto":
            log(f"=> --resume auto: no checkpoint in {args.output_dir} yet, starting a new run")
        return 0, 0
    ckpt = load_checkpoint(path, expected_method=method)
    check_arch(ckpt, args.arch, path)
    start_epoch, start_iter = restore_training_state(ckpt, model, optimizer, scaler)
    log(f"=> resumed from {path} at epoch {start_epoch}" + (f", iteration {start_iter}" if start_iter else ""))
    return start_epoch, start_iter


class Checkpoints:
    """The checkpoints of one pretraining run of `method` into args.output_dir. Writes happen
    on the main process only; every other process gets None back."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, args: argparse.Namespace,
                 method: str, keys: Optional[Callable[[], Dict[str, Any]]] = None):
        """`keys()`: the method's own keys in every checkpoint it writes (DINO: `student` and
        `teacher` in facebookresearch/dino's layout)."""
        self.model, self.optimizer, self.scaler, self.args, self.method = model, optimizer, scaler, args, method
        self.keys = keys or dict

    def resume(self) -> Tuple[int, int]:
        """Restore a --resume checkpoint (see resume_training) and return (epoch, iteration)
        to continue at: start_iter iterations of start_epoch are already done (a mid-epoch
        checkpoint). Then, on the main process, check the disk holds one checkpoint and log
        what the run's checkpoints will take."""
        start_epoch, start_iter = resume_training(self.args, self.model, self.optimizer, self.scaler, self.method)
        if is_main_process():
            size = checkpoint_bytes(self.model, self.optimizer)
            check_free_space(self.args.output_dir, size)
            log(checkpoint_disk_plan(self.args, size, start_epoch))
        return start_epoch, start_iter

    def save_mid_epoch(self, epoch: int, iteration: int) -> Optional[str]:
        """checkpoint_last.pth.tar at (epoch, iteration): resume continues this epoch there."""
        if not is_main_process():
            return None
        state = training_state(self.model, self.optimizer, self.scaler, self.args, method=self.method,
                               epoch=epoch, iteration=iteration, **self.keys())
        path = save_checkpoint(state, self.args.output_dir, epoch_file=False)
        log(f"=> saved mid-epoch checkpoint {path} (epoch {epoch}, iteration {iteration})")
        return path

    def save_epoch(self, epoch: int, metrics: Dict[str, Any], **extra: Any) -> Optional[Tuple[Dict[str, Any], str]]:
        """The checkpoint after epoch `epoch` (a resume starts at epoch + 1) with its metrics
        record and the `extra` keys: checkpoint_last.pth.tar, checkpoint_NNNN.pth.tar when
        --save-freq/--keep-epochs ask for it, then retention prunes the older epoch files.
        Returns (state, path) on the main process."""
        if not is_main_process():
            return None
        a = self.args
        state = training_state(self.model, self.optimizer, self.scaler, a, method=self.method, epoch=epoch + 1,
                               metrics=metrics, **self.keys(), **extra)
        path = save_checkpoint(state, a.output_dir, epoch_file=epoch_file_due(a, epoch + 1))
        prune_epoch_checkpoints(a.output_dir, a.keep_checkpoints, a.keep_epochs)
        return state, path
