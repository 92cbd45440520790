#!/usr/bin/env python
"""kNN evaluation, embedding export and nearest-neighbour retrieval with a pretrained
backbone: judge features without training anything, and find similar images.

    python main_knn.py --dataset synthetic --pretrained runs/moco/checkpoint_last.pth.tar
    python main_knn.py /data/imagenet --pretrained moco_v2_800ep_pretrain.pth.tar -a resnet50 --amp \\
        --multiprocessing-distributed
    python main_knn.py /data/photos --pretrained runs/moco/checkpoint_last.pth.tar --skip-knn \\
        --export-embeddings --retrieval 16 --query my_photo.jpg

Features are the backbone's pooled output (head removed), L2-normalised and kept in fp16
on the device. Weighted kNN as in InstDisc / DINO: the k nearest training features vote
for their class with weight exp(cos / T), T = 0.07, k = 20 and 200. Similarities are
computed in chunks (common/eval/knn.py), so no N x N matrix is ever built.
"""
import argparse
import csv
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms
from torchvision.utils import save_image

from common.augment.transforms import eval_decode_side, eval_transform
from common.ckpt.io import check_free_space, prepare_output_dir
from common.cli import HelpFormatter, add_tensorboard_arg, check_common_flags
from common.data.datasets import add_data_args, build_dataset, default_crop_size
from common.dist.collectives import barrier, is_main_process
from common.errors import UserError
from common.extras import require
from common.data.images import is_image_file, pil_loader
from common.eval.features import extract_indexed_features
from common.eval.knn import knn_search, knn_vote, top_n, vote_accuracy
from common.dist.world import add_dist_args, expected_world_size, per_worker
from common.dist.launch import script_main, start_worker
from common.log.progress import log
from common.eval.metrics import classification_report, save_per_class_csv
from common.nets.models import build_backbone, without_head
from common.log.plots import embedding_methods, plot_embeddings
from common.train.precision import Precision
from common.ckpt.pretrained import follow_checkpoint, load_backbone, load_pretrained
from common.log.tensorboard import TensorBoardLog
from common.data.transformed import TransformedDataset
from lincls.hierarchy import (
    LabelTree,
    add_hierarchy_args,
    check_hierarchy_flags,
    consistency_rate,
    hierarchical_dataset,
    path_accuracy,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="kNN evaluation, embedding export and nearest-neighbour retrieval",
                                     formatter_class=HelpFormatter)
    parser.add_argument("data", metavar="DIR", nargs="?", default="",
                        help="path to dataset (not needed for --dataset synthetic)")
    parser.add_argument("--pretrained", required=True, type=str, metavar="PATH|none|imagenet",
                        help="checkpoint to evaluate (any that main_lincls.py accepts: MoCo, SimCLR, lincls, "
                             "facebookresearch/moco), 'none' for a random-init backbone, 'imagenet' for "
                             "torchvision's cached weights")
    parser.add_argument("-a", "--arch", metavar="ARCH", default=None,
                        help="torchvision architecture (default: the checkpoint's, else resnet50)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="global batch size of feature extraction over all processes")
    parser.add_argument("-j", "--workers", default=8, type=int, metavar="N",
                        help="data loading workers in total over this node's processes")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N",
                        help="progress line every N batches of feature extraction")
    parser.add_argument("--seed", default=0, type=int,
                        help="seed of the --retrieval query draw and of the --pretrained none init")
    parser.add_argument("--output-dir", default=None, type=str,
                        help="folder for results, embeddings and grids (default: ./runs/knn)")
    parser.add_argument("--crop-size", default=None, type=int,
                        help="eval crop size (default: 224; 32 for CIFAR/MNIST/synthetic, 96 for STL-10)")
    parser.add_argument("--small-images", default=None, action=argparse.BooleanOptionalAction,
                        help="CIFAR stem (3x3 conv1, no max-pool) (default: as the checkpoint was pretrained, "
                             "else on for crops <= 64 px)")
    parser.add_argument("--amp", action="store_true", help="mixed precision feature extraction")
    parser.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"), help="autocast dtype for --amp")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    add_tensorboard_arg(parser)

    g = parser.add_argument_group("knn")
    g.add_argument("--knn-k", default=[20, 200], type=int, nargs="+", metavar="K",
                   help="numbers of neighbours that vote (one search with the largest serves all)")
    g.add_argument("--temperature", default=0.07, type=float, help="vote weight exp(cos / T)")
    g.add_argument("--skip-knn", action="store_true",
                   help="no kNN evaluation (unlabelled data): only --export-embeddings / --retrieval / --query")
    g.add_argument("--chunk-size", default=1024, type=int, help="queries per similarity chunk")
    g.add_argument("--train-chunk-size", default=65536, type=int,
                   help="training features per similarity chunk (memory: chunk x train-chunk fp32)")

    g = parser.add_argument_group("export and retrieval")
    g.add_argument("--export-embeddings", action="store_true",
                   help="save features (.npy), labels (.npy) and file paths (.csv) of every split to "
                        "OUTPUT_DIR/embeddings/")
    g.add_argument("--export-dtype", default="float16", choices=("float16", "float32"),
                   help="dtype of the exported features")
    g.add_argument("--retrieval", default=0, type=int, metavar="N",
                   help="N query images (drawn with --seed) and their nearest training images, as PNG grids in "
                        "OUTPUT_DIR/retrieval/ with captions.csv")
    g.add_argument("--retrieval-k", default=8, type=int, metavar="K", help="neighbours shown per query")
    g.add_argument("--retrieval-split", default="auto", choices=("auto", "val", "train"),
                   help="where --retrieval queries come from (auto: val when there is one); queries from "
                        "train find themselves first")
    g.add_argument("--query", default=[], action="append", metavar="PATH",
                   help="an image of your own to find neighbours for (repeat the flag for several)")
    g.add_argument("--grid-rows", default=8, type=int, metavar="N", help="queries (rows) per PNG grid")
    g.add_argument("--plot-embeddings", action="store_true",
                   help="2-D maps of the val features (train without a val split) coloured by class: "
                        "OUTPUT_DIR/embeddings_pca.png, plus _tsne / _umap when scikit-learn / umap-learn are "
                        "installed (needs matplotlib)")
    add_data_args(parser)
    add_hierarchy_args(parser, classifier=False)
    add_dist_args(parser)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    check_common_flags(args)
    check_hierarchy_flags(args, classifier=False)
    if args.plot_embeddings:
        require("matplotlib")
    args.output_dir = args.output_dir or os.path.join("runs", "knn")
    prepare_output_dir(args.output_dir)
    args.crop_size = args.crop_size or default_crop_size(args)
    follow_checkpoint(args)  # -a and the stem of the pretraining run unless given
    if any(k < 1 for k in args.knn_k):
        raise UserError(f"--knn-k must be positive numbers of neighbours, got {args.knn_k}; e.g. --knn-k 20 200")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}; the usual value is 0.07")
    for flag, value, least in (("--retrieval", args.retrieval, 0), ("--retrieval-k", args.retrieval_k, 1),
                               ("--grid-rows", args.grid_rows, 1), ("--chunk-size", args.chunk_size, 1),
                               ("--train-chunk-size", args.train_chunk_size, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    for path in args.query:
        if not os.path.isfile(path):
            raise UserError(f"--query image {path!r} does not exist; pass the path of an image file")
        try:
            pil_loader(path)
        except (OSError, ValueError, SyntaxError) as e:
            hint = "" if is_image_file(path) else f" (supported: {', '.join(('.jpg', '.png', '.bmp', '.webp'))}...)"
            raise UserError(f"--query {path!r} cannot be read as an image ({e}){hint}; pass an image file")
    if args.skip_knn and not (args.export_embeddings or args.retrieval or args.query):
        raise UserError("--skip-knn leaves nothing to do; add --export-embeddings, --retrieval N or --query PATH")
    per_worker(args.batch_size, expected_world_size(args))
    return args


# ---------------------------------------------------------------- data

def check_labelled(train, val) -> None:
    """kNN evaluation needs every train and val image labelled, with the same classes."""
    for split, ds in (("train", train), ("val", val)):
        if ds is None:
            raise UserError("kNN evaluation needs a labelled val split; give DATA/train and DATA/val class folders "
                            "(or train.csv and val.csv with --dataset csv), or pass --skip-knn")
        unlabelled = sum(1 for t in ds.targets if t < 0)
        if not getattr(ds, "classes", None) or unlabelled:
            raise UserError(f"{unlabelled or len(ds)} {split} images have no label, so kNN accuracy cannot be "
                            f"measured; put them in class folders (or label them in the csv), or pass --skip-knn "
                            f"to only export embeddings and retrieve neighbours")
    if list(val.classes) != list(train.classes):
        raise UserError(f"val classes {list(val.classes)[:5]} differ from train classes {list(train.classes)[:5]}; "
                        f"the val split must have the same classes")


def display_transform(crop_size: int) -> transforms.Compose:
    """What the network sees (resize + centre crop), without the normalisation, for grids."""
    tf = eval_transform(crop_size).transforms
    assert isinstance(tf[-1], transforms.Normalize)
    return transforms.Compose(tf[:-1])


def path_of(dataset, index: int) -> str:
    return dataset.path(index) if hasattr(dataset, "path") else str(index)


def class_name(classes: Sequence[str], label: int) -> str:
    return classes[label] if 0 <= label < len(classes) else ""


# ---------------------------------------------------------------- kNN evaluation

def knn_evaluate(train_f: torch.Tensor, train_l: torch.Tensor, val_f: torch.Tensor, val_l: torch.Tensor,
                 classes: List[str], args: argparse.Namespace, tree: Optional[LabelTree] = None) -> Dict:
    """Top-1/top-5 and per-class recall for every k, from one search with the largest k.
    With a label tree: the same for every level ({"levels": [results of level 1, ...]}),
    the neighbours voting with their class at that level, plus per k the consistency rate
    and whole-path top-1 of the levels' decisions ({"path": {k: ...}})."""
    ks = sorted(set(args.knn_k))
    top_sim, top_idx = knn_search(train_f, val_f, max(ks), args.chunk_size, args.train_chunk_size)
    if tree is None:
        return knn_reports(top_sim, top_idx, train_l, val_l, classes, ks, args.temperature)[0]
    levels, preds = [], []
    for level, names in enumerate(tree.classes):
        results, scores = knn_reports(top_sim, top_idx, tree.level_targets(train_l, level),
                                      tree.level_targets(val_l, level), names, ks, args.temperature)
        levels.append(results)
        preds.append({k: s.argmax(dim=1) for k, s in scores.items()})
    targets = [tree.level_targets(val_l, level) for level in range(tree.depth)]
    path = {k: {"path_top1": path_accuracy([p[k] for p in preds], targets),
                "consistency_rate": consistency_rate([p[k] for p in preds], tree)} for k in ks}
    return {"levels": levels, "path": path}


def knn_reports(top_sim: torch.Tensor, top_idx: torch.Tensor, train_l: torch.Tensor, val_l: torch.Tensor,
                classes: List[str], ks: Sequence[int], temperature: float) -> Tuple[Dict, Dict]:
    """({k: top-1/top-5, per-class recall}, {k: vote scores}) for one set of labels. "top5"
    is over the top5_k = min(5, k, classes) best-voted classes, as DINO's knn_classifier:
    k neighbours vote for at most k classes."""
    results, scores = {}, {}
    for k in ks:
        k_used = min(k, top_idx.shape[1])
        scores[k] = knn_vote(top_sim, top_idx, train_l, len(classes), k, temperature)
        report = classification_report(scores[k], val_l, classes)
        n = top_n(k_used, len(classes))
        results[k] = {"k": k, "k_used": k_used, "top1": report["acc1"], "top5": vote_accuracy(scores[k], val_l, n)[1],
                      "top5_k": n, "macro_recall": report["macro_recall"], "per_class": report["per_class"]}
    return results, scores


def log_knn(results: Dict, classes: List[str], temperature: float, title: str = "") -> None:
    for k, r in results.items():
        clipped = f" (only {r['k_used']} training images)" if r["k_used"] < k else ""
        log(f"=> kNN{title} k={k}{clipped} T={temperature}: top-1 {r['top1']:.2f}  top-{r['top5_k']} {r['top5']:.2f}  "
            f"mean per-class recall {r['macro_recall']:.2f}")
    ks = list(results)
    rows = list(range(len(classes)))
    if len(classes) > 20:  # a 1000-class table helps nobody in a terminal: the extremes, all in the CSV
        order = sorted(rows, key=lambda c: results[ks[0]]["per_class"][c]["recall"])
        rows = order[:5] + order[-5:]
        log(f"=> per-class recall{title}, 5 worst and 5 best classes at k={ks[0]} (all in knn_per_class*.csv):")
    else:
        log(f"=> per-class recall{title}:")
    width = max(len(classes[c]) for c in rows)
    log(f"   {'class':<{width}}  support  " + "  ".join(f"k={k:<5}" for k in ks))
    for c in rows:
        support = results[ks[0]]["per_class"][c]["support"]
        log(f"   {classes[c]:<{width}}  {support:>7}  " + "  ".join(f"{results[k]['per_class'][c]['recall']:6.2f}"
                                                             for k in ks))


def write_knn_files(results: Dict, classes: List[str], info: Dict, output_dir: str,
                    tree: Optional[LabelTree] = None) -> None:
    """knn_results.json and the per-class CSVs (knn_per_class_level<L>*.csv for each level of a tree)."""
    if tree is None:
        out = {**info, "knn": write_per_class_files(results, classes, output_dir)}
    else:
        out = {**info, "levels": [{"level": level + 1, "name": name,
                                   "knn": write_per_class_files(r, tree.classes[level], output_dir, f"_level{level + 1}")}
                                  for level, (name, r) in enumerate(zip(tree.level_names, results["levels"]))],
               "path": {str(k): v for k, v in results["path"].items()}}
    with open(os.path.join(output_dir, "knn_results.json"), "w") as f:
        json.dump(out, f, indent=1)


def write_per_class_files(results: Dict, classes: List[str], output_dir: str, suffix: str = "") -> Dict:
    """knn_per_class{suffix}.csv (every k side by side) and knn_per_class{suffix}_k{K}.csv;
    returns the results without per-class rows, per-class recall by name, for the JSON."""
    os.makedirs(output_dir, exist_ok=True)
    ks = list(results)
    with open(os.path.join(output_dir, f"knn_per_class{suffix}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "support"] + [f"recall_k{k}" for k in ks] + [f"precision_k{k}" for k in ks])
        for c, name in enumerate(classes):
            pc = [results[k]["per_class"][c] for k in ks]
            w.writerow([name, pc[0]["support"]] + [f"{p['recall']:.4f}" for p in pc]
                       + [f"{p['precision']:.4f}" for p in pc])
    for k in ks:
        save_per_class_csv(results[k]["per_class"], os.path.join(output_dir, f"knn_per_class{suffix}_k{k}.csv"))
    return {str(k): {key: v for key, v in r.items() if key != "per_class"}
            | {"per_class_recall": {p["class"]: p["recall"] for p in r["per_class"]}}
            for k, r in results.items()}


# ---------------------------------------------------------------- export

def export_embeddings(folder: str, split: str, feats: torch.Tensor, labels: torch.Tensor, base,
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


# ---------------------------------------------------------------- retrieval

@torch.no_grad()
def embed_files(model: nn.Module, paths: Sequence[str], crop_size: int, device: torch.device) -> torch.Tensor:
    """L2-normalised fp16 features of the user's own images (--query)."""
    tf = eval_transform(crop_size)
    images = torch.stack([tf(pil_loader(p)) for p in paths]).to(device)
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
    show = display_transform(args.crop_size)
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
        feats = embed_files(model, args.query, args.crop_size, device)
        for p, f in zip(args.query, feats):
            queries.append(({"split": "query", "index": "", "path": p, "label": "", "class": ""}, f,
                            show(pil_loader(p))))
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


# ---------------------------------------------------------------- main

def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args)

    # ---- data: train is the memory bank; val is evaluated (and queried) when there is one.
    # With --hierarchy-depth the classes are the deepest level's paths and the tree maps them up
    tree = None
    if args.hierarchy_depth:
        train_base = hierarchical_dataset(args, "train")
        tree = train_base.tree
        val_base = hierarchical_dataset(args, "val", tree)
    else:
        train_base, val_base = build_dataset(args, "train"), build_dataset(args, "val")
    if not args.skip_knn:
        check_labelled(train_base, val_base)
    classes = list(getattr(train_base, "classes", []))
    query_split = args.retrieval_split if args.retrieval_split != "auto" else ("val" if val_base is not None else "train")
    if query_split == "val" and args.retrieval and val_base is None:
        raise UserError("--retrieval-split val needs a val split (DATA/val or val.csv); use --retrieval-split train")
    tf = eval_transform(args.crop_size)
    need_val = val_base is not None and (not args.skip_knn or args.export_embeddings
                                         or (args.retrieval and query_split == "val"))

    # ---- model: backbone of the checkpoint, head removed. Same seed on every rank: with
    # --pretrained none all ranks must embed with the same random init
    torch.manual_seed(args.seed)
    model = build_backbone(args.arch, small_images=args.small_images)
    ckpt = load_pretrained(args.pretrained, args.arch)
    source = "random init"
    if ckpt is not None:
        where = args.pretrained if args.pretrained != "imagenet" else "torchvision ImageNet weights"
        layout = load_backbone(model, ckpt, where)
        source = f"{where} ({ckpt.get('method') or 'reference'} checkpoint, layout {layout})"
        del ckpt
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    log(f"=> {args.arch} from {source}; {len(train_base)} train" + (f", {len(val_base)} val" if need_val else "")
        + f" images at {args.crop_size} px, {env.world_size} process(es), batch {batch_size}/process on {env.device}")

    if args.export_embeddings and is_main_process():  # found out before the extraction, not after it
        rows = len(train_base) + (len(val_base) if need_val else 0)
        dim = model.fc.in_features
        check_free_space(args.output_dir, rows * dim * (2 if args.export_dtype == "float16" else 4) + 2 ** 20,
                         what=f"exporting {rows} embeddings of width {dim}")

    # ---- features: each rank embeds its share, every rank gets all of them (fp16, on the device)
    with without_head(model):
        extract = dict(batch_size=batch_size, device=env.device, workers=workers,
                       precision=Precision.from_args(args), print_freq=args.print_freq)
        side = eval_decode_side(args.crop_size)
        # an unreadable image gets no row (a stand-in would put its features under this
        # image's path and label, and count it twice): *_index maps rows to dataset indices
        train_f, train_l, train_index = extract_indexed_features(
            model, TransformedDataset(train_base, tf, args.strict_data, side, skip_unreadable=True),
            desc="features train", **extract)
        val_f = val_l = val_index = None
        if need_val:
            val_f, val_l, val_index = extract_indexed_features(
                model, TransformedDataset(val_base, tf, args.strict_data, side, skip_unreadable=True),
                desc="features val", **extract)
    log(f"=> features: {tuple(train_f.shape)} train" + (f", {tuple(val_f.shape)} val" if val_f is not None else "")
        + f", {train_f.dtype} on {train_f.device}")

    # the rest is cheap next to extraction: rank 0 does it, the others wait
    if is_main_process():
        info = {"pretrained": args.pretrained, "arch": args.arch, "crop_size": args.crop_size,
                "small_images": args.small_images, "temperature": args.temperature,
                "num_train": len(train_index), "num_val": len(val_index) if val_index is not None else 0,
                "unreadable_train": len(train_base) - len(train_index),
                "unreadable_val": len(val_base) - len(val_index) if val_index is not None else 0,
                "num_classes": len(classes), "feature_dim": int(train_f.shape[1])}
        tensorboard = TensorBoardLog(args.output_dir, args.tensorboard)
        if not args.skip_knn:
            results = knn_evaluate(train_f, train_l, val_f, val_l, classes, args, tree)
            if tree is None:
                log_knn(results, classes, args.temperature)
                for k, r in results.items():
                    tensorboard.scalars({"top1": r["top1"], f"top{min(5, r['k_used'])}": r["top5"]}, 0, f"knn_k{k}")
            else:
                for level, (name, r) in enumerate(zip(tree.level_names, results["levels"])):
                    log_knn(r, tree.classes[level], args.temperature, f" level {level + 1} ({name})")
                    for k, rk in r.items():
                        tensorboard.scalars({"top1": rk["top1"], f"top{min(5, rk['k_used'])}": rk["top5"]}, 0,
                                            f"knn_level{level + 1}_k{k}")
                for k, p in results["path"].items():
                    log(f"=> kNN k={k} whole path: top-1 {p['path_top1']:.2f}  consistency {p['consistency_rate']:.2f} "
                        f"(predicted class under the predicted parent)")
            write_knn_files(results, classes, info, args.output_dir, tree)
            log(f"=> kNN results in {os.path.join(args.output_dir, 'knn_results.json')} and knn_per_class.csv")
        if args.export_embeddings:
            folder = os.path.join(args.output_dir, "embeddings")
            export_embeddings(folder, "train", train_f, train_l, train_base, train_index, classes, args.export_dtype)
            if val_f is not None:
                export_embeddings(folder, "val", val_f, val_l, val_base, val_index, classes, args.export_dtype)
            log(f"=> embeddings in {folder}/ (<split>_features.npy, <split>_labels.npy, <split>.csv"
                + (", <split>_unreadable.csv: the images left out)" if len(train_index) < len(train_base)
                   or (val_index is not None and len(val_index) < len(val_base)) else ")"))
        if args.retrieval or args.query:
            qbase, qf, qindex = (val_base, val_f, val_index) if query_split == "val" else (train_base, train_f,
                                                                                            train_index)
            with without_head(model):
                grids = retrieval(model, train_base, train_f, train_index, qbase, qf, qindex, query_split, classes,
                                  args, env.device)
            log(f"=> {len(grids)} retrieval grid(s) in {os.path.dirname(grids[0])}/ (captions.csv names every cell)")
            for path in grids:
                tensorboard.image("retrieval/" + os.path.basename(path)[:-4], np.asarray(Image.open(path).convert("RGB")))
        if args.plot_embeddings:
            feats, labels = (val_f, val_l) if val_f is not None else (train_f, train_l)
            names = classes or ["unlabelled"]
            maps = [plot_embeddings(feats.float().cpu().numpy(), labels.cpu().numpy(), names,
                                    os.path.join(args.output_dir, f"embeddings_{method}.png"), method, seed=args.seed)
                    for method in embedding_methods()]
            log(f"=> embedding map(s): {', '.join(maps)}")
        tensorboard.close()
    barrier()


main = script_main(get_args_parser, finalize_args, main_worker)


if __name__ == "__main__":
    main()
