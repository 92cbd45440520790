"""The images a run looks at, from every split, as one table: row i has a feature, a
label (-1: unlabelled), a split name and the image behind it; and the splits it reads."""
import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from common.data.datasets import build_dataset, read_channels
from common.data.display import to_display
from common.data.images import FileListDataset, image_folder
from common.errors import UserError
from common.eval.embeddings import class_name, path_of


@dataclass
class Items:
    feats: torch.Tensor  # N x D, L2-normalised after centring, fp16, on the device
    labels: torch.Tensor  # N, long, on the CPU; -1 = unlabelled
    splits: List[str]
    paths: List[str]
    classes: List[str]
    sources: List[Tuple[Dataset, int]]  # (dataset, index) of each row, to show the image
    bands: Optional[Sequence[int]] = None  # --show-bands: what a full-depth image is shown as

    def __len__(self) -> int:
        return len(self.paths)

    def class_of(self, label: int) -> str:
        return class_name(self.classes, int(label))

    def image(self, row: int) -> Image.Image:
        """Row `row`'s image as a picture to show: an RGB image as read, a full-depth (C, H, W)
        tensor as gray or its --show-bands triple, stretched (common/data/display.py)."""
        base, i = self.sources[row]
        img = base[i][0]
        return img if isinstance(img, Image.Image) else to_display(img, self.bands)


def centre(feats: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Features minus their mean, re-normalised, in place (fp16, chunk by chunk: no fp32
    copy of the whole). A backbone's features share a large common component (a random
    init's cosines are all near 1); without it cosine thresholds mean the same for every
    backbone."""
    mean = torch.zeros(feats.shape[1], dtype=torch.float32, device=feats.device)
    for s in range(0, len(feats), chunk):
        mean += feats[s:s + chunk].float().sum(0)
    mean /= max(len(feats), 1)
    for s in range(0, len(feats), chunk):
        feats[s:s + chunk] = F.normalize(feats[s:s + chunk].float() - mean, dim=1).half()
    return feats


def join_splits(parts: Sequence[Tuple[str, Dataset, torch.Tensor, torch.Tensor, torch.Tensor]],
                classes: Sequence[str], bands: Optional[Sequence[int]] = None) -> Items:
    """One table from (split name, dataset, features, labels, index) of each split; `bands`:
    --show-bands."""
    feats, labels, splits, paths, sources = [], [], [], [], []
    for name, base, f, lab, index in parts:
        feats.append(f)
        labels.append(lab.cpu().long())
        for i in index.tolist():
            splits.append(name)
            paths.append(path_of(base, i))
            sources.append((base, i))
    return Items(centre(torch.cat(feats)), torch.cat(labels), splits, paths, list(classes), sources, bands)


def read_splits(args: argparse.Namespace) -> Tuple[List[Tuple[str, Dataset]], List[str]]:
    """The (name, dataset) parts a curation run embeds: train, val when there is one, and the
    --unlabelled pool (labels -1); and the class names. Refuses fewer than 2 images, and a
    --select larger than the unlabelled images."""
    train, val = build_dataset(args, "train"), build_dataset(args, "val")
    classes = list(getattr(train, "classes", None) or [])
    parts = [("train", train)] + ([("val", val)] if val is not None else [])
    if args.unlabelled:
        pool = image_folder(args.unlabelled)
        # read as DATA is: at full depth with --in-channels other than 3
        parts.append(("unlabelled", read_channels(FileListDataset([(p, -1) for p, _ in pool.samples], []),
                                                  args.in_channels)))
    total = sum(len(ds) for _, ds in parts)
    if total < 2:
        raise UserError(f"found {total} image; curating needs at least 2 (duplicates and outliers compare images "
                        f"with each other): add images to the data folder")
    unlabelled = sum(sum(1 for t in ds.targets if t < 0) for _, ds in parts)
    if args.select > unlabelled:
        raise UserError(f"--select {args.select} asks for more images than the {unlabelled} unlabelled ones; pass "
                        f"--select {unlabelled} or less (or more unlabelled images with --unlabelled DIR)")
    return parts, classes
