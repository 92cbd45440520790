"""How a script's processes start, for every launcher: a single process (CPU or one GPU),
`mp.spawn` (`--multiprocessing-distributed`), torchrun and SLURM's srun.

`script_main` parses and finalizes the flags and calls `launch(main_worker, args)`; each
worker calls `start_worker`, which joins the process group (`setup_distributed`), agrees on
the seed and returns a `DistEnv`. SLURM's environment (nodelist, tasks per node), a
rendezvous that cannot complete, a spawned worker that dies, and the preemption signals
that arrive before a training loop takes over are handled here too.
Only global rank 0 prints and writes files (`common.distributed.collectives.is_main_process()`).
"""
import argparse
import multiprocessing.connection
import os
import random
import signal
import socket
import sys
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
import torch.multiprocessing as mp

from common.distributed.collectives import DistEnv, agree_seed, cleanup
from common.distributed.rendezvous import rendezvous_timeout, setup_distributed
from common.distributed.signals import forward_preemption_signals, hold_preemption_signals
from common.distributed.slurm import host_resolves
from common.distributed.world import detect_launcher, expected_world_size, nproc_per_node, per_worker
from common.errors import UserError, report_user_errors
from common.files import lock as run_lock


def launch(worker: Callable[[Optional[int], argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run `worker(local_rank, args)` once per process on this node.

    torchrun/srun already started one process per GPU, so the worker runs directly;
    `--multiprocessing-distributed` spawns them here.
    """
    launcher = detect_launcher()
    if launcher is not None and args.multiprocessing_distributed:
        # srun/torchrun already started one process per task; spawning more would
        # silently run a different world size than the one asked for
        raise UserError(f"--multiprocessing-distributed cannot be combined with {launcher}, which already "
                        f"started {expected_world_size(args)} processes; drop the flag and start one "
                        f"process per GPU (srun --ntasks-per-node=GPUS, torchrun --nproc_per_node=GPUS)")
    if launcher is None and expected_world_size(args) > 1:
        # once, here, rather than in every spawned worker
        _check_dist_url(args.dist_url)
        rendezvous_timeout()
    if launcher is None and args.multiprocessing_distributed:
        nproc = nproc_per_node(args)
        # a module-level function: a functools.wraps wrapper of `worker` cannot be pickled
        ctx = mp.spawn(_run_worker, nprocs=nproc, args=(worker, args), join=False)
        forwarded = forward_preemption_signals(ctx.processes)
        _stop_if_a_worker_is_killed(ctx.processes, forwarded, args)
        try:
            while not ctx.join():
                pass
        except mp.ProcessExitedException as e:
            # the worker already printed its one-line error; do not add mp's traceback.
            # A signal's negative code -N would exit 256-N; 128+N is the shell's convention
            raise SystemExit(128 - e.exit_code if e.exit_code < 0 else e.exit_code or 1)
    else:
        _run_worker(None, worker, args)


def _check_dist_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme == "tcp" and parsed.hostname and not host_resolves(parsed.hostname):
        raise UserError(f"--dist-url {url}: host {parsed.hostname!r} does not resolve to an address on this node "
                        f"({socket.gethostname()}); pass the IP address of the node rank 0 runs on, "
                        f"e.g. --dist-url tcp://10.0.0.1:23456")


# what a worker killed by these usually means
_SIGNAL_HINTS = {"SIGKILL": " (often the out-of-memory killer: see `dmesg`, and lower -b or -j if so)",
                 "SIGBUS": " (often /dev/shm too small for the data loading workers: lower -j or enlarge it)",
                 "SIGSEGV": " (a crash in native code)"}


def _stop_if_a_worker_is_killed(processes: list, forwarded: List[int], args: argparse.Namespace) -> None:
    """Wait until every worker has ended or one failed; a worker killed by a signal we did
    not send (the OOM killer's SIGKILL, a segfault) ends the run here with one sentence.

    torch's join() answers a failed worker by SIGTERM to the others, which they take for a
    preemption and announce a checkpoint that can never come: a rank is gone, so their
    next collective fails. They are killed instead (they hold nothing a checkpoint could
    save consistently; a checkpoint write cut short leaves a .tmp file the next run
    removes), and the sentence says how to continue. Workers that exited on their own
    (a UserError, the requeue code, a traceback) are left to torch's join()."""
    while True:
        codes = [p.exitcode for p in processes]
        if None not in codes or any(codes):
            break
        multiprocessing.connection.wait([p.sentinel for p, c in zip(processes, codes) if c is None])
    killed = [(index, -code) for index, code in enumerate(codes) if code is not None and code < 0]
    if not killed:
        return
    index, signum = killed[0]
    if forwarded and signum in (signal.SIGUSR1, signal.SIGTERM):
        return  # our own forwarding of `kill PARENT` ended it
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join()
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    rank = args.rank * len(processes) + index
    others = "" if len(processes) == 1 else ", so this node's other workers were stopped" if args.world_size > 1 \
        else ", so the other workers were stopped"
    last = os.path.join(args.output_dir, "checkpoint_last.pth.tar") if args.output_dir else None
    if last is not None and os.path.isfile(last):
        then = f"to continue, run the same command with --resume auto, which resumes from {last}"
    else:
        then = "no checkpoint was written yet, so run the same command again to start over"
    prog = os.path.basename(sys.argv[0]) or "python"
    print(f"{prog}: error: worker rank {rank} was killed by {name}{_SIGNAL_HINTS.get(name, '')}{others}; {then}",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _run_worker(local_rank: Optional[int], worker: Callable[[Optional[int], argparse.Namespace], None],
                args: argparse.Namespace) -> None:
    """One worker: a UserError becomes its one-line message; a worker that returns leaves
    the process group here, so no script has to."""
    report_user_errors(worker)(local_rank, args)
    cleanup()


def start_worker(local_rank: Optional[int], args: argparse.Namespace,
                 preemptible: bool = False) -> Tuple[DistEnv, int, int]:
    """Join the process group and seed this rank. Returns (env, per-process batch size,
    per-process data-loading workers). `preemptible`: the script checkpoints on
    SIGUSR1/SIGTERM (common/train/preempt.py), so one arriving before its loop is held for it
    (SIGTERM only once the process group is up: before, it ends the process)."""
    if preemptible:
        # Joining the group blocks in C++, where no Python handler runs: a held SIGTERM
        # would wait for the rendezvous to give up. Nothing is trained yet, so until the
        # group is up SIGTERM keeps its default action (end now); SIGUSR1, SLURM's
        # warning before the time limit, is held so that the run still requeues.
        hold_preemption_signals((signal.SIGUSR1,))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    env = setup_distributed(local_rank, args)
    if preemptible:
        hold_preemption_signals()
    env.seed = agree_seed(args.seed, env)
    torch.manual_seed(env.seed + env.rank)
    np.random.seed(env.seed + env.rank)
    random.seed(env.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch_size = per_worker(args.batch_size, env.world_size)
    # -j is per node (as in facebookresearch/moco): split it over this node's processes
    workers = (args.workers + env.local_world_size - 1) // env.local_world_size
    return env, batch_size, workers


def script_main(get_args_parser: Callable[[], argparse.ArgumentParser],
                finalize_args: Callable[[argparse.Namespace], argparse.Namespace],
                main_worker: Callable[[Optional[int], argparse.Namespace], None],
                before_launch: Optional[Callable[[Callable, argparse.Namespace], argparse.Namespace]] = None,
                instead: Optional[Callable[[argparse.Namespace], bool]] = None) -> Callable[..., None]:
    """A script's `main(argv=None)`: parse, finalize, (`instead(args)`: a mode that does the
    command's whole work before any worker, e.g. --view-check-only; True ends main there),
    (`before_launch(main_worker, args)`, which may run the worker itself and returns the args to
    launch with), start the workers; a UserError anywhere prints `script: error: <sentence>`
    and exits 2."""
    @report_user_errors
    def main(argv=None) -> None:
        try:
            args = finalize_args(get_args_parser().parse_args(argv))
            if instead is not None and instead(args):
                return
            if before_launch is not None:
                args = before_launch(main_worker, args)
            launch(main_worker, args)
        finally:  # finalize_args took the output folder's lock (common/files/lock.py)
            run_lock.release()

    return main
