"""Noticing a contrastive task that fails: one that collapses (the accuracy of picking the
positive rose, then fell back: MoCo with a queue that holds much of a small dataset, or too
high an lr), and one that never leaves chance (augmentations that leave two views of an
image no more alike than views of different images)."""
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
