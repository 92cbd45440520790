"""How a script's processes start, for every launcher: a single process (CPU or one GPU),
`mp.spawn` (`--multiprocessing-distributed`), torchrun and SLURM's srun.

`script_main` parses and finalizes the flags and calls `launch(main_worker, args)`; each
worker calls `start_worker`, which joins the process group (`setup_distributed`), agrees on
the seed and returns a `DistEnv`. SLURM's environment (nodelist, tasks per node), a
rendezvous that cannot complete, a spawned worker that dies, and the preemption signals
that arrive before a training loop takes over are handled here too.
Only global rank 0 prints and writes files (`common.dist.is_main_process()`).
"""
import argparse
import multiprocessing.connection
import os
import random
import re
import signal
import socket
import sys
from datetime import timedelta
from typing import Callable, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.constants import default_pg_timeout

from common.dist import DistEnv, agree_seed, cleanup
from common.errors import UserError, report_user_errors
from common.slurm import check_master_resolves, host_resolves, slurm_env, slurm_tasks_on_this_node

# How long the processes wait for each other to join the process group (seconds;
# DIST_RENDEZVOUS_TIMEOUT overrides it). torch's own bound is its 30-minute collective
# timeout, so a master that never comes up (a wrong address, a node that did not start)
# held the whole job that long. Collectives keep torch's timeout: ranks legitimately wait
# for rank 0's checkpoint writes or evaluation.
RENDEZVOUS_TIMEOUT_S = 300.0


def detect_launcher() -> Optional[str]:
    """'torchrun' or 'slurm' when an external launcher started this process, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return "torchrun"
    ntasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    if "SLURM_PROCID" in env and ntasks is not None and int(ntasks) > 1:
        return "slurm"
    return None


def add_dist_args(parser: argparse.ArgumentParser) -> None:
    """facebookresearch/moco's distributed flags, plus --nproc-per-node for CPU runs."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--world-size", default=1, type=int,
                   help="number of nodes (with --multiprocessing-distributed) or processes")
    g.add_argument("--rank", default=0, type=int, help="node rank for distributed training")
    g.add_argument("--dist-url", default="tcp://127.0.0.1:23456", type=str,
                   help="url used to set up distributed training")
    g.add_argument("--dist-backend", default=None, type=str,
                   help="distributed backend (default: nccl on GPU, gloo on CPU)")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="spawn one worker per GPU (or --nproc-per-node CPU workers) on this node")
    g.add_argument("--nproc-per-node", default=None, type=int,
                   help="workers per node for --multiprocessing-distributed "
                        "(default: number of GPUs, or 1 without GPUs)")
    g.add_argument("--gpu", default=None, type=int, help="GPU id to use for a single-process run")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def uses_cuda(args: argparse.Namespace) -> bool:
    """Whether the workers will train on GPUs (a GPU is visible and --cpu was not given)."""
    return torch.cuda.is_available() and not args.cpu


def expected_world_size(args: argparse.Namespace) -> int:
    """World size as it will be once workers start (checked before spawning)."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if launcher == "slurm":
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    if args.multiprocessing_distributed:
        return _nproc_per_node(args) * args.world_size
    return args.world_size


def _nproc_per_node(args: argparse.Namespace) -> int:
    if args.nproc_per_node:
        return args.nproc_per_node
    return torch.cuda.device_count() if uses_cuda(args) else 1


def per_worker(total: int, world_size: int, what: str = "--batch-size") -> int:
    """Split a global quantity evenly over workers, or say plainly why it cannot be."""
    if total % world_size != 0:
        raise UserError(f"{what} {total} is not divisible by the world size {world_size}; "
                        f"use a multiple of {world_size}")
    return total // world_size


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
        nproc = _nproc_per_node(args)
        # a module-level function: a functools.wraps wrapper of `worker` cannot be pickled
        ctx = mp.spawn(_run_worker, nprocs=nproc, args=(worker, args), join=False)
        forwarded = _forward_preemption_signals(ctx.processes)
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


def _forward_preemption_signals(processes: list) -> List[int]:
    """`kill PARENT` (or SLURM signalling every process) must reach the spawned workers,
    which checkpoint and exit (common/preempt.py). The first SIGUSR1/SIGTERM is passed
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


