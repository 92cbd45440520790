"""Label subsets: a stratified fraction of a labelled set (`--label-fraction`), saved and
re-read as a list of files so another run or script evaluates on the same images."""
import json
import math
import os
from typing import List, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from common.errors import UserError, reason


class SubsetDataset(Dataset):
    """The images `indices` of `base`, keeping `targets`, `classes` and `path` (torch's
    Subset drops them)."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        self.classes = list(getattr(base, "classes", []))
        base_targets = getattr(base, "targets")
        self.targets = [int(base_targets[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]

    def path(self, index: int) -> str:
        i = self.indices[index]
        return self.base.path(i) if hasattr(self.base, "path") else str(i)


def class_counts(targets: Sequence[int], num_classes: int) -> List[int]:
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)
    return [int(c) for c in counts[:num_classes]]


def stratified_subset(targets: Sequence[int], fraction: float, seed: int = 0,
                      class_names: Optional[Sequence[str]] = None) -> List[int]:
    """Indices of a class-stratified `fraction` of the samples: round(fraction * n_c)
    images of every class c, drawn without replacement from a generator seeded by
    `seed` alone (not the run's seed), so every run, method and machine gets the same
    subset. A class left with no image is an error, not a silently smaller problem."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen: List[int] = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        keep = int(math.floor(fraction * len(members) + 0.5))
        if keep == 0:
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            raise UserError(f"--label-fraction {fraction} leaves class {name!r} ({len(members)} images) with no "
                            f"labelled image; use a fraction of at least {1.0 / len(members):.3g}")
        chosen += rng.choice(members, size=keep, replace=False).tolist()
    return sorted(chosen)


def save_subset(path: str, indices: Sequence[int], dataset: Dataset, fraction: float, seed: int) -> None:
    """Write a label subset as JSON (indices, plus paths so a changed dataset is noticed)."""
    record = {"fraction": fraction, "seed": seed, "dataset_size": len(dataset), "num_images": len(indices),
              "indices": [int(i) for i in indices],
              "paths": [dataset.path(i) for i in indices] if hasattr(dataset, "path") else []}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def load_subset(path: str, dataset: Dataset) -> List[int]:
    """Read a subset written by save_subset and check it still names the same images."""
    if not os.path.isfile(path):
        raise UserError(f"label subset file {path!r} does not exist; pass a label_subset.json written by main_lincls.py")
    try:
        with open(path) as f:
            record = json.load(f)
        indices = [int(i) for i in record["indices"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path!r} is not a label subset file ({reason(e)}); "
                        f"pass a label_subset.json written by main_lincls.py")
    if record.get("dataset_size") != len(dataset) or (indices and max(indices) >= len(dataset)):
        raise UserError(f"label subset {path!r} was drawn from {record.get('dataset_size')} images but the training "
                        f"set has {len(dataset)}; draw a new one with --label-fraction")
    paths = record.get("paths") or []
    if paths and hasattr(dataset, "path") and any(dataset.path(i) != p for i, p in zip(indices, paths)):
        raise UserError(f"label subset {path!r} names images that are not at the same positions in this training "
                        f"set; draw a new one with --label-fraction")
    return indices
