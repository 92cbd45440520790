"""Preemption signals (SIGUSR1, SIGTERM) around the training loop's own handling
(common/train/preempt.py): passed on from the parent to spawned workers, held from a
worker's start until the loop takes over, and ignored in data-loader workers."""
import os
import signal
from typing import List, Optional, Sequence


def forward_preemption_signals(processes: list) -> List[int]:
    """`kill PARENT` (or SLURM signalling every process) must reach the spawned workers,
    which checkpoint and exit (common/train/preempt.py). The first SIGUSR1/SIGTERM is passed
    on as SIGUSR1, so a worker signalled directly as well still sees one request; a
    later SIGTERM is passed on as SIGTERM, which ends the workers at once. Returns the
    signals received so far (a list that grows)."""
    received: List[int] = []

    def forward(signum, frame):
        received.append(signum)
        out = signal.SIGTERM if signum == signal.SIGTERM and len(received) > 1 else signal.SIGUSR1
        for p in processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, out)
                except OSError:
                    pass

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    return received


# SIGUSR1/SIGTERM that arrived before the training loop took over (common/train/preempt.py)
_early_preemption: List[int] = []


def hold_preemption_signals(signals: Sequence[int] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """From a worker's start until the training loop installs its own handlers, remember a
    SLURM preemption signal instead of dying of it (SIGUSR1's default action): the loop
    then checkpoints after its first step and the job is requeued."""
    def remember(signum, frame):
        if _early_preemption and signum == signal.SIGTERM:  # asked twice: end now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _early_preemption.append(signum)
    for sig in signals:
        signal.signal(sig, remember)


def early_preemption_signal() -> Optional[int]:
    """The first SIGUSR1/SIGTERM received while held, or None."""
    return _early_preemption[0] if _early_preemption else None


PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: SLURM signals every process of the step, data workers
    included; a worker killed by SIGUSR1 would crash the run before it can checkpoint.
    The main process decides; workers end with it."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
