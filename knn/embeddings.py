"""The embeddings of a split: the backbone's L2-normalised features of its readable images,
and their export as .npy/.csv files that name each row's image."""
import argparse
import csv
import os
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common.dist.collectives import DistEnv
from common.eval.features import extract_indexed_features
from common.eval.setup import eval_view
from common.nets.models import without_head
from common.train.precision import Precision


def embed(model: nn.Module, dataset: Dataset, split: str, args: argparse.Namespace, env: DistEnv, batch_size: int,
          workers: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, index) of `dataset`: each rank embeds its share, every rank gets all
    of them (fp16, on the device). An unreadable image gets no row (see eval_view): `index`
    maps rows to dataset indices."""
    with without_head(model):
        return extract_indexed_features(model, eval_view(dataset, args), batch_size, env.device, workers=workers,
                                        precision=Precision.from_args(args), print_freq=args.print_freq,
                                        desc=f"features {split}")


def path_of(dataset: Dataset, index: int) -> str:
    """The image file behind `index` (its index where the dataset has no files, e.g. CIFAR)."""
    return dataset.path(index) if hasattr(dataset, "path") else str(index)


def class_name(classes: Sequence[str], label: int) -> str:
    """The class of `label`; "" for an unlabelled image (-1)."""
    return classes[label] if 0 <= label < len(classes) else ""


def export_embeddings(folder: str, split: str, feats: torch.Tensor, labels: torch.Tensor, base: Dataset,
                      index: torch.Tensor, classes: Sequence[str], dtype: str) -> None:
    """`{split}_features.npy` (N x D), `{split}_labels.npy` (N, -1 = unlabelled) and
    `{split}.csv` (index, path, label, class): row i of each is the image `index[i]` of
    `base` (the csv's index, as in retrieval's captions.csv), the readable images in
    dataset order; the unreadable ones (no features) are listed in `{split}_unreadable.csv`
    (path, label, class). The features are copied to a memory-mapped file in slices, so no
    second full copy is made in RAM."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{split}_features.npy")
    tmp = os.path.join(folder, f".tmp_{split}_features.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(feats.shape))
    for s in range(0, feats.shape[0], 65536):
        out[s:s + 65536] = feats[s:s + 65536].float().cpu().numpy().astype(dtype)
    out.flush()
    del out
    os.replace(tmp, path)
    labels = labels.long().cpu().numpy()
    np.save(os.path.join(folder, f"{split}_labels.npy"), labels)
    with open(os.path.join(folder, f"{split}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "label", "class"])
        for j, lab in zip(index.tolist(), labels.tolist()):
            w.writerow([j, path_of(base, j), lab, class_name(classes, lab)])
    unreadable = sorted(set(range(len(base))) - set(index.tolist()))
    listed = os.path.join(folder, f"{split}_unreadable.csv")
    if not unreadable:
        if os.path.exists(listed):  # from an earlier export into this folder
            os.remove(listed)
        return
    targets = getattr(base, "targets", None)
    with open(listed, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "class"])
        for j in unreadable:
            lab = int(targets[j]) if targets is not None else -1
            w.writerow([path_of(base, j), lab, class_name(classes, lab)])
