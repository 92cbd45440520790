"""A process's batches: the sampler that makes resume exact (`(index, seed)` keys, a
mid-epoch start) and the DataLoader every script builds around it."""
import math
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.data.seeding import sample_seed
from common.data.shard_order import ShardOrderSampler
from common.data.shard_reader import ShardDataset
from common.data.subsets import SubsetDataset
from common.data.transformed import TransformedDataset
from common.distributed.collectives import DistEnv
from common.distributed.signals import ignore_preemption_signals


class ResumableSampler(Sampler):
    """DistributedSampler that yields `(index, seed)` keys and can start mid-epoch.

    The permutation depends only on (seed, epoch); each rank takes every
    world_size-th element, padded so all ranks see the same number of batches.
    `set_epoch(epoch, start_sample)` skips the first `start_sample` samples of this
    rank (a mid-epoch resume continues without repeating or skipping samples).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if drop_last:
            self.num_samples = length // num_replicas
        else:
            self.num_samples = math.ceil(length / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        if total > len(order):
            order += order[: total - len(order)]
        return order[:total][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for pos, idx in enumerate(self.indices()):
            if pos < self.start:
                continue
            # one seed per (run seed, epoch, sample): augmentations independent of workers/resume
            yield idx, sample_seed(self.seed, self.epoch, idx)

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loader(dataset: Dataset, batch_size: int, env: DistEnv, workers: int, seed: int,
                shuffle: bool = True, drop_last: bool = True,
                sampler: Optional[ResumableSampler] = None,
                collate_fn: Optional[Callable] = None) -> Tuple[DataLoader, ResumableSampler]:
    """Per-process loader over this rank's share, batches of `batch_size` (per worker).
    `sampler` replaces the default one (e.g. lincls.balance.BalancedSampler); `collate_fn`
    the default collation (e.g. common.augment.gpu_decode.collate_encoded)."""
    base = dataset.base if isinstance(dataset, TransformedDataset) else dataset
    keep = None
    if isinstance(base, SubsetDataset) and isinstance(base.base, ShardDataset):
        base, keep = base.base, base.indices
    if sampler is None and shuffle and isinstance(base, ShardDataset):
        # shards are read front to back, a run of them per rank (common/data/shard_order.py)
        sampler = ShardOrderSampler(base.spans, env.world_size, env.rank, seed=seed, buffer=base.shuffle_buffer,
                                    keep=keep)
    if sampler is None:
        sampler = ResumableSampler(len(dataset), env.world_size, env.rank, shuffle=shuffle, seed=seed,
                                   drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=env.device.type == "cuda", drop_last=drop_last,
                        persistent_workers=workers > 0, collate_fn=collate_fn, prefetch_factor=4 if workers > 0 else None,
                        worker_init_fn=ignore_preemption_signals,
                        # the loader draws its workers' base seed when an epoch's iterator starts; from
                        # its own generator, so that draw does not shift the global RNG a mid-epoch
                        # checkpoint saved (augmentations are seeded per sample, not by this seed)
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler
