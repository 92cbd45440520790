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
import fnmatch
import os
import re

import torch

from common.ckpt.io import prepare_output_dir, previous_run_files
from common.ckpt.pretrained import follow_checkpoint
from common.cli import (ArgumentParser, add_eval_args, add_hierarchy_args, add_label_subset_args, check_common_flags,
                        switch)
from common.data.channels import channels_of
from common.data.display import check_bands
from common.data.images import is_image_file
from common.distributed.collectives import barrier, is_main_process
from common.distributed.launch import script_main, start_worker
from common.distributed.world import expected_world_size, is_first_process, per_worker
from common.errors import UserError
from common.eval.embeddings import embed
from common.eval.label_tree import check_hierarchy_depth
from common.eval.inputs import check_label_subset_args, eval_splits, pretrained_backbone, training_labels
from common.extras import require
from common.log.progress import log
from common.log.tensorboard import TensorBoardLog
from knn.embeddings import EXPORT_FORMATS
from knn.outputs import Split, check_export_space, embedding_maps, export_splits, knn_report, retrieval_grids
from knn.retrieval import read_query

# Every name main_knn.py writes in --output-dir, here and nowhere else: knn/reports.py's results and
# per-class csvs, the --label-fraction draw (common/eval/inputs.py), knn/embeddings.py's exports,
# knn/retrieval.py's grids, the --plot-embeddings maps and TensorBoard's events. A folder holding
# any of them is refused and --overwrite removes them all: an earlier run's exports or grids must
# not sit beside this run's results as if they were its own.
OUTPUTS = ("knn_results.json", "knn_per_class*.csv", "label_subset.json", "embeddings", "retrieval",
           "embeddings_*.png", "tensorboard")
