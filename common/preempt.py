"""Preemption-safe training: stop at an iteration boundary, checkpoint, requeue.

SLURM warns a job before its time runs out (`#SBATCH --signal=USR1@120`) and sends
SIGTERM when it preempts or cancels it. Either signal only sets a flag here; after the
next optimizer step every rank agrees on the flag (an all_reduce, so all ranks stop at
the same iteration), rank 0 writes a mid-epoch checkpoint (epoch, iteration; the sampler
restarts from `iteration * batch_size`), runs `scontrol requeue $SLURM_JOB_ID`, and
every process exits with REQUEUE_EXIT_CODE. The requeued job starts with
`--resume auto` and continues the same epoch without repeating or skipping samples.

Wiring in a main script (after resume, before the epoch loop):

    preemption = PreemptionHandler(model, optimizer, scaler, args, env, method="moco")
    ... train_one_epoch(..., after_step=preemption.after_step(epoch))

plus `add_preemption_args(parser)` for `--save-every-iters`.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from common.checkpoint import save_checkpoint, training_state
from common.dist import DistEnv, cleanup, is_main_process
from common.launch import early_preemption_signal
from common.errors import UserError
from common.logging import log

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
# Distinct from 0 (done), 1 (crash) and 2 (user error), so wrappers can tell a
# preempted-and-checkpointed run from a failed one.
REQUEUE_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def add_preemption_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-every-iters", default=0, type=int, metavar="N",
                        help="also write checkpoint_last.pth.tar every N iterations inside an epoch (0: only at "
                             "epoch ends); a killed job then loses at most N iterations")


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of the step, data workers
    included; a worker killed by SIGUSR1 would crash the run before it can checkpoint.
    The main process decides; workers end with it."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionHandler:
    """Owns the signal handlers, the cross-rank agreement and mid-epoch checkpoints."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, args: argparse.Namespace,
                 env: DistEnv, method: str, iters_per_epoch: int = 0, install_signals: bool = True):
        self.iters_per_epoch = iters_per_epoch
        self.model, self.optimizer, self.scaler, self.args, self.env = model, optimizer, scaler, args, env
        self.method = method
        self.save_every = args.save_every_iters
        if self.save_every < 0:
            raise UserError(f"--save-every-iters {self.save_every} is negative; pass N > 0, or 0 to save only at epoch ends")
        self.requested: Optional[str] = None  # name of the first signal received
        self.group = None
        if env.distributed:
            # agree over a CPU (gloo) side group: no GPU stream sync per step, and the
            # round trip overlaps with the GPU still computing this step
            if dist.get_backend() == "gloo":
                self.group = dist.group.WORLD
            else:
                try:
                    self.group = dist.new_group(backend="gloo")
                except Exception:  # gloo unusable on this network: fall back to the training backend
                    self.group = None
        if install_signals:
            for sig in PREEMPT_SIGNALS:
                signal.signal(sig, self._on_signal)
            early = early_preemption_signal()
            if early is not None:  # arrived while data and model were being built
                self._on_signal(early, None)

    # signal handlers may only set a flag: the training step must finish untouched
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGTERM:
            # a second SIGTERM (`kill` twice, or SLURM ending the job after our requeue): die now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.requested is None:
            self.requested = name
            # os.write, not print: a handler that prints while the loop prints can raise
            os.write(2, f"=> {name} received: will checkpoint and requeue after the current iteration\n".encode())

    def stop_agreed(self) -> bool:
        """True on every rank when any rank received a signal (a collective: call on all ranks)."""
        flag = 1 if self.requested else 0
        if not self.env.distributed:
            return bool(flag)
        if self.group is not None:
            t = torch.tensor([flag], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        else:
            t = torch.tensor([flag], dtype=torch.int32, device=self.env.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def save_mid_epoch(self, epoch: int, iteration: int) -> None:
        """checkpoint_last.pth.tar at (epoch, iteration): resume continues this epoch there."""
        if is_main_process():
            state = training_state(self.model, self.optimizer, self.scaler, self.args, method=self.method,
                                   epoch=epoch, iteration=iteration)
            path = save_checkpoint(state, self.args.output_dir, epoch_file=False)
            log(f"=> saved mid-epoch checkpoint {path} (epoch {epoch}, iteration {iteration})")

    def after_step(self, epoch: int) -> Callable[..., bool]:
        """The `after_step` callback of common.engine.train_one_epoch for `epoch`; `guard`
        stops the run instead of saving weights after a NaN/inf loss."""
        def hook(done: int, guard) -> bool:
            if self.stop_agreed():
                guard.check()
                self.save_mid_epoch(epoch, done)
                self.requeue_and_exit()
            # the epoch's last iteration is followed by the epoch-end checkpoint anyway
            if self.save_every and done % self.save_every == 0 and done != self.iters_per_epoch:
                guard.check()
                self.save_mid_epoch(epoch, done)
            return False

        return hook

    def _barrier(self) -> None:
        if self.env.distributed:
            if self.group is not None:
                dist.barrier(group=self.group)
            else:
                dist.barrier()

    def requeue_and_exit(self) -> None:
        if is_main_process():
            requeue_slurm_job()
        # nobody exits before rank 0 has saved and requeued: with `srun --kill-on-bad-exit`
        # the first task to exit non-zero ends the others
        self._barrier()
        cleanup()
        sys.stdout.flush()
        raise SystemExit(REQUEUE_EXIT_CODE)


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID`; any failure is logged, never raised (the
    checkpoint is already written, so resubmitting by hand loses nothing)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log("=> not a SLURM job: restart the same command with --resume auto to continue")
        return False
    if shutil.which("scontrol") is None:
        log(f"=> scontrol not found: cannot requeue SLURM job {job}; resubmit it (it resumes with --resume auto)")
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as e:
        log(f"=> scontrol requeue {job} failed ({e}); resubmit the job (it resumes with --resume auto)")
        return False
    if proc.returncode != 0:
        log(f"=> scontrol requeue {job} failed ({(proc.stderr or proc.stdout).strip()}); "
            f"resubmit the job (it resumes with --resume auto)")
        return False
    log(f"=> requeued SLURM job {job}")
    return True
