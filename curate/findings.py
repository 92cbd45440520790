"""main_curate.py's numbered findings, one function each, on the embedded images (curate/
items.py `Items`): 1. duplicates, 2. outliers, 3. label errors and suggestions, 4. what to
label next; then the outputs (clean csv, report.html, TensorBoard). Each finding adds its
report section, its line of the report's settings and the rows --clean-drop drops to one
`Findings`."""
import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from PIL import Image

from common.data.channels import channels_of
from common.errors import UserError
from common.log.progress import log
from common.log.tensorboard import TensorBoardLog
from curate.copies import SCALE_K, confirm_copies, pixel_neighbours, shift_px
from curate.duplicates import find_duplicates, image_hash, join_pairs, redundant_rows
from curate.embedding_map import map_section
from curate.items import Items
from curate.labels import knn_probs, label_issues, oof_accuracy, probe_probs, strength_notes
from curate.outliers import combined_scores, group_k, outlier_scores
from curate.pixels import STATS, Pixels, read_pixels, stats_z
from curate.report import Section, write_csv, write_html
from curate.search import self_neighbours
from curate.sections import (duplicates_section, label_errors_section, outliers_section, selection_section,
                             suggestions_section)
from curate.select import k_center_greedy, typical_candidates, typiclust

Neighbours = Optional[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Findings:
    """What the findings add up to: the report's sections and settings, and the rows the
    clean csv leaves out (--clean-drop)."""
    settings: Dict[str, object]
    sections: List[Section] = field(default_factory=list)
    drop: Set[int] = field(default_factory=set)


def shared_neighbours(items: Items, args: argparse.Namespace) -> Neighbours:
    """One neighbour search that serves the duplicates and the (all-class) outliers, their
    group signal included."""
    if "duplicates" in args.findings or "outliers" in args.findings:
        k = max(args.dup_k, args.outlier_k)
        if "outliers" in args.findings and not args.outlier_per_class:
            k = max(k, group_k(len(items), args.outlier_k))
        return self_neighbours(items.feats, k, args.index, args.chunk_size)
    return None


def shared_pixels(items: Items, args: argparse.Namespace, workers: int) -> Optional[Pixels]:
    """One pass over the pixels: the thumbnails the copies are confirmed on and the statistics
    the outliers are scored on."""
    if (args.dup_rule == "pixels" and "duplicates" in args.findings) or "outliers" in args.findings:
        return read_pixels(items.sources, workers, channels=channels_of(args))
    return None


def shared_copy_search(items: Items, pixels: Optional[Pixels], args: argparse.Namespace) -> Neighbours:
    """One search of every thumbnail's nearest thumbnails by shifted correlation (--dup-rule
    pixels; curate/copies.py): the copies' candidates, and for the outliers each image's best
    pixel twin (an image that another one matches on the pixels is not foreign to the set)."""
    if pixels is None or args.dup_rule != "pixels":
        return None
    start = time.time()
    shift = shift_px(pixels.thumbs.shape[-1], pixels.side)
    found = pixel_neighbours(pixels.thumbs, max(args.dup_k, SCALE_K), shift, items.feats.device)
    log(f"=> copy search: the {max(args.dup_k, SCALE_K)} nearest thumbnails of {len(items)} images by shifted "
        f"correlation ({time.time() - start:.0f} s)")
    return found


def duplicates(items: Items, neighbours: Neighbours, pixels: Optional[Pixels], copies: Neighbours,
               args: argparse.Namespace, found: Findings) -> None:
    """1. Same bytes; then near copies confirmed on the pixels (--dup-rule pixels: candidates
    from the --dup-k nearest embeddings and thumbnails), or near in the embedding (relative,
    cosine) among the --dup-k nearest."""
    sim, idx = neighbours[0][:, :args.dup_k + 1], neighbours[1][:, :args.dup_k + 1]
    hashes = [image_hash(base, i) for base, i in items.sources]
    if args.dup_rule == "pixels":
        start = time.time()
        thumbs = pixels.thumbs
        shift = shift_px(thumbs.shape[-1], pixels.side)
        candidates = [(min(r, int(j)), max(r, int(j))) for nb in (copies[1], idx) for r, row in enumerate(nb.tolist())
                      for j in row if j != r]
        near = confirm_copies(thumbs, candidates, copies, shift, args.copy_ratio)
        pairs = join_pairs(hashes, items.splits, near, "pixels")
        rule = (f"pixel correlation distance <= {args.copy_ratio} x the {SCALE_K}th nearest thumbnail's "
                f"({thumbs.shape[-1]} px grayscale, aligned to a quarter pixel within +-{shift} px)")
        log(f"=> copies: {len(set(candidates))} candidate pairs from the {args.dup_k} nearest embeddings and "
            f"thumbnails, {len(near)} confirmed on the pixels ({time.time() - start:.0f} s)")
    else:
        pairs = find_duplicates(sim, idx, hashes, items.splits, args.dup_threshold, args.dup_rule, args.dup_ratio,
                                args.dup_k)
        rule = (f"embedding distance <= {args.dup_ratio} x the {args.dup_k}-th neighbour's"
                if args.dup_rule == "relative" else f"embedding cosine >= {args.dup_threshold}")
    found.sections.append(duplicates_section(items, pairs, rule, args.output_dir))
    found.settings["near-duplicates"] = rule
    if "duplicates" in args.clean_drop:
        found.drop.update(redundant_rows(pairs, items.splits))


def outliers(items: Items, neighbours: Neighbours, pixels: Pixels, copies: Neighbours, args: argparse.Namespace,
             found: Findings) -> None:
    """2. Images far from their k-th neighbour (within their class with --outlier-per-class),
    from the rest as a group, or with pixel statistics no other image has: the largest of
    the signals' robust z-scores (curate/outliers.py combined_scores)."""
    labels = items.labels if args.outlier_per_class else None
    embedding = outlier_scores(items.feats, args.outlier_k, labels, args.index, args.chunk_size, neighbours,
                               args.outlier_score)
    gk = group_k(len(items), args.outlier_k)
    group = outlier_scores(items.feats, gk, labels, args.index, args.chunk_size, neighbours, "kth")
    twin = None if copies is None else copies[0][:, 0]  # each image's best correlation with another one
    scores, signals = combined_scores(embedding, group, stats_z(pixels), twin)
    found.sections.append(outliers_section(items, scores, signals, twin, args.outlier_k, gk, args.outlier_per_class,
                                           args.outlier_score, args.output_dir))
    found.settings["outliers"] = (f"the largest robust z-score of: the embedding's {args.outlier_score} score "
                                  f"(k = {args.outlier_k}), the group signal (k = {gk}) and {len(STATS)} pixel "
                                  f"statistics")
    if "outliers" in args.clean_drop:
        found.drop.update(torch.argsort(scores, descending=True)[:int(args.clean_outliers * len(items))].tolist())


def label_findings(items: Items, num_classes: int, args: argparse.Namespace, found: Findings) -> None:
    """3. Suspected label errors from out-of-fold probabilities (--label-method), and labels
    suggested for the unlabelled images by kNN vote; skipped below two labelled classes."""
    lab_rows = (items.labels >= 0).nonzero().squeeze(1)
    unl_rows = (items.labels < 0).nonzero().squeeze(1)
    if not (num_classes > 1 and len(lab_rows) > 1):
        log("=> labels: skipped, the data has fewer than two labelled classes")
        return
    out = args.output_dir
    lab_f, lab_l = items.feats[lab_rows.to(items.feats.device)], items.labels[lab_rows]
    start = time.time()
    probs: Dict[str, torch.Tensor] = {}
    if args.label_method != "knn":
        log(f"=> labels: out-of-fold probe on {len(lab_rows)} labelled images, {args.probe_folds} folds of "
            f"{args.probe_iters} L-BFGS iterations")
        probs["probe"] = probe_probs(lab_f, lab_l, num_classes, args.probe_folds, args.seed, args.probe_iters).probs
    if args.label_method != "probe":
        probs["kNN vote"] = knn_probs(lab_f, lab_l, lab_f, num_classes, args.label_k, leave_out_self=True)
    used = sum(probs.values()) / len(probs)
    suspected, suggested, self_conf = label_issues(used, lab_l, args.label_rule)
    accuracy = {name: oof_accuracy(p, lab_l) for name, p in probs.items()}
    if len(probs) > 1:
        accuracy["their mean (used)"] = oof_accuracy(used, lab_l)
    notes = strength_notes(accuracy, int(suspected.sum()), len(lab_rows))
    log(f"=> labels: {notes[0]} ({time.time() - start:.0f} s)")
    for note in notes[1:]:
        log(f"=> labels: {note}")
    found.sections.append(label_errors_section(items, lab_rows, suspected, suggested, self_conf, args.label_method,
                                               out, notes))
    how = {"probe": f"{args.probe_folds}-fold logistic regression", "kNN vote": f"{args.label_k}-neighbour vote"}
    found.settings["label errors"] = (f"out-of-fold {' and '.join(how[name] for name in probs)}, confident "
                                      f"learning ({args.label_rule}); {notes[0]}")
    if "labels" in args.clean_drop:
        found.drop.update(lab_rows[suspected].tolist())
    if len(unl_rows):
        found.sections.append(suggestions_section(items, unl_rows, knn_probs(
            lab_f, lab_l, items.feats[unl_rows.to(items.feats.device)], num_classes, args.label_k), out))


def selection(items: Items, args: argparse.Namespace, found: Findings) -> None:
    """4. What to label next: --select unlabelled images by --select-method, TypiClust or k-center
    greedy, given the labelled ones."""
    lab_rows = (items.labels >= 0).nonzero().squeeze(1)
    unl_rows = (items.labels < 0).nonzero().squeeze(1)
    if args.select > len(unl_rows):
        raise UserError(f"--select {args.select} asks for more images than the {len(unl_rows)} readable "
                        f"unlabelled ones; pass --select {len(unl_rows)} or less")
    start = time.time()
    if args.select_method == "typiclust":
        picks, scores = typiclust(items.feats, unl_rows, lab_rows, args.select, args.seed, chunk_size=args.chunk_size)
        how = ("TypiClust (k-means clusters, the least labelled first: the most typical image of each, a random "
               "one where it holds one already)")
        score = "typicality"
    else:
        candidates = typical_candidates(items.feats, unl_rows, args.select_typical, args.select, args.outlier_k,
                                        args.chunk_size)
        picks, scores = k_center_greedy(items.feats, candidates, lab_rows, args.select, args.seed, args.chunk_size)
        how, score = "k-center greedy" + (f" among the {args.select_typical:.0%} most typical"
                                          if args.select_typical < 1 else ""), "distance"
    log(f"=> select: {len(picks)} by {args.select_method} in {time.time() - start:.0f} s")
    found.sections.append(selection_section(items, picks, scores, len(unl_rows), how, score, args.output_dir))
    found.settings["what to label next"] = how


def write_outputs(items: Items, found: Findings, args: argparse.Namespace) -> None:
    """--write-clean-csv's clean_<split>.csv (without the --clean-drop rows), report.html with
    every section, the sections' lines in the log, and their grids in TensorBoard."""
    out, drop, sections = args.output_dir, found.drop, found.sections
    if args.write_clean_csv:
        for split in dict.fromkeys(items.splits):
            path = write_csv(os.path.join(out, f"clean_{split}.csv"), ["path", "label"],
                             [[items.paths[r], items.class_of(items.labels[r])] for r in range(len(items))
                              if items.splits[r] == split and r not in drop])
            log(f"=> {path}: {sum(s == split for s in items.splits) - sum(items.splits[r] == split for r in drop)} "
                f"kept of the {split} images")
    # the map first: an overview of every image, marking what the sections below flag
    sections.insert(0, map_section(items, {s.title: s.marked for s in sections if s.marked}, out, seed=args.seed))
    report = write_html(out, "Data curation report", found.settings, sections)
    for s in sections:
        log(f"=> {s.title.lower()}: {s.summary}")
    log(f"=> report: {report}")
    tensorboard = TensorBoardLog(out, args.tensorboard)
    for s in sections:
        for g in s.grids:
            tensorboard.image(f"curate/{os.path.basename(g)[:-4]}", np.asarray(Image.open(g).convert("RGB")))
    tensorboard.close()
