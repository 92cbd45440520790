"""Nearest-neighbour retrieval (--retrieval, --query): query images beside their nearest
training images, as PNG grids with a captions.csv naming every cell."""
import argparse
import csv
import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms
from torchvision.utils import save_image

from common.augment.transforms import eval_transform
from common.data.channels import RGB, Channels, channels_of
from common.data.display import to_display
from common.data.images import load_full_depth, pil_loader
from common.data.transformed import TransformedDataset
from common.eval.embeddings import class_name, path_of
from common.eval.knn import knn_search


def display_transform(crop_size: int, channels: Channels = RGB,
                      bands: Optional[Sequence[int]] = None) -> transforms.Compose:
    """What the network sees (resize + centre crop), without the normalisation, for grids: a
    (3, H, W) tensor in [0, 1]. A full-depth view (stored values, any number of bands) is made
    a picture by to_display, gray or the --show-bands triple, stretched after the crop so
    the stretch is the shown part's own."""
    tf = eval_transform(crop_size, channels).transforms
    assert isinstance(tf[-1], transforms.Normalize)
    if not channels.full_depth:
        return transforms.Compose(tf[:-1])
    return transforms.Compose(tf[:-1] + [functools.partial(to_display, bands=bands), transforms.ToTensor()])


def read_query(path: str, channels: Channels) -> Union[Image.Image, torch.Tensor]:
    """A --query file as the data is read: a (C, H, W) tensor of stored values at full depth,
    else an RGB PIL image."""
    return load_full_depth(path, channels.count) if channels.full_depth else pil_loader(path)


@torch.no_grad()
def embed_files(model: nn.Module, paths: Sequence[str], crop_size: int, device: torch.device,
                channels: Channels = RGB) -> torch.Tensor:
    """L2-normalised fp16 features of the user's own images (--query)."""
    tf = eval_transform(crop_size, channels)
    images = torch.stack([tf(read_query(p, channels)) for p in paths]).to(device)
    model.eval()
    return nn.functional.normalize(model(images).float(), dim=1).half()


def retrieval(model: nn.Module, train_base, train_f: torch.Tensor, train_index: torch.Tensor, query_base,
              query_f: Optional[torch.Tensor], query_index: Optional[torch.Tensor], query_split: str,
              classes: Sequence[str], args: argparse.Namespace, device: torch.device) -> List[str]:
    """Grids of query + its --retrieval-k nearest training images, one row per query and
    --grid-rows rows per PNG, plus captions.csv naming every cell. Returns the PNG paths.
    `*_index`: the dataset index of each feature row (unreadable images have none)."""
    folder = os.path.join(args.output_dir, "retrieval")
    os.makedirs(folder, exist_ok=True)
    channels = channels_of(args)
    show = display_transform(args.crop_size, channels, args.show_bands)
    # queries: (caption fields, feature, image tensor)
    queries: List[Tuple[Dict, torch.Tensor, torch.Tensor]] = []
    if args.retrieval:
        n = min(args.retrieval, len(query_index))
        picks = torch.randperm(len(query_index), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
        shown = TransformedDataset(query_base, show)
        for row in picks:
            i = int(query_index[row])
            img, label = shown[i]
            queries.append(({"split": query_split, "index": i, "path": path_of(query_base, i), "label": label,
                             "class": class_name(classes, label)}, query_f[row], img))
    if args.query:
        feats = embed_files(model, args.query, args.crop_size, device, channels)
        for p, f in zip(args.query, feats):
            queries.append(({"split": "query", "index": "", "path": p, "label": "", "class": ""}, f,
                            show(read_query(p, channels))))
    top_sim, top_idx = knn_search(train_f, torch.stack([f for _, f, _ in queries]), args.retrieval_k,
                                  args.chunk_size, args.train_chunk_size)
    train_shown = TransformedDataset(train_base, show)
    grids, captions = [], []
    for g0 in range(0, len(queries), args.grid_rows):
        grid_name = f"grid_{g0 // args.grid_rows:03d}.png"
        cells = []
        for row, qi in enumerate(range(g0, min(g0 + args.grid_rows, len(queries)))):
            info, _, img = queries[qi]
            cells.append(img)
            captions.append({"grid": grid_name, "row": row, "column": 0, "role": "query", **info, "similarity": ""})
            for col, (row_j, sim) in enumerate(zip(top_idx[qi].tolist(), top_sim[qi].tolist()), start=1):
                j = int(train_index[row_j])
                nimg, label = train_shown[j]
                cells.append(nimg)
                captions.append({"grid": grid_name, "row": row, "column": col, "role": f"neighbour {col}",
                                 "split": "train", "index": j, "path": path_of(train_base, j), "label": label,
                                 "class": class_name(classes, label), "similarity": f"{sim:.4f}"})
        path = os.path.join(folder, grid_name)
        # one row per query: the query, then its neighbours, nearest first
        save_image(torch.stack(cells), path, nrow=1 + top_idx.shape[1], padding=2, pad_value=1.0)
        grids.append(path)
    with open(os.path.join(folder, "captions.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["grid", "row", "column", "role", "split", "index", "path", "label",
                                          "class", "similarity"])
        w.writeheader()
        w.writerows(captions)
    return grids
