"""The process group once it exists: this worker's `DistEnv`, rank helpers and the
collectives the methods use (gathers with and without gradient, reductions). How the
processes are started and joined is common/distributed/launch.py."""
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    local_world_size: int = 1  # processes on this node (splits -j and CPU threads between them)
    seed: int = 0  # the run's seed, the same on every rank (launch.start_worker agrees on rank 0's)


def agree_seed(seed: int, env: DistEnv) -> int:
    """Rank 0's seed on every rank. torchrun and srun start each process on its own, and
    processes that drew their own seeds would shuffle the data differently (samples seen
    twice or never in an epoch)."""
    if not env.distributed:
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=env.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return get_rank() == 0


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------- gather helpers

@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradients (MoCo keys, kNN features)."""
    world = get_world_size()
    if world == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the gradient of its own slice,
    summed over all ranks' losses (torch.distributed.all_gather drops it)."""

    @staticmethod
    def forward(ctx, tensor):
        world = dist.get_world_size()
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph (SimCLR negatives from every rank)."""
    if get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
