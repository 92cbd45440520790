#!/usr/bin/env python
"""Clean and choose data with a pretrained backbone: duplicates (and train/val leakage),
outliers, what to label next, label suggestions and suspected label errors, from one
embedding of every image. Nothing in DATA is modified, moved or deleted.

    python main_curate.py /data/photos --pretrained runs/moco/checkpoint_last.pth.tar
    python main_curate.py /data/labelled --unlabelled /data/pool --pretrained ckpt.pth.tar --select 500 \\
        --write-clean-csv --amp --multiprocessing-distributed

Writes OUTPUT_DIR/report.html (open it in a browser; it links every csv and grid),
duplicates.csv, outliers.csv, label_errors.csv, label_suggestions.csv, select.csv and
clean_<split>.csv. Features are centred and L2-normalised; every search is chunked
(common/eval/knn.py), so no N x N matrix is built (memory: docs/curate.md).
"""
import argparse
import fnmatch
import os
import re
import shutil
from typing import Sequence

import torch

from common.ckpt.io import prepare_output_dir, previous_run_files
from common.ckpt.pretrained import follow_checkpoint
from common.cli import ArgumentParser, add_eval_args, check_common_flags, switch
from common.data.display import check_bands
from common.distributed.collectives import DistEnv, barrier, is_main_process
from common.distributed.launch import script_main, start_worker
from common.distributed.world import expected_world_size, is_first_process, per_worker
from common.errors import UserError
from common.eval.inputs import pretrained_backbone
from common.extras import require
from common.log.progress import log
from curate.duplicates import RULES
from curate.embed import EMBEDDINGS, embed_split, keep_splits, stop_with_a_sentence
from curate.findings import (Findings, duplicates, label_findings, outliers, selection, shared_neighbours,
                             shared_copy_search, shared_pixels, write_outputs)
from curate.items import join_splits, read_splits
from curate.labels import METHODS, PROBE_ITERS, RULES as LABEL_RULES
from curate.outliers import SCORES
from curate.search import INDEXES
from curate.select import METHODS as SELECT_METHODS

FINDINGS = ("duplicates", "outliers", "labels")
# near copies (docs/curate.md: bench/curate.py): --dup-rule pixels, a pair's pixel correlation distance
# at most COPY_RATIO x its images' smaller distance to their SCALE_K-th (4th) nearest thumbnail; --dup-rule relative,
# the embedding's cosine distance at most DUP_RATIO x the --dup-k-th neighbour's; DUP_THRESHOLD: the
# absolute cosine of --dup-rule cosine
COPY_RATIO = 0.25
DUP_RATIO = 0.25
DUP_THRESHOLD = 0.95

# Every name main_curate.py writes in --output-dir, here and nowhere else: curate/sections.py's csvs,
# grids/ and thumbnails/, curate/report.py's report.html, curate/embed.py's shards, and this script's
# clean csvs and TensorBoard events. A new run refuses a folder holding any of them, --overwrite
# removes them all and --resume all but the embeddings: a finding of an earlier run (a clean csv
# that no longer matches duplicates.csv, a select.csv this run did not ask for) never sits beside
# this run's.
OUTPUTS = ("report.html", "duplicates.csv", "outliers.csv", "label_errors.csv", "label_suggestions.csv",
           "select.csv", "clean_*.csv", "grids", "thumbnails", "tensorboard", EMBEDDINGS)
