"""The shape of a run before any process starts: which launcher started this process
(torchrun, srun, or none), how many processes the flags ask for and the per-process batch (the distributed
flags themselves: common/cli/groups.py)."""
import argparse
import os
from typing import Optional

import torch

from common.errors import UserError


def detect_launcher() -> Optional[str]:
    """'torchrun' or 'slurm' when an external launcher started this process, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return "torchrun"
    ntasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    if "SLURM_PROCID" in env and ntasks is not None and int(ntasks) > 1:
        return "slurm"
    return None


def is_first_process(args: argparse.Namespace) -> bool:
    """Whether this process is (or, for --multiprocessing-distributed, spawns) global rank 0:
    the one that holds the output folder's lock, known before any worker starts."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        return os.environ["RANK"] == "0"
    if launcher == "slurm":
        return os.environ["SLURM_PROCID"] == "0"
    return args.rank == 0


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
        return nproc_per_node(args) * args.world_size
    return args.world_size


def nproc_per_node(args: argparse.Namespace) -> int:
    if args.nproc_per_node:
        return args.nproc_per_node
    return torch.cuda.device_count() if uses_cuda(args) else 1


def per_worker(total: int, world_size: int, what: str = "--batch-size") -> int:
    """Split a global quantity evenly over workers, or say plainly why it cannot be."""
    if total % world_size != 0:
        raise UserError(f"{what} {total} is not divisible by the world size {world_size}; "
                        f"use a multiple of {world_size}")
    return total // world_size
