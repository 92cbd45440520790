"""Noticing a contrastive task that fails: one that collapses (the accuracy of picking the
positive rose, then fell back: MoCo with a queue that holds much of a small dataset, or too
high an lr), and one that never leaves chance (augmentations that leave two views of an
image no more alike than views of different images). For the methods without negatives
(BYOL, SimSiam) the output itself can collapse to one vector: StdWatch."""
import math
from typing import Optional

FALL = 0.5  # a fall below this share of the best epoch's accuracy is called a collapse
RISEN = 50.0  # ...once the accuracy had reached this (percent); early noise is not a collapse


class CollapseWatch:
    """Keeps the best epoch's contrastive accuracy (`acc1`, percent) and returns a sentence
    for the epoch line when an epoch's accuracy fell below FALL of it."""

    def __init__(self, hint: str):
        self.hint = hint  # the method's likely causes, e.g. "lower --moco-k"
        self.best, self.best_epoch = 0.0, -1

    def update(self, epoch: int, acc1: float) -> Optional[str]:
        message = None
        if self.best >= RISEN and acc1 < FALL * self.best:
            message = (f"the contrastive accuracy fell from {self.best:.1f}% (epoch {self.best_epoch}) to {acc1:.1f}%: "
                       f"the task collapsed and the features stop improving; {self.hint}")
        if acc1 > self.best:
            self.best, self.best_epoch = acc1, epoch
        return message


NEAR_CHANCE = 5.0  # an accuracy below this many times chance has found no instance signal


class LearningWatch:
    """Compares each epoch's contrastive accuracy (`acc1`, percent) with chance (percent:
    100 / candidates) and returns a sentence for the epoch line while it stays below
    NEAR_CHANCE times chance. The first epoch is not judged: MoCo's queue starts as random
    vectors, which make its first accuracy look far better than it is. So the check speaks
    from the second epoch on (the first in a one-epoch run): long before a tenth of a
    small-data budget. NEAR_CHANCE sits between a run that never learned and a slow one that
    did (measured: docs/small-data.md, Why these values: the not-learning level). Nor are the
    epochs of the lr warmup (`warmup_epochs`, e.g. the tenth of the run SimCLR's --recipe small
    sets): the lr is still rising there, so a slow start is the schedule, not the views (the
    warning used to fire in warmup and be gone an epoch after). The run's last epoch is always
    judged. `stuck_epochs` counts the epochs in a row it has spoken."""

    stats = ("acc1",)  # the epoch average it judges (PretrainRun.end_epoch)

    def __init__(self, chance: float, epochs: int, hint: str, warmup_epochs: float = 0.0):
        self.chance, self.epochs, self.hint = chance, epochs, hint
        self.first_judged = max(1, math.ceil(warmup_epochs))  # the first epoch wholly past the warmup
        self.stuck_epochs = 0

    def update(self, epoch: int, acc1: float) -> Optional[str]:
        if (epoch < self.first_judged and epoch + 1 < self.epochs) or acc1 >= NEAR_CHANCE * self.chance:
            self.stuck_epochs = 0
            return None
        self.stuck_epochs += 1
        return (f"the contrastive accuracy is {acc1:.2f}% against {self.chance:.2f}% by chance: the run is not "
                f"learning (the augmentations leave two views of an image no more alike than views of different "
                f"images); try {self.hint}")

    def step(self, value: float) -> Optional[str]:
        """Judged per epoch only: one batch's accuracy is too noisy, and MoCo's first epoch is
        not judged at all."""
        return None


STD_FLOOR = 0.3  # an output std below this share of 1/sqrt(d) is called collapsed (docs/byol.md: the levels)
RANK_FLOOR = 2.5  # an effective rank of the batch's outputs below this is called collapsed (docs/byol.md)
RANK_MIN_WIDTH = 16  # ...judged only where min(batch per process, d) reaches this: 2 images have rank <= 1


class StdWatch:
    """The collapse watch of BYOL and SimSiam, on two statistics of the l2-normalised online
    projection. `std`: the std over the batch of each dimension, averaged over the d dimensions
    (SimSiam section 4.1), against 1/sqrt(d), what an output spread over the unit sphere gives
    (one vector for every image gives 0). `rank`: the effective rank of the batch's outputs
    (byol/loss.py effective_rank), about 1 for one line (every image +v or -v), which a last
    BatchNorm without affine (SimSiam's projector) holds at a healthy std. The rank is judged
    only with `judge_rank` (an output that ends in such a BatchNorm: the std cannot see its
    collapse) and where min(batch per process, d) reaches RANK_MIN_WIDTH: healthy BYOL outputs,
    with no last BatchNorm, vary along few directions too (measured: docs/byol.md), and the std
    sees their collapse. It speaks at every progress line (`step`,
    the last step's values on this process: a run that collapses is told within a few print
    intervals of the collapse) and per epoch (`update`, on the epoch's averages over every rank,
    so that all ranks agree on --stop-if-not-learning), which feeds the not-learning warning,
    metrics.jsonl's not_learning and --stop-if-not-learning. An untrained network's projection
    is already spread (measured: docs/byol.md), so no epoch is left unjudged. `stuck_epochs`
    counts the epochs in a row it has spoken."""

    stats = ("std", "rank")

    def __init__(self, dim: int, hint: str, batch: int = RANK_MIN_WIDTH, judge_rank: bool = False,
                 floor: float = STD_FLOOR, rank_floor: float = RANK_FLOOR):
        self.level = floor / math.sqrt(dim)
        self.rank_level = rank_floor if judge_rank and min(batch, dim) >= RANK_MIN_WIDTH else 0.0
        self.dim, self.hint = dim, hint
        self.stuck_epochs = 0
        self.told = False  # the progress lines warn once per collapse, not every line

    def message(self, std: float, rank: float) -> Optional[str]:
        """The sentence for a collapsed output; None for a healthy one."""
        if std < self.level:
            return (f"the output std is {std:.4f} against {1 / math.sqrt(self.dim):.4f} (1/sqrt({self.dim})) for an "
                    f"output spread over the sphere: the output collapsed (every image gets nearly the same vector) "
                    f"and the features stop improving; try {self.hint}")
        if rank < self.rank_level:
            return (f"the effective rank of the batch's outputs is {rank:.3f} (below {self.rank_level:g}; 1 is one "
                    f"line) though the output std is {std:.4f}: the output collapsed onto (nearly) one direction, "
                    f"every image +v or -v, and the features stop improving; try {self.hint}")
        return None

    def step(self, std: float, rank: float = math.inf) -> Optional[str]:
        """A progress line's values: a sentence when either fell below its level (once, until it recovers)."""
        message = self.message(std, rank)
        if message is None:
            self.told = False
            return None
        if self.told:
            return None
        self.told = True
        return message

    def update(self, epoch: int, std: float, rank: float = math.inf) -> Optional[str]:
        """The epoch's sentence, judged on its averages over all ranks."""
        message = self.message(std, rank)
        self.stuck_epochs = self.stuck_epochs + 1 if message else 0
        return message
