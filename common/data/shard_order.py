"""The training order over shards: each rank reads a run of whole shards front to back, the
shards' order reshuffled every epoch from the run's seed, and mixes the samples it reads in a
seeded shuffle buffer (docs/shards.md). The order is a function of (seed, epoch, rank, world
size) alone, so a mid-epoch resume skips the samples done and continues exactly, as
common/data/loader.py's ResumableSampler does for folders; it yields the same
`(index, seed)` keys, so the per-sample augmentation seeds are the folder path's.

Uneven shards: the epoch's shards, in their shuffled order, are cut into `world` runs of
equal length (a rank's run starts and ends inside at most two shards), so no rank waits for
another and no sample is read twice. What cannot fill a whole batch on every rank (fewer
than world x batch samples, at the end of the epoch's order, so other ones each epoch) is
left out and counted by `left_out`, as drop_last does for folders."""
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from common.data.seeding import sample_seed


class ShardOrderSampler(Sampler):
    """`spans[s]` = (first sample index, sample count) of shard s; `buffer`: the shuffle
    buffer's size in samples (0: the shards' own order, the most sequential reads)."""

    def __init__(self, spans: Sequence[Tuple[int, int]], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 buffer: int = 1000, keep: Optional[Sequence[int]] = None):
        self.spans, self.num_replicas, self.rank = list(spans), num_replicas, rank
        self.seed, self.buffer = seed, buffer
        # keep: the samples of a SubsetDataset of the shards (the pretraining images without the
        # payoff's held-out ones); the order then yields positions in it
        self.position = None
        if keep is not None:
            size = sum(n for _, n in self.spans)
            self.position = np.full(size, -1, dtype=np.int64)
            self.position[np.asarray(keep, dtype=np.int64)] = np.arange(len(keep))
            kept = self.position >= 0
            self.counts = [int(kept[a:a + n].sum()) for a, n in self.spans]
        else:
            self.counts = [n for _, n in self.spans]
        self.total = sum(self.counts)
        self.num_samples = self.total // num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def shard_order(self) -> List[int]:
        """This epoch's order of the shards (the same on every rank)."""
        order = list(range(len(self.spans)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def stream(self) -> np.ndarray:
        """This rank's samples in the order its shards are read: its run of the epoch's shard
        order (only the shards it overlaps are expanded: a rank holds its own share, not the set's)."""
        lo, hi = self.rank * self.num_samples, (self.rank + 1) * self.num_samples
        runs, at = [], 0
        for s in self.shard_order():
            a, n = self.spans[s]
            count = self.counts[s]
            if at + count > lo and at < hi:
                run = np.arange(a, a + n, dtype=np.int64)
                if self.position is not None:
                    run = self.position[run]
                    run = run[run >= 0]
                runs.append(run[max(lo - at, 0):min(hi - at, count)])
            at += count
            if at >= hi:
                break
        return np.concatenate(runs) if runs else np.zeros(0, np.int64)

    def indices(self) -> List[int]:
        """The stream through the shuffle buffer: fill it, then each sample read replaces one
        drawn at random, which is handed on; the last `buffer` are handed on in random order."""
        stream = self.stream().tolist()
        if self.buffer <= 1:
            return stream
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 10_007 + self.rank)
        buf, out = stream[:self.buffer], []
        for idx in stream[self.buffer:]:
            j = rng.randrange(len(buf))
            out.append(buf[j])
            buf[j] = idx
        rng.shuffle(buf)
        return out + buf

    def left_out(self, batch_size: int) -> int:
        """Samples of an epoch that no rank trains on: the rest of the cut into equal runs and
        of each run into whole batches of `batch_size` (per rank)."""
        return self.total - self.num_replicas * (self.num_samples // batch_size) * batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for pos, idx in enumerate(self.indices()):
            if pos >= self.start:
                yield idx, sample_seed(self.seed, self.epoch, idx)

    def __len__(self) -> int:
        return self.num_samples - self.start
