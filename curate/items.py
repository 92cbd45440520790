"""The images a run looks at, from every split, as one table: row i has a feature, a
label (-1: unlabelled), a split name and the image behind it."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from common.eval.embeddings import class_name, path_of


@dataclass
class Items:
    feats: torch.Tensor  # N x D, L2-normalised after centring, fp16, on the device
    labels: torch.Tensor  # N, long, on the CPU; -1 = unlabelled
    splits: List[str]
    paths: List[str]
    classes: List[str]
    sources: List[Tuple[Dataset, int]]  # (dataset, index) of each row, to show the image

    def __len__(self) -> int:
        return len(self.paths)

    def class_of(self, label: int) -> str:
        return class_name(self.classes, int(label))

    def image(self, row: int) -> Image.Image:
        base, i = self.sources[row]
        return base[i][0]


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
                classes: Sequence[str]) -> Items:
    """One table from (split name, dataset, features, labels, index) of each split."""
    feats, labels, splits, paths, sources = [], [], [], [], []
    for name, base, f, lab, index in parts:
        feats.append(f)
        labels.append(lab.cpu().long())
        for i in index.tolist():
            splits.append(name)
            paths.append(path_of(base, i))
            sources.append((base, i))
    return Items(centre(torch.cat(feats)), torch.cat(labels), splits, paths, list(classes), sources)