RUN_FILES = re.compile("|".join(fnmatch.translate(name) for name in OUTPUTS))


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="kNN evaluation, embedding export and nearest-neighbour retrieval")
    add_eval_args(parser, batch_size=256, name="knn", helps={
        "batch_size": "global batch size of feature extraction over all processes",
        "print_freq": "progress line every N batches of feature extraction",
        "seed": "seed of the --retrieval query draw and of the --pretrained none init",
        "output_dir": "folder for results, embeddings and grids (default: ./runs/knn)",
        "crop_size": "eval crop size (default: the --pretrained run's crop, else 224; 32 for CIFAR/MNIST/synthetic, "
                     "96 for STL-10)",
        "amp": "mixed precision feature extraction"})
    # a fixed seed, so a rerun draws the same queries (the checkpoint decides -a: follow_checkpoint)
    parser.set_defaults(seed=0)

    g = parser.add_argument_group("knn")
    g.add_argument("--knn-k", default=[20, 200], type=int, nargs="+", metavar="K",
                   help="numbers of neighbours that vote (one search with the largest serves all)")
    # --knn-t, as --knn-k (--temperature is the contrastive loss's in the pretraining scripts)
    g.add_argument("--knn-t", default=0.07, type=float, metavar="T", help="vote weight exp(cos / T)")
    g.add_argument("--temperature", dest="knn_t", type=float, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the name before --knn-t, still taken
    g.add_argument("--whiten", default=0, type=int, metavar="D",
                   help="vote in the train features' first D principal axes, each scaled to unit variance (PCA "
                        "whitening fitted on every train image, labels unused; 0: off): for images that differ "
                        "mostly by a nuisance such as brightness while the class is small, e.g. a defect (64 "
                        "on the inspection benchmark; on Fashion-MNIST plain kNN is better: docs/knn.md). Exports "
                        "and retrieval keep the raw features")
    switch(g, "--overwrite",
           help="replace the evaluation an --output-dir already holds, deleting its results, exports and "
                        "grids (without it such a folder is refused; an evaluation cannot be resumed)")
    switch(g, "--skip-knn",
           help="no kNN evaluation (unlabelled data): only --export-embeddings / --retrieval / --query")
    g.add_argument("--chunk-size", default=1024, type=int, help="queries per similarity chunk")
    g.add_argument("--train-chunk-size", default=65536, type=int,
                   help="training features per similarity chunk (memory: chunk x train-chunk fp32)")
    add_label_subset_args(parser, "kNN votes")

    g = parser.add_argument_group("export and retrieval")
    switch(g, "--export-embeddings", help="save the features, labels and file paths of every split to "
                                          "OUTPUT_DIR/embeddings/, in --export-format")
    g.add_argument("--export-format", default="npy", choices=EXPORT_FORMATS,
                   help="npy: <split>_features.npy + <split>_labels.npy + <split>.csv naming each row's image; "
                        "csv / parquet (needs pyarrow): one table <split>_embeddings.csv|.parquet, one row per "
                        "image in file order (path, label, class, skipped, features; unreadable images are rows "
                        "with skipped 1 and no features)")
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
    switch(g, "--plot-embeddings",
           help="2-D maps of the val features (train without a val split) coloured by class: "
                "OUTPUT_DIR/embeddings_pca.png, plus _tsne / _umap when scikit-learn / umap-learn are installed "
                "(needs matplotlib)")
    add_hierarchy_args(parser)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    check_common_flags(args)
    check_hierarchy_depth(args)
    if args.plot_embeddings:
        require("matplotlib")
    if args.export_format != "npy" and not args.export_embeddings:
        raise UserError(f"--export-format {args.export_format} is the format of --export-embeddings; add "
                        f"--export-embeddings")
    if args.export_format == "parquet":  # found out before the extraction, not after it
        require("pyarrow.parquet", "pyarrow")
    args.output_dir = args.output_dir or os.path.join("runs", "knn")
    follow_checkpoint(args)  # -a, the crop and the stem of the pretraining run unless given
    check_bands(args.show_bands, args.in_channels)  # before any extraction, not when the grids are drawn
    if args.whiten < 0:
        raise UserError(f"--whiten must be a number of principal axes (64 is a start) or 0 for off, got "
                        f"{args.whiten}")
    check_label_subset_args(args)
    if args.skip_knn and (args.label_fraction != 1.0 or args.label_subset):
        raise UserError("--label-fraction and --label-subset choose the images kNN votes with; drop them with "
                        "--skip-knn")
    if any(k < 1 for k in args.knn_k):
        raise UserError(f"--knn-k must be positive numbers of neighbours, got {args.knn_k}; e.g. --knn-k 20 200")
    if args.knn_t <= 0:
        raise UserError(f"--knn-t must be positive, got {args.knn_t}; the usual value is 0.07")
    for flag, value, least in (("--retrieval", args.retrieval, 0), ("--retrieval-k", args.retrieval_k, 1),
                               ("--grid-rows", args.grid_rows, 1), ("--chunk-size", args.chunk_size, 1),
                               ("--train-chunk-size", args.train_chunk_size, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    for path in args.query:
        if not os.path.isfile(path):
            raise UserError(f"--query image {path!r} does not exist; pass the path of an image file")
        try:
            read_query(path, channels_of(args))  # as the data is read: full depth with --in-channels other than 3
        except (OSError, ValueError, SyntaxError) as e:
            hint = "" if is_image_file(path) else f" (supported: {', '.join(('.jpg', '.png', '.bmp', '.webp'))}...)"
            raise UserError(f"--query {path!r} cannot be read as an image ({e}){hint}; pass an image file")
    if args.skip_knn and not (args.export_embeddings or args.retrieval or args.query):
        raise UserError("--skip-knn leaves nothing to do; add --export-embeddings, --retrieval N or --query PATH")
    # last, so that a run the checks above refuse deletes nothing with --overwrite; the sentence is
    # said here rather than by prepare_output_dir, whose own offers a --resume this script lacks
    # (prepare_output_dir still refuses, under the lock, a run that wrote in between)
    earlier = previous_run_files(args.output_dir, RUN_FILES)
    if earlier and not args.overwrite:
        raise UserError(f"--output-dir {args.output_dir!r} already holds an evaluation ({', '.join(earlier[:3])}"
                        f"{', ...' if len(earlier) > 3 else ''}); pass another --output-dir, or --overwrite to "
                        f"replace it (an evaluation starts over: there is nothing to resume)")
    if args.label_subset and os.path.realpath(args.label_subset) == os.path.realpath(
            os.path.join(args.output_dir, "label_subset.json")) and earlier:
        raise UserError(f"--label-subset {args.label_subset!r} is a file --overwrite deletes from --output-dir; "
                        f"copy it out of {args.output_dir!r} first")
    per_worker(args.batch_size, expected_world_size(args))
    prepare_output_dir(args.output_dir, new_run=True, overwrite=args.overwrite, lock=is_first_process(args),
                       run_files=RUN_FILES)
    return args


# how to run without labels, for the labelled-split errors
SKIP_KNN = ", or pass --skip-knn to only export embeddings and retrieve neighbours"


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args)

    # ---- data: train is the memory bank; val is evaluated (and queried) when there is one.
    # With --hierarchy-depth the classes are the deepest level's paths and the tree maps them up
    train_base, val_base, tree, classes = eval_splits(args, None if args.skip_knn else "kNN evaluation", SKIP_KNN,
                                                      partly_labelled_train=True)
    query_split = args.retrieval_split if args.retrieval_split != "auto" else ("val" if val_base is not None else "train")
    if query_split == "val" and args.retrieval and val_base is None:
        raise UserError("--retrieval-split val needs a val split (DATA/val or val.csv); use --retrieval-split train")
    need_val = val_base is not None and (not args.skip_knn or args.export_embeddings
                                         or (args.retrieval and query_split == "val"))
    # who votes: every labelled train image, or the --label-fraction draw. Every train image is
    # still embedded: exports, retrieval and --whiten use them all, as they would an unlabelled pool
    voters, chosen = training_labels(train_base, args) if not args.skip_knn else (None, "")

    # ---- model: backbone of the checkpoint, head removed. Same seed on every rank: with
    # --pretrained none all ranks must embed with the same random init
    torch.manual_seed(args.seed)
    model, source, _ = pretrained_backbone(args)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    log(f"=> {args.arch} from {source}; {len(train_base)} train" + (f", {len(val_base)} val" if need_val else "")
        + f" images at {args.crop_size} px, {env.world_size} process(es), batch {batch_size}/process on {env.device}")

    if args.export_embeddings and is_main_process():  # found out before the extraction, not after it
        check_export_space(args, len(train_base) + (len(val_base) if need_val else 0), model.fc.in_features)

    # ---- features of every split needed
    train = Split("train", train_base, *embed(model, train_base, "train", args, env, batch_size, workers))
    val = Split("val", val_base, *embed(model, val_base, "val", args, env, batch_size, workers)) if need_val else None
    log(f"=> features: {tuple(train.feats.shape)} train" + (f", {tuple(val.feats.shape)} val" if val is not None else "")
        + f", {train.feats.dtype} on {train.feats.device}")

    # ---- the reports (knn/outputs.py), cheap next to extraction: rank 0 makes them, the others wait
    if is_main_process():
        tensorboard = TensorBoardLog(args.output_dir, args.tensorboard)
        if not args.skip_knn:
            knn_report(train, val, voters, chosen, classes, args, tree, tensorboard)
        if args.export_embeddings:
            export_splits([train] + ([val] if val is not None else []), classes, args)
        if args.retrieval or args.query:
            retrieval_grids(model, train, val if query_split == "val" else train, classes, args, env.device,
                            tensorboard)
        if args.plot_embeddings:
            embedding_maps(val if val is not None else train, classes, args)
        tensorboard.close()
    barrier()


main = script_main(get_args_parser, finalize_args, main_worker)


if __name__ == "__main__":
    main()
