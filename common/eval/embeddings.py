"""The embeddings of a split: the backbone's L2-normalised features of its readable images, and
the names of their rows (image path, class). Shared by main_knn.py (knn/) and main_curate.py
(curate/), which must not import each other's folders."""
import argparse
from typing import Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common.distributed.collectives import DistEnv
from common.eval.features import extract_indexed_features
from common.eval.inputs import eval_view
from common.nets.models import without_head
from common.nets.precision import Precision


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
