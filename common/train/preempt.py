"""Preemption-safe training: stop at an iteration boundary, checkpoint, requeue.

SLURM warns a job before its time runs out (`#SBATCH --signal=USR1@120`) and sends
SIGTERM when it preempts or cancels it. Either signal only sets a flag here
(`StopRequest`); after each optimizer step the step loop asks `agreed()` (an all_reduce,
so all ranks stop at the same iteration) and returns `stopped`. The script's epoch loop
then has rank 0 write a mid-epoch checkpoint (epoch, iteration; the sampler restarts from
`iteration * batch_size`) and run `scontrol requeue $SLURM_JOB_ID`, and every process
exits with REQUEUE_EXIT_CODE. The requeued job starts with `--resume auto` and continues
the same epoch without repeating or skipping samples.
"""
import os
import shutil
import signal
import subprocess
import sys
from typing import Optional

import torch
import torch.distributed as dist

from common.distributed.collectives import DistEnv, cleanup, is_main_process
from common.distributed.signals import PREEMPT_SIGNALS, early_preemption_signal
from common.log.progress import log

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
# Distinct from 0 (done), 1 (crash) and 2 (user error), so wrappers can tell a
# preempted-and-checkpointed run from a failed one.
REQUEUE_EXIT_CODE = 75


class StopRequest:
    """Owns the signal handlers and the cross-rank agreement on stopping."""

    def __init__(self, env: DistEnv, install_signals: bool = True):
        self.env = env
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

    def agreed(self) -> bool:
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

    def requeue(self) -> int:
        """After the mid-epoch checkpoint: rank 0 requeues the SLURM job, every rank waits
        for it and leaves the process group. Returns the exit code (REQUEUE_EXIT_CODE)."""
        if is_main_process():
            requeue_slurm_job()
        # nobody exits before rank 0 has saved and requeued: with `srun --kill-on-bad-exit`
        # the first task to exit non-zero ends the others
        if self.env.distributed:
            if self.group is not None:
                dist.barrier(group=self.group)
            else:
                dist.barrier()
        cleanup()
        sys.stdout.flush()
        return REQUEUE_EXIT_CODE


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
