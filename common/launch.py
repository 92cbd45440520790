"""How a script's processes start, for every launcher: a single process (CPU or one GPU),
`mp.spawn` (`--multiprocessing-distributed`), torchrun and SLURM's srun.

`script_main` parses and finalizes the flags and calls `launch(main_worker, args)`; each
worker calls `start_worker`, which joins the process group (`setup_distributed`), agrees on
the seed and returns a `DistEnv`. SLURM's environment (nodelist, tasks per node) and the
preemption signals that arrive before a training loop takes over are handled here too.
Only global rank 0 prints and writes files (`common.dist.is_main_process()`).
"""
import argparse
import os
import random
import re
import shutil
import signal
import subprocess
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.dist import DistEnv, agree_seed
from common.errors import UserError, report_user_errors


def detect_launcher() -> Optional[str]:
    """'torchrun' or 'slurm' when an external launcher started this process, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return "torchrun"
    ntasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    if "SLURM_PROCID" in env and ntasks is not None and int(ntasks) > 1:
        return "slurm"
    return None


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM nodelist: 'node[01-03,07],gpu-a1' -> ['node01', 'node02', 'node03', 'node07', 'gpu-a1']."""
    # split on commas that are not inside brackets
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise UserError(f"cannot parse SLURM nodelist {nodelist!r}: misplaced brackets; "
                            f"set MASTER_ADDR to the first host of the job instead")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise UserError(f"cannot parse SLURM nodelist {nodelist!r}: unbalanced brackets")
    parts.append(cur)

    hosts: List[str] = []
    for part in filter(None, parts):
        m = re.search(r"\[([^\]]*)\]", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, suffix = part[: m.start()], part[m.end():]
        for item in m.group(1).split(","):
            if not re.fullmatch(r"\d+(-\d+)?", item.strip()):
                raise UserError(f"cannot parse SLURM nodelist {nodelist!r}: {item!r} is not a number or range; "
                                f"set MASTER_ADDR to the first host of the job instead")
            item = item.strip()
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    # suffix may hold more bracket groups: expand recursively
                    hosts.extend(expand_nodelist(f"{prefix}{i:0{width}d}{suffix}"))
            else:
                hosts.extend(expand_nodelist(f"{prefix}{item}{suffix}"))
    if not hosts:
        raise UserError(f"SLURM nodelist {nodelist!r} names no host; set MASTER_ADDR to the first host of the job")
    return hosts


def slurm_master_addr(nodelist: str) -> str:
    """First host of the job; `scontrol show hostnames` when SLURM is installed, else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def _slurm_env() -> dict:
    env = os.environ
    # the step's nodelist (srun) can be a subset of the job's; rank 0 runs on its first host
    nodelist_key = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
    required = ["SLURM_PROCID", "SLURM_LOCALID"]
    required += [] if env.get("MASTER_ADDR") else [nodelist_key]
    required += [] if env.get("MASTER_PORT") else ["SLURM_JOB_ID"]
    missing = [k for k in required if not env.get(k)]
    if missing:
        raise UserError(f"SLURM launch is missing {', '.join(missing)}; start the script with "
                        f"`srun` inside an sbatch job (see slurm/pretrain.sbatch), or set them yourself")

    def number(key: str, value: str) -> int:
        if not value.strip().isdigit():
            raise UserError(f"{key}={value!r} is not a number; start the script with `srun` inside an sbatch job")
        return int(value)

    ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    ntasks = number(ntasks_key, env.get(ntasks_key, "1"))
    rank, local = number("SLURM_PROCID", env["SLURM_PROCID"]), number("SLURM_LOCALID", env["SLURM_LOCALID"])
    if rank >= ntasks:
        raise UserError(f"SLURM_PROCID {rank} is not below {ntasks_key} {ntasks}; start the script with `srun`")
    addr = env.get("MASTER_ADDR") or slurm_master_addr(env[nodelist_key])
    # a port derived from the job id: jobs sharing a node do not collide, and a requeued
    # job (same id) finds the same address again
    if env.get("MASTER_PORT"):
        port = number("MASTER_PORT", env["MASTER_PORT"])
    else:
        port = 15000 + number("SLURM_JOB_ID", env["SLURM_JOB_ID"]) % 20000
    return {"rank": rank, "world_size": ntasks, "local_rank": local, "init_method": f"tcp://{addr}:{port}"}


def _slurm_tasks_on_this_node() -> int:
    """Tasks of this step on this node. SLURM writes e.g. '4(x2),3': the count per node, in
    node order; SLURM_NODEID says which node this is."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", ""))
    counts: List[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return 1
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(os.environ.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else (counts[0] if counts else 1)


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
    wrapped = report_user_errors(worker)
    launcher = detect_launcher()
    if launcher is not None and args.multiprocessing_distributed:
        # srun/torchrun already started one process per task; spawning more would
        # silently run a different world size than the one asked for
        raise UserError(f"--multiprocessing-distributed cannot be combined with {launcher}, which already "
                        f"started {expected_world_size(args)} processes; drop the flag and start one "
                        f"process per GPU (srun --ntasks-per-node=GPUS, torchrun --nproc_per_node=GPUS)")
    if launcher is None and args.multiprocessing_distributed:
        nproc = _nproc_per_node(args)
        try:
            # a module-level function: a functools.wraps wrapper of `worker` cannot be pickled
            ctx = mp.spawn(_spawned_worker, nprocs=nproc, args=(worker, args), join=False)
            _forward_preemption_signals(ctx.processes)
            while not ctx.join():
                pass
        except mp.ProcessExitedException as e:
            # the worker already printed its one-line error; do not add mp's traceback
            raise SystemExit(e.exit_code or 1)
    else:
        wrapped(None, args)


def _spawned_worker(local_rank: int, worker: Callable[[Optional[int], argparse.Namespace], None],
                    args: argparse.Namespace) -> None:
    report_user_errors(worker)(local_rank, args)


def _forward_preemption_signals(processes: list) -> None:
    """`kill PARENT` (or SLURM signalling every process) must reach the spawned workers,
    which checkpoint and exit (common/preempt.py). The first SIGUSR1/SIGTERM is passed
    on as SIGUSR1, so a worker signalled directly as well still sees one request; a
    later SIGTERM is passed on as SIGTERM, which ends the workers at once."""
    received = []

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


def setup_distributed(local_rank: Optional[int], args: argparse.Namespace) -> DistEnv:
    """Join the process group (if any) and pick this worker's device."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        init_method = "env://"
    elif launcher == "slurm":
        s = _slurm_env()
        rank, world, local, init_method = s["rank"], s["world_size"], s["local_rank"], s["init_method"]
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
        local_procs = _slurm_tasks_on_this_node()
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
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world, rank=rank)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, distributed=distributed,
                   local_world_size=max(local_procs, 1))


# SIGUSR1/SIGTERM that arrived before the training loop took over (common/preempt.py)
_early_preemption: List[int] = []


def hold_preemption_signals() -> None:
    """From a worker's start until the training loop installs its own handlers, remember a
    SLURM preemption signal instead of dying of it (SIGUSR1's default action): the loop
    then checkpoints after its first step and the job is requeued."""
    def remember(signum, frame):
        if _early_preemption and signum == signal.SIGTERM:  # asked twice: end now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _early_preemption.append(signum)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, remember)


def early_preemption_signal() -> Optional[int]:
    """The first SIGUSR1/SIGTERM received while held, or None."""
    return _early_preemption[0] if _early_preemption else None


def start_worker(local_rank: Optional[int], args: argparse.Namespace,
                 preemptible: bool = False) -> Tuple[DistEnv, int, int]:
    """Join the process group and seed this rank. Returns (env, per-process batch size,
    per-process data-loading workers). `preemptible`: the script checkpoints on
    SIGUSR1/SIGTERM (common/preempt.py), so one arriving before its loop is held for it."""
    if preemptible:
        hold_preemption_signals()
    env = setup_distributed(local_rank, args)
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
