"""main_curate.py's numbered findings, one function each, on the embedded images (curate/
items.py `Items`): 1. duplicates, 2. outliers, 3. label errors and suggestions, 4. what to
label next; then the outputs (clean csv, report.html, TensorBoard). Each finding adds its
report section, its line of the report's settings and the rows --clean-drop drops to one
`Findings`."""
import argparse
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.log.progress import log
from common.log.tensorboard import TensorBoardLog
from curate.duplicates import file_hash, find_duplicates, redundant_rows
from curate.embedding_map import map_section
from curate.items import Items
from curate.labels import knn_probs, label_issues, probe_probs
from curate.outliers import outlier_scores
from curate.report import Section, write_csv, write_html
from curate.search import self_neighbours
from curate.sections import (duplicates_section, label_errors_section, outliers_section, selection_section,
                             suggestions_section)
from curate.select import k_center_greedy, typical_candidates

Neighbours = Optional[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Findings:
    """What the findings add up to: the report's sections and settings, and the rows the
    clean csv leaves out (--clean-drop)."""
    settings: Dict[str, object]
    sections: List[Section] = field(default_factory=list)
    drop: Set[int] = field(default_factory=set)


def shared_neighbours(items: Items, args: argparse.Namespace) -> Neighbours:
    """One neighbour search that serves the duplicates and the (all-class) outliers."""
    if "duplicates" in args.findings or "outliers" in args.findings:
        return self_neighbours(items.feats, max(args.dup_k, args.outlier_k), args.index, args.chunk_size)
    return None


def duplicates(items: Items, neighbours: Neighbours, args: argparse.Namespace, found: Findings) -> None:
    """1. Same bytes, or cosine >= --dup-threshold (or --dup-rule relative) among the --dup-k nearest."""
    sim, idx = neighbours[0][:, :args.dup_k + 1], neighbours[1][:, :args.dup_k + 1]
    pairs = find_duplicates(sim, idx, [file_hash(p) for p in items.paths], items.splits, args.dup_threshold,
                            args.dup_rule, args.dup_ratio, args.dup_k)
    rule = (f"distance <= {args.dup_ratio} x the {args.dup_k}-th neighbour's" if args.dup_rule == "relative"
            else f"cosine >= {args.dup_threshold}")
    found.sections.append(duplicates_section(items, pairs, rule, args.output_dir))
    found.settings["near-duplicates"] = rule
    if "duplicates" in args.clean_drop:
        found.drop.update(redundant_rows(pairs, items.splits))


def outliers(items: Items, neighbours: Neighbours, args: argparse.Namespace, found: Findings) -> None:
    """2. Images far from their k-th neighbour (within their class with --outlier-per-class)."""
    scores = outlier_scores(items.feats, args.outlier_k, items.labels if args.outlier_per_class else None,
                            args.index, args.chunk_size, neighbours, args.outlier_score)
    found.sections.append(outliers_section(items, scores, args.outlier_k, args.outlier_per_class, args.outlier_score,
                                           args.output_dir))
    found.settings["outliers"] = f"{args.outlier_score} score, k = {args.outlier_k}"
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
    probs = [probe_probs(lab_f, lab_l, num_classes, args.probe_folds, args.seed, args.probe_steps)
             for _ in range(args.label_method != "knn")]
    probs += [knn_probs(lab_f, lab_l, lab_f, num_classes, args.label_k, leave_out_self=True)
              for _ in range(args.label_method != "probe")]
    suspected, suggested, self_conf = label_issues(sum(probs) / len(probs), lab_l, args.label_rule)
    found.sections.append(label_errors_section(items, lab_rows, suspected, suggested, self_conf, args.label_method,
                                               out))
    found.settings["label errors"] = (f"{args.label_method} out-of-fold probabilities, confident learning "
                                      f"({args.label_rule})")
    if "labels" in args.clean_drop:
        found.drop.update(lab_rows[suspected].tolist())
    if len(unl_rows):
        found.sections.append(suggestions_section(items, unl_rows, knn_probs(
            lab_f, lab_l, items.feats[unl_rows.to(items.feats.device)], num_classes, args.label_k), out))


def selection(items: Items, args: argparse.Namespace, found: Findings) -> None:
    """4. What to label next: --select unlabelled images by k-center greedy from the labelled ones."""
    lab_rows = (items.labels >= 0).nonzero().squeeze(1)
    unl_rows = (items.labels < 0).nonzero().squeeze(1)
    if args.select > len(unl_rows):
        raise UserError(f"--select {args.select} asks for more images than the {len(unl_rows)} readable "
                        f"unlabelled ones; pass --select {len(unl_rows)} or less")
    candidates = typical_candidates(items.feats, unl_rows, args.select_typical, args.select, args.outlier_k,
                                    args.chunk_size)
    picks, gaps = k_center_greedy(items.feats, candidates, lab_rows, args.select, args.seed, args.chunk_size)
    found.sections.append(selection_section(items, picks, gaps, len(unl_rows), args.select_typical,
                                            args.output_dir))


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
