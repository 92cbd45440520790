"""Class balance for the classifier: oversampling minority classes
(`--balanced-sampling`) and loss weights per class (`--class-weights`)."""
from typing import List, Sequence

import torch
from torch.utils.data import WeightedRandomSampler

from common.data.loader import ResumableSampler
from common.data.subsets import class_counts


def balanced_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weight 1 / (images of its class): every class is drawn equally often."""
    counts = torch.tensor(class_counts(targets, num_classes), dtype=torch.double)
    return 1.0 / counts.clamp(min=1)[torch.as_tensor(list(targets), dtype=torch.long)]


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Loss weight per class, N / (C * n_c) (sklearn's 'balanced'); 1 for a balanced set."""
    counts = torch.tensor(class_counts(targets, num_classes), dtype=torch.float)
    return len(targets) / (num_classes * counts.clamp(min=1))


class BalancedSampler(ResumableSampler):
    """ResumableSampler drawing with replacement, each sample with probability
    proportional to 1 / (its class size) (torch's WeightedRandomSampler), so minority
    classes are oversampled. The draw depends only on (seed, epoch), every rank takes
    its share of one global draw, and mid-epoch starts work as in ResumableSampler."""

    def __init__(self, targets: Sequence[int], num_classes: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(len(targets), num_replicas, rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.weights = balanced_weights(targets, num_classes)

    def indices(self) -> List[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        total = self.num_samples * self.num_replicas
        order = list(WeightedRandomSampler(self.weights, total, replacement=True, generator=g))
        return order[self.rank::self.num_replicas]
