"""What main_knn.py makes of the embedded splits, one function per optional report: the kNN
evaluation (--skip-knn turns it off), the embedding export (--export-embeddings), the
retrieval grids (--retrieval, --query) and the embedding maps (--plot-embeddings). Each
runs on the main process once the features are extracted."""
import argparse
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

from common.ckpt.io import check_free_space
from common.eval.knn import fit_whitening, whiten
from common.eval.label_tree import LabelTree
from common.log.plots import embedding_methods, plot_embeddings
from common.log.progress import log
from common.log.tensorboard import TensorBoardLog
from common.nets.models import without_head
from knn.embeddings import export_embeddings
from knn.evaluate import knn_evaluate
from knn.reports import report_knn
from knn.retrieval import retrieval


@dataclass
class Split:
    """One split's images and features: `base` (the dataset), `feats`/`labels` (one row per
    readable image) and `index` (each row's image in `base`)."""
    name: str
    base: Dataset
    feats: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


def check_export_space(args: argparse.Namespace, rows: int, dim: int) -> None:
    """--export-embeddings: the disk holds `rows` embeddings of width `dim`, found out before
    the extraction, not after it."""
    # csv: up to 12 / 16 characters a value (5 / 9 significant digits, sign, exponent, comma)
    per_value = {"float16": 2, "float32": 4}[args.export_dtype] * (6 if args.export_format == "csv" else 1)
    check_free_space(args.output_dir, rows * dim * per_value + 2 ** 20,
                     what=f"exporting {rows} embeddings of width {dim}")


def knn_report(train: Split, val: Optional[Split], voters: Optional[Sequence[int]], chosen: str,
               classes: List[str], args: argparse.Namespace, tree: Optional[LabelTree],
               tensorboard: TensorBoardLog) -> None:
    """The kNN evaluation of `val` against the train bank (--whiten: on PCA-whitened features;
    `voters`: the --label-fraction draw that votes), reported by knn/reports.py."""
    val_f = val.feats if val is not None else None
    bank, bank_l, queries, axes = train.feats, train.labels, val_f, 0
    if args.whiten:
        mean, projection = fit_whitening(train.feats, args.whiten)
        bank, queries, axes = whiten(train.feats, mean, projection), whiten(val_f, mean, projection), \
            projection.shape[1]
        log(f"=> kNN on PCA-whitened features: the first {axes} principal axes of the {len(train.index)} "
            f"train features, each at unit variance")
    if voters is not None:
        # rows of the readable images in the subset (an unreadable one has no row)
        rows = torch.isin(train.index.cpu(), torch.tensor(voters)).nonzero().squeeze(1).to(bank.device)
        bank, bank_l = bank[rows], bank_l[rows]
        log(f"=> kNN votes with {len(rows)} of the {len(train.index)} train images ({chosen})")
    info = {"pretrained": args.pretrained, "arch": args.arch, "crop_size": args.crop_size,
            "small_images": args.small_images, "temperature": args.knn_t,
            "num_train": len(train.index), "num_val": len(val.index) if val is not None else 0,
            "unreadable_train": len(train.base) - len(train.index),
            "unreadable_val": len(val.base) - len(val.index) if val is not None else 0,
            "num_classes": len(classes), "feature_dim": int(train.feats.shape[1]), "whiten": axes,
            "label_fraction": args.label_fraction if not args.label_subset else -1.0,
            "num_voters": len(bank_l)}
    report_knn(knn_evaluate(bank, bank_l, queries, val.labels if val is not None else None, classes, args, tree),
               classes, info, args, tree, tensorboard)


def export_splits(splits: Sequence[Split], classes: List[str], args: argparse.Namespace) -> None:
    """--export-embeddings: every split's embeddings in OUTPUT_DIR/embeddings/ (knn/embeddings.py)."""
    folder = os.path.join(args.output_dir, "embeddings")
    for s in splits:
        export_embeddings(folder, s.name, s.feats, s.labels, s.base, s.index, classes, args.export_dtype,
                          args.export_format)
    files = ("<split>_features.npy, <split>_labels.npy, <split>.csv" if args.export_format == "npy"
             else f"<split>_embeddings.{args.export_format}: one row per image")
    log(f"=> embeddings in {folder}/ ({files}"
        + (", <split>_unreadable.csv: the images without features)" if any(len(s.index) < len(s.base)
                                                                            for s in splits) else ")"))


def retrieval_grids(model: nn.Module, train: Split, query: Split, classes: List[str], args: argparse.Namespace,
                    device: torch.device, tensorboard: TensorBoardLog) -> None:
    """--retrieval / --query: nearest-neighbour grids of `query`'s images among train's
    (knn/retrieval.py), also in TensorBoard."""
    with without_head(model):
        grids = retrieval(model, train.base, train.feats, train.index, query.base, query.feats, query.index,
                          query.name, classes, args, device)
    log(f"=> {len(grids)} retrieval grid(s) in {os.path.dirname(grids[0])}/ (captions.csv names every cell)")
    for path in grids:
        tensorboard.image("retrieval/" + os.path.basename(path)[:-4], np.asarray(Image.open(path).convert("RGB")))


def embedding_maps(split: Split, classes: List[str], args: argparse.Namespace) -> None:
    """--plot-embeddings: `split`'s features as 2-D maps, one PNG per method."""
    names = classes or ["unlabelled"]
    maps = [plot_embeddings(split.feats.float().cpu().numpy(), split.labels.cpu().numpy(), names,
                            os.path.join(args.output_dir, f"embeddings_{method}.png"), method, seed=args.seed)
            for method in embedding_methods()]
    log(f"=> embedding map(s): {', '.join(maps)}")
