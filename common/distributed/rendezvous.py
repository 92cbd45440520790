"""Joining the process group, for every launcher: rank, world and address from torchrun's
or SLURM's environment or the flags, a bounded rendezvous (RENDEZVOUS_TIMEOUT_S), and one
sentence naming the master when a rank cannot join."""
import argparse
import os
import re
from datetime import timedelta
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from common.distributed.collectives import DistEnv
from common.distributed.slurm import check_master_resolves, slurm_env, slurm_tasks_on_this_node
from common.distributed.world import detect_launcher, expected_world_size, nproc_per_node, uses_cuda
from common.errors import UserError

# How long the processes wait for each other to join the process group (seconds;
# DIST_RENDEZVOUS_TIMEOUT overrides it). torch's own bound is its 30-minute collective
# timeout, so a master that never comes up (a wrong address, a node that did not start)
# held the whole job that long. Collectives keep torch's timeout: ranks legitimately wait
# for rank 0's checkpoint writes or evaluation.
RENDEZVOUS_TIMEOUT_S = 300.0


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
        nproc = nproc_per_node(args) if args.multiprocessing_distributed else 1
        rank = args.rank * nproc + local  # --rank is the node's rank
        world = expected_world_size(args)
        init_method = args.dist_url

    if launcher == "torchrun":
        m = re.match(r"\d+", os.environ.get("LOCAL_WORLD_SIZE", ""))
        local_procs = int(m.group()) if m else 1
    elif launcher == "slurm":
        local_procs = slurm_tasks_on_this_node()
    else:
        local_procs = nproc_per_node(args) if args.multiprocessing_distributed else 1

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