def setup_distributed(local_rank: Optional[int], args: argparse.Namespace) -> DistEnv:
    """Join the process group (if any) and pick this worker's device."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        init_method = "env://"
    elif launcher == "slurm":
        s = slurm_env()
        rank, world, local, init_method = s["rank"], s["world_size"], s["local_rank"], s["init_method"]
        check_master_resolves(urlparse(init_method).hostname or "")
    else:
        local = local_rank or 0
        nproc = _nproc_per_node(args) if args.multiprocessing_distributed else 1
        rank = args.rank * nproc + local  # --rank is the node's rank
        world = expected_world_size(args)
        init_method = args.dist_url

    if launcher == "torchrun":
        m = re.match(r"\d+", os.environ.get("LOCAL_WORLD_SIZE", ""))
        local_procs = int(m.group()) if m else 1
    elif launcher == "slurm":
        local_procs = slurm_tasks_on_this_node()
    else:
        local_procs = _nproc_per_node(args) if args.multiprocessing_distributed else 1

    if uses_cuda(args):
        gpu = local if (world > 1 or args.gpu is None) else args.gpu
        visible = torch.cuda.device_count()
        if launcher is not None and visible == 1:
            gpu = 0  # srun --gpus-per-task / --gpu-bind: each task sees only its own GPU
        elif gpu >= visible:
            raise UserError(f"process {local} on this node needs GPU {gpu} but only {visible} are visible; "
                            f"start one process per GPU (e.g. --ntasks-per-node={visible})")
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if local_procs > 1:
            # CPU workers sharing a node: oversubscribed threads slow every worker down
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))

    distributed = world > 1
    if distributed and not dist.is_initialized():
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        _join_process_group(backend, init_method, world, rank)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, distributed=distributed,
                   local_world_size=max(local_procs, 1))


def rendezvous_timeout() -> float:
    """Seconds the processes wait for each other to join: DIST_RENDEZVOUS_TIMEOUT or RENDEZVOUS_TIMEOUT_S."""
    value = os.environ.get("DIST_RENDEZVOUS_TIMEOUT", "").strip()
    if not value:
        return RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"DIST_RENDEZVOUS_TIMEOUT={value!r} is not a positive number of seconds; set it to e.g. "
                        f"{RENDEZVOUS_TIMEOUT_S:.0f}, or unset it")
    return seconds


def _join_process_group(backend: str, init_method: str, world: int, rank: int) -> None:
    """init_process_group, with a tcp:// rendezvous bounded by rendezvous_timeout() and
    its failure told in one sentence naming the master address and the ranks."""
    url = urlparse(init_method)
    try:
        port = url.port
    except ValueError:  # out of range: torch's own rendezvous says so
        port = None
    if url.scheme != "tcp" or not url.hostname or port is None:
        # env:// (torchrun's agent has gathered the processes already) and file://
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world, rank=rank)
        return
    seconds = rendezvous_timeout()
    master = f"{url.hostname}:{port}"
    try:
        # what torch's tcp:// rendezvous builds, with the rendezvous timeout instead of the collective one
        store = dist.TCPStore(url.hostname, port, world, is_master=rank == 0, timeout=timedelta(seconds=seconds),
                              multi_tenant=True)
        # the backend's own handshake through the store is still part of the rendezvous
        dist.init_process_group(backend=backend, store=store, world_size=world, rank=rank)
    except RuntimeError as e:  # torch's DistError (2.3+) is a RuntimeError, as are gloo's connection errors
        raise UserError(_rendezvous_failure(str(e), rank, world, master, seconds)) from None
    # later store operations (NCCL's lazy communicator set-up, new groups) wait as long as collectives
    store.set_timeout(default_pg_timeout)


def _rendezvous_failure(error: str, rank: int, world: int, master: str, seconds: float) -> str:
    raise_it = "or raise DIST_RENDEZVOUS_TIMEOUT (seconds) if the processes just start slowly"
    if "already in use" in error.lower():
        return (f"rank 0 cannot listen on {master}: the port is in use (another run on this node?); pick a free "
                f"port (--dist-url tcp://HOST:PORT, or MASTER_PORT under SLURM)")
    timed_out = "timed out" in error.lower() or "timeout" in error.lower()
    if timed_out and rank > 0 and "connect" in error.lower():
        return (f"rank {rank} of {world} could not reach the master (rank 0) at {master} within {seconds:g} s; "
                f"check that rank 0 started and that {master} is its address (MASTER_ADDR, the first host of the "
                f"SLURM node list, or --dist-url) and not blocked by a firewall, {raise_it}")
    if timed_out:
        joined = re.search(r"(\d+)/\d+ clients joined", error)
        count = f"only {joined.group(1)} of the {world} processes" if joined else f"not all {world} processes"
        return (f"rank {rank} waited {seconds:g} s at {master} for the other {world - 1} rank(s), but {count} joined; "
                f"check that every rank started (their logs say why one did not) and can reach {master}, {raise_it}")
    first = error.strip().splitlines()[0] if error.strip() else "no reason given"
    return (f"rank {rank} of {world} could not join the process group at {master} ({first}); check that every "
            f"rank started (their logs say why one did not) and that {master} is rank 0's address and port")


# SIGUSR1/SIGTERM that arrived before the training loop took over (common/preempt.py)
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


def start_worker(local_rank: Optional[int], args: argparse.Namespace,
                 preemptible: bool = False) -> Tuple[DistEnv, int, int]:
    """Join the process group and seed this rank. Returns (env, per-process batch size,
    per-process data-loading workers). `preemptible`: the script checkpoints on
    SIGUSR1/SIGTERM (common/preempt.py), so one arriving before its loop is held for it
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
                main_worker: Callable[[Optional[int], argparse.Namespace], None]) -> Callable[..., None]:
    """A script's `main(argv=None)`: parse, finalize, start the workers; a UserError anywhere
    prints `script: error: <sentence>` and exits 2."""
    @report_user_errors
    def main(argv=None) -> None:
        launch(main_worker, finalize_args(get_args_parser().parse_args(argv)))

    return main
