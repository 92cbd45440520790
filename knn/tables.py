"""--export-format csv / parquet: a split's embeddings as one table, one row per image in the
dataset's (file) order, unreadable images included as `skipped` rows without features, so
row i is always image i. Written in slices into a temporary file beside the target, then
renamed into place."""
import csv
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from common.extras import require
from common.files.atomic import atomic_path

SLICE = 65536  # rows per slice: no second full copy of the features in RAM
# significant digits that read back to the same float16 / float32
DIGITS = {"float16": 5, "float32": 9}


def dataset_labels(base: Dataset, index: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The label of every image of `base` (-1: unlabelled), the extracted rows' own where there
    are features, the dataset's targets for the unreadable ones."""
    targets = getattr(base, "targets", None)
    out = np.asarray(targets, dtype=np.int64).copy() if targets is not None else np.full(len(base), -1, np.int64)
    out[index.cpu().numpy()] = labels.long().cpu().numpy()
    return out


def slices(feats: torch.Tensor, index: torch.Tensor, n: int, dtype: str) -> Iterator[Tuple[int, np.ndarray,
                                                                                          np.ndarray]]:
    """(first image, features, skipped) of each slice of the `n` images; a skipped image's
    features are zeros (the writers leave them empty)."""
    row_of = np.full(n, -1, np.int64)
    row_of[index.cpu().numpy()] = np.arange(len(index))
    for s in range(0, n, SLICE):
        rows = row_of[s:s + SLICE]
        ok = rows >= 0
        block = np.zeros((len(rows), feats.shape[1]), dtype=dtype)
        block[ok] = feats[torch.from_numpy(rows[ok]).to(feats.device)].float().cpu().numpy().astype(dtype)
        yield s, block, ~ok


def write_csv(path: str, feats: torch.Tensor, index: torch.Tensor, base: Dataset, labels: np.ndarray,
              names: Sequence[str], dtype: str) -> None:
    """index, path, label, class, skipped, f0..f{D-1}: a skipped row's features are empty."""
    fmt = f"%.{DIGITS[dtype]}g"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "label", "class", "skipped"] + [f"f{i}" for i in range(feats.shape[1])])
        for s, block, skipped in slices(feats, index, len(base), dtype):
            for j, row, skip in zip(range(s, s + len(block)), block.tolist(), skipped.tolist()):
                values = [""] * len(row) if skip else [fmt % v for v in row]
                w.writerow([j, names[j][0], int(labels[j]), names[j][1], int(skip)] + values)


def write_parquet(path: str, feats: torch.Tensor, index: torch.Tensor, base: Dataset, labels: np.ndarray,
                  names: Sequence[str], dtype: str) -> None:
    """index, path, label, class, skipped, embedding (a fixed-size list, null when skipped)."""
    pa = require("pyarrow")
    pq = require("pyarrow.parquet", "pyarrow")
    dim = feats.shape[1]
    schema = pa.schema([("index", pa.int64()), ("path", pa.string()), ("label", pa.int64()), ("class", pa.string()),
                        ("skipped", pa.bool_()), ("embedding", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dim))])
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for s, block, skipped in slices(feats, index, len(base), dtype):
                rows = range(s, s + len(block))
                embedding = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim,
                                                              mask=pa.array(skipped))
                writer.write_table(pa.table({
                    "index": pa.array(list(rows), pa.int64()), "path": [names[j][0] for j in rows],
                    "label": pa.array(labels[s:s + len(block)]), "class": [names[j][1] for j in rows],
                    "skipped": pa.array(skipped), "embedding": embedding}, schema=schema))