RUN_FILES = re.compile("|".join(fnmatch.translate(name) for name in OUTPUTS))
FINDING_FILES = re.compile("|".join(fnmatch.translate(name) for name in OUTPUTS if name != EMBEDDINGS))


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="find duplicates, leakage, outliers, label errors and what to label next "
                                        "with a pretrained backbone")
    add_eval_args(parser, batch_size=256, name="curate", helps={
        "batch_size": "global batch size of feature extraction over all processes",
        "print_freq": "progress line every N batches of feature extraction",
        "seed": "seed of the --pretrained none init, the probe folds and --select (TypiClust's k-means start, "
                "k-center's first pick)",
        "output_dir": "folder for the report, csvs, grids and embedding shards (default: ./runs/curate)",
        "crop_size": "eval crop size (default: the --pretrained run's crop, else 224; 32 for CIFAR/MNIST/synthetic)",
        "amp": "mixed precision feature extraction"})
    parser.set_defaults(seed=0)
    g = parser.add_argument_group("curate")
    g.add_argument("--findings", default=list(FINDINGS), nargs="+", choices=FINDINGS,
                   help="what to look for (labels: suspected label errors and suggestions for unlabelled images)")
    g.add_argument("--unlabelled", default="", metavar="DIR",
                   help="a folder of unlabelled images (flat or nested) to suggest labels for and --select from, "
                        "besides the unlabelled images of DATA")
    g.add_argument("--select", default=0, type=int, metavar="N",
                   help="write select.csv: the N unlabelled images to label next (--select-method)")
    g.add_argument("--select-method", default=SELECT_METHODS[0], choices=SELECT_METHODS,
                   help="typiclust: k-means into labelled + N clusters (at most 500), a pick from each in turn, "
                        "those holding the fewest labelled images first: its most typical image, or a random one "
                        "where it holds one already (beat random picks at N = 50 and 200, matched them at 1,000); "
                        "k-center: greedy farthest point from the labelled (lost to random at 1,000: docs/curate.md)")
    g.add_argument("--select-typical", default=0.5, type=float, metavar="FRACTION",
                   help="--select-method k-center picks among this fraction of the pool nearest to their "
                        "--outlier-k-th neighbour (1: the whole pool, plain k-center greedy)")
    g.add_argument("--index", default="torch", choices=INDEXES,
                   help="neighbour search: exact chunked torch (GPU when present) or faiss (pip install faiss-cpu)")
    g.add_argument("--chunk-size", default=1024, type=int, help="queries per similarity chunk")
    g.add_argument("--shard-size", default=50000, type=int,
                   help="images per embedding shard in OUTPUT_DIR/embeddings/ (an interrupted run resumes there)")
    switch(g, "--resume",
           help="continue in an --output-dir that holds an earlier curation: its embedding shards are reused where "
                "the model and files are the same, every other output is written anew")
    switch(g, "--overwrite",
           help="start over in an --output-dir that holds an earlier curation, deleting its outputs and embeddings "
                "(without it, or --resume, such a folder is refused)")
    g = parser.add_argument_group("duplicates and outliers")
    g.add_argument("--dup-rule", default="pixels", choices=("pixels",) + RULES,
                   help="near copies: pixels (candidates from the embedding's and the thumbnails' neighbours, "
                        "confirmed by the thumbnails' correlation over small shifts; finds re-encoded, resized and "
                        "shifted copies), or near-duplicates in the embedding: relative (cosine distance at most "
                        "--dup-ratio x the smaller of the two images' distances to their --dup-k-th neighbour) or "
                        "cosine (at least --dup-threshold)")
    g.add_argument("--copy-ratio", default=COPY_RATIO, type=float,
                   help="--dup-rule pixels: a pair's correlation distance (aligned to a quarter pixel) over its "
                        "images' smaller distance to their 4th nearest thumbnail")
    g.add_argument("--dup-ratio", default=DUP_RATIO, type=float,
                   help="--dup-rule relative: a pair's distance over its images' --dup-k-th-neighbour distance")
    g.add_argument("--dup-threshold", default=DUP_THRESHOLD, type=float,
                   help="--dup-rule cosine: cosine (centred features) at or above which two images are near-duplicates")
    g.add_argument("--dup-k", default=10, type=int,
                   help="neighbours searched per image for near-duplicates, in the embedding and (--dup-rule "
                        "pixels) the thumbnails (and --dup-rule relative's scale)")
    g.add_argument("--outlier-score", default="relative", choices=SCORES,
                   help="relative: the distance to the --outlier-k-th neighbour over its --outlier-k neighbours' "
                        "median of it (LOF-style: against the local density); kth: the distance itself")
    g.add_argument("--outlier-k", default=20, type=int,
                   help="outlier neighbourhood: 1 - cosine to the k-th neighbour (relative: k over twice the size "
                        "of a group of look-alike outliers still finds them)")
    switch(g, "--outlier-per-class", help="neighbours of the same class only")
    g = parser.add_argument_group("label errors")
    g.add_argument("--label-method", default="both", choices=METHODS,
                   help="out-of-fold probabilities for label errors: a linear probe over --probe-folds folds, or "
                        "a leave-one-out kNN vote (--label-k), or the mean of both")
    g.add_argument("--label-rule", default="prune", choices=LABEL_RULES,
                   help="Confident Learning's rule: prune (by noise rate: per class pair the number the confident "
                        "joint estimates, largest margin first; cleanlab's default) or confident (every image "
                        "confidently of another class)")
    g.add_argument("--label-k", default=20, type=int,
                   help="neighbours that vote for label suggestions (and --label-method knn)")
    g.add_argument("--probe-folds", default=5, type=int, help="folds of the out-of-fold probe")
    g.add_argument("--probe-iters", default=PROBE_ITERS, type=int,
                   help="L-BFGS iterations of each fold's logistic regression, each about one pass over the fold's "
                        "images (the cost follows the number of labelled images)")
    g = parser.add_argument_group("clean csv")
    switch(g, "--write-clean-csv",
           help="clean_<split>.csv: the images kept, as --dataset csv manifests (DATA is never changed)")
    g.add_argument("--clean-drop", default=["duplicates"], nargs="+", choices=("duplicates", "outliers", "labels"),
                   help="what the clean csv leaves out: all copies of a duplicate group but one (a val copy over "
                        "train ones), the top --clean-outliers outliers, the suspected label errors")
    g.add_argument("--clean-outliers", default=0.005, type=float, help="fraction of images --clean-drop outliers drops")
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Derived defaults and impossible values, before any worker starts."""
    check_common_flags(args)
    args.output_dir = args.output_dir or os.path.join("runs", "curate")
    if args.resume and args.overwrite:
        raise UserError("--resume reuses the earlier embeddings and --overwrite deletes them; pass one of the two")
    check_outside_data(args)
    # refused here, before any work; what --resume or --overwrite replace is deleted only once every
    # check that can still refuse the run (the flags against the data, the checkpoint) has passed
    prepare_output_dir(args.output_dir, new_run=not (args.resume or args.overwrite), lock=is_first_process(args),
                       run_files=RUN_FILES, resume_hint="--resume to continue it (its embeddings are reused)")
    follow_checkpoint(args)
    check_bands(args.show_bands, args.in_channels)  # before the embedding, not when the grids are drawn
    for flag, value, least in (("--select", args.select, 0), ("--dup-k", args.dup_k, 1),
                               ("--outlier-k", args.outlier_k, 1), ("--label-k", args.label_k, 1),
                               ("--probe-folds", args.probe_folds, 2), ("--probe-iters", args.probe_iters, 1),
                               ("--chunk-size", args.chunk_size, 1), ("--shard-size", args.shard_size, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not 0.0 < args.copy_ratio < 1.0:
        raise UserError(f"--copy-ratio is a distance ratio in (0, 1), got {args.copy_ratio}; e.g. {COPY_RATIO}")
    if not 0.0 < args.dup_ratio < 1.0:
        raise UserError(f"--dup-ratio is a distance ratio in (0, 1), got {args.dup_ratio}; e.g. {DUP_RATIO}")
    if not -1.0 <= args.dup_threshold <= 1.0:
        raise UserError(f"--dup-threshold is a cosine in [-1, 1], got {args.dup_threshold}; e.g. {DUP_THRESHOLD}")
    if not 0.0 < args.select_typical <= 1.0:
        raise UserError(f"--select-typical is a fraction in (0, 1], got {args.select_typical}; e.g. 0.5")
    if not 0.0 <= args.clean_outliers < 1.0:
        raise UserError(f"--clean-outliers is a fraction in [0, 1), got {args.clean_outliers}")
    if args.index == "faiss":
        require("faiss", "faiss-cpu")
    if args.unlabelled and not os.path.isdir(args.unlabelled):
        raise UserError(f"--unlabelled {args.unlabelled!r} is not a folder; pass the folder of unlabelled images")
    per_worker(args.batch_size, expected_world_size(args))
    return args


def check_outside_data(args: argparse.Namespace) -> None:
    """An --output-dir inside an image folder that is read (DATA, the --unlabelled pool) is
    refused rather than skipped when reading: the next run would take its grids and thumbnails
    for images (a class folder of them), and a folder of images is never written to. A csv's
    folder is not scanned, so outputs beside the csv are harmless."""
    out = os.path.realpath(args.output_dir)
    scanned = [("DATA", args.data)] if args.dataset == "imagefolder" else []
    for flag, folder in scanned + [("--unlabelled", args.unlabelled)]:
        if folder and os.path.isdir(folder):
            root = os.path.realpath(folder)
            if out == root or out.startswith(root + os.sep):
                raise UserError(f"--output-dir {args.output_dir!r} is inside {flag} {folder!r}, where the next run "
                                f"would read its grids and thumbnails as images; pass an --output-dir outside it")


def clear_earlier_run(args: argparse.Namespace, splits: Sequence[str]) -> None:
    """Rank 0, before the embedding: --overwrite removes every output of an earlier run, --resume
    all but the embedding shards of this run's splits, so no file this run does not write again
    is left beside its own."""
    if args.overwrite:
        prepare_output_dir(args.output_dir, new_run=True, overwrite=True, lock=False, run_files=RUN_FILES)
    if not args.resume:
        return
    earlier = previous_run_files(args.output_dir, FINDING_FILES)
    for name in earlier:
        path = os.path.join(args.output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if earlier:
        log(f"=> --resume: removed the earlier run's {', '.join(earlier)} from {args.output_dir}; its embeddings "
            f"are reused where the model and files are the same")
    keep_splits(args.output_dir, splits)


def check_neighbourhoods(args: argparse.Namespace, labels: torch.Tensor, classes: int) -> None:
    """--dup-k, --outlier-k and --label-k against the images that can be neighbours, once the
    data is read (-1: unlabelled). The search keeps what there is, so a k at or past the last
    neighbour makes the farthest image the k-th: 100000 on 78 images would scale every
    neighbourhood by the whole set. --select-typical's use of --outlier-k within a small pool
    is left to clamp to the pool: the defaults must still pick from a dozen images."""
    n, lab = len(labels), int((labels >= 0).sum())
    checks = []
    if "duplicates" in args.findings:
        checks.append(("--dup-k", args.dup_k, n - 1, "each image", "leave duplicates out of --findings"))
    if "outliers" in args.findings and args.outlier_per_class:
        largest = int(torch.bincount(labels + 1).max())
        checks.append(("--outlier-k", args.outlier_k, largest - 1, "an image of the largest class "
                       "(--outlier-per-class)", "drop --outlier-per-class"))
    elif "outliers" in args.findings:
        checks.append(("--outlier-k", args.outlier_k, n - 1, "each image", "leave outliers out of --findings"))
    if "labels" in args.findings and classes > 1 and lab > 1:
        # the leave-one-out vote has the other labelled images; the suggestions all of them
        others = lab if args.label_method == "probe" else lab - 1
        checks.append(("--label-k", args.label_k, others, "each labelled image", "leave labels out of --findings"))
    for flag, k, others, who, way_out in checks:
        if k >= others >= 2:
            raise UserError(f"{flag} {k} must be less than the {others} images {who} can have as neighbours (at "
                            f"{others} or more the neighbourhood is every image, its scale the farthest one); pass "
                            f"{flag} {others - 1} or less")
        if k >= others:
            raise UserError(f"{flag} {k}: {who} has {others} possible neighbour(s), too few for a neighbourhood "
                            f"that leaves an image out; add images, or {way_out}")


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args)
    with stop_with_a_sentence(args.output_dir):
        run_curation(args, env, batch_size, workers)


def run_curation(args: argparse.Namespace, env: DistEnv, batch_size: int, workers: int) -> None:
    """Read the data, embed it (resumably) and write the findings; rank 0 does all but the embedding."""
    # ---- data: train, val when there is one, and the --unlabelled pool (labels -1)
    parts, classes = read_splits(args)
    total = sum(len(ds) for _, ds in parts)
    check_neighbourhoods(args, torch.tensor([t for _, ds in parts for t in ds.targets]), len(classes))

    # ---- model: the checkpoint's backbone, head removed (same seed on every rank for --pretrained none)
    torch.manual_seed(args.seed)
    model, source, _ = pretrained_backbone(args)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    log(f"=> {args.arch} from {source}; {total} images ({', '.join(f'{len(ds)} {n}' for n, ds in parts)}) at "
        f"{args.crop_size} px, {env.world_size} process(es) on {env.device}")

    # ---- embed every image once (resumable shards in OUTPUT_DIR/embeddings/)
    if is_main_process():
        clear_earlier_run(args, [name for name, _ in parts])
    barrier()  # the other ranks read the shards' manifests only once rank 0 has cleared them
    items = join_splits([(name, ds, *embed_split(model, ds, name, args, env, batch_size, workers))
                         for name, ds in parts], classes, args.show_bands)
    check_neighbourhoods(args, items.labels, len(classes))  # again without the unreadable images
    if not is_main_process():  # the findings are cheap next to extraction: rank 0 does them
        barrier()
        return
    found = Findings({"pretrained": f"{args.pretrained} ({source})", "arch": args.arch, "crop size": args.crop_size,
                      "images": len(items), "classes": len(classes), "neighbour search": args.index})
    neighbours = shared_neighbours(items, args)  # one search for the duplicates and the outliers
    pixels = shared_pixels(items, args, workers)  # one pass: thumbnails (copies) and statistics (outliers)
    copies = shared_copy_search(items, pixels, args)  # the nearest thumbnails: copies' candidates, outliers' twins

    # ---- the findings (curate/findings.py), each adding its report section
    if "duplicates" in args.findings:  # 1. same bytes, or a copy on the pixels (or near in the embedding)
        duplicates(items, neighbours, pixels, copies, args, found)
    if "outliers" in args.findings:  # 2. far in the embedding, alone as a group, or odd pixel statistics
        outliers(items, neighbours, pixels, copies, args, found)
    if "labels" in args.findings:  # 3. suspected errors from out-of-fold probabilities, suggestions by kNN vote
        label_findings(items, len(classes), args, found)
    if args.select:  # 4. what to label next: TypiClust (or k-center greedy) given the labelled images
        selection(items, args, found)

    # ---- outputs: the clean csv, report.html, TensorBoard
    write_outputs(items, found, args)
    barrier()


main = script_main(get_args_parser, finalize_args, main_worker)


if __name__ == "__main__":
    main()
