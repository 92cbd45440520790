"""Noticing a contrastive task that collapses: the accuracy of picking the positive rose,
then fell back (MoCo with a queue that holds much of a small dataset, or too high an lr)."""
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
