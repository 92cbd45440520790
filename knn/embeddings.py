"""The export of a split's embeddings (common/eval/embeddings.py computes them): --export-format
npy: .npy + .csv files that name each row's image; csv / parquet: one table, knn/tables.py."""
import csv
import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.eval.embeddings import class_name, path_of
from common.files.atomic import atomic_path
from knn.tables import SLICE, dataset_labels, write_csv, write_parquet


EXPORT_FORMATS = ("npy", "csv", "parquet")


def export_embeddings(folder: str, split: str, feats: torch.Tensor, labels: torch.Tensor, base: Dataset,
                      index: torch.Tensor, classes: Sequence[str], dtype: str, fmt: str = "npy") -> str:
    """The split's embeddings in `folder`; returns what was written, for the log.

    npy: `{split}_features.npy` (N x D), `{split}_labels.npy` (N, -1 = unlabelled) and
    `{split}.csv` (index, path, label, class): row i of each is the image `index[i]` of
    `base` (the csv's index, as in retrieval's captions.csv), the readable images in
    dataset order. csv / parquet: `{split}_embeddings.csv|.parquet`, one row per image of
    `base` in its order (knn/tables.py). Every format lists the unreadable images (no
    features) in `{split}_unreadable.csv` (path, label, class). Each file is written under
    a temporary name and renamed into place."""
    os.makedirs(folder, exist_ok=True)
    if fmt == "npy":
        written = _write_npy(folder, split, feats, labels, base, index, classes, dtype)
    else:
        every = dataset_labels(base, index, labels)
        names = [(path_of(base, j), class_name(classes, int(every[j]))) for j in range(len(base))]
        written = os.path.join(folder, f"{split}_embeddings.{fmt}")
        (write_csv if fmt == "csv" else write_parquet)(written, feats, index, base, every, names, dtype)
    unreadable = sorted(set(range(len(base))) - set(index.tolist()))
    listed = os.path.join(folder, f"{split}_unreadable.csv")
    if not unreadable:
        if os.path.exists(listed):  # from an earlier export into this folder
            os.remove(listed)
        return written
    targets = getattr(base, "targets", None)
    with atomic_path(listed) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "class"])
        for j in unreadable:
            lab = int(targets[j]) if targets is not None else -1
            w.writerow([path_of(base, j), lab, class_name(classes, lab)])
    return written


def _write_npy(folder: str, split: str, feats: torch.Tensor, labels: torch.Tensor, base: Dataset,
               index: torch.Tensor, classes: Sequence[str], dtype: str) -> str:
    """The features are copied to a memory-mapped file in slices, so no second full copy is
    made in RAM."""
    with atomic_path(os.path.join(folder, f"{split}_features.npy")) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(feats.shape))
        for s in range(0, feats.shape[0], SLICE):
            out[s:s + SLICE] = feats[s:s + SLICE].float().cpu().numpy().astype(dtype)
        out.flush()
        del out
    labels = labels.long().cpu().numpy()
    with atomic_path(os.path.join(folder, f"{split}_labels.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, labels)
    with atomic_path(os.path.join(folder, f"{split}.csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "label", "class"])
        for j, lab in zip(index.tolist(), labels.tolist()):
            w.writerow([j, path_of(base, j), lab, class_name(classes, lab)])
    return os.path.join(folder, f"{split}_features.npy")
