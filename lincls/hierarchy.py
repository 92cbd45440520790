"""Hierarchical labels (`--hierarchy-depth N`): a label tree read from nested class folders
or a csv with one column per level, one head per level on the shared backbone, the summed
per-level loss, consistent decoding, and the per-level, consistency and whole-path metrics.

A class is identified by its path from the root ('tops/shirt'), so the same name may
repeat under different parents. Every image sits at the deepest level, and its deepest
class fixes its class at every level above: datasets keep the deepest class as their
one integer target, and `LabelTree.level_targets` maps it up. That is why label
subsets, samplers, loaders and the DDP logits gather work on hierarchical data unchanged.
"""
import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.data.images import FileListDataset, is_image_file, read_csv_rows, walk_once
from common.eval.metrics import classification_report

SEP = "/"
DECODINGS = ("independent", "top-down", "path")


def add_hierarchy_args(parser: argparse.ArgumentParser, classifier: bool) -> None:
    g = parser.add_argument_group("hierarchical labels")
    g.add_argument("--hierarchy-depth", default=0, type=int, metavar="N",
                   help="labels with N levels: DATA/train/<level1>/.../<levelN>/image (imagefolder) or csv rows "
                        "`path,level1,...,levelN`; 0 = flat labels")
    if not classifier:
        return
    g.add_argument("--level-weights", default=None, type=float, nargs="+", metavar="W",
                   help="loss weight of each level, level 1 first (default: 1 each)")
    g.add_argument("--consistent", default=None, nargs="?", const="top-down", choices=DECODINGS[1:],
                   help="decode so every predicted class is a child of the predicted parent: top-down (each level "
                        "restricted to the children of the level above's prediction; the bare flag) or path (the "
                        "whole path with the highest summed log-probability)")
    g.add_argument("--balance-level", default=None, type=int, metavar="L",
                   help="level (1 = top) whose classes --balanced-sampling and --class-weights balance "
                        "(default: the deepest)")


def check_hierarchy_flags(args: argparse.Namespace, classifier: bool) -> None:
    """Fill --level-weights and --balance-level; reject values that cannot mean anything."""
    depth = args.hierarchy_depth
    if depth < 0:
        raise UserError(f"--hierarchy-depth {depth} must be 0 (flat labels) or the number of label levels, e.g. 2")
    if not classifier:
        return
    if not depth:
        given = [flag for flag, value in (("--level-weights", args.level_weights), ("--consistent", args.consistent),
                                          ("--balance-level", args.balance_level)) if value is not None]
        if given:
            raise UserError(f"{given[0]} only applies to hierarchical labels; add --hierarchy-depth N")
        return
    args.level_weights = args.level_weights or [1.0] * depth
    if len(args.level_weights) != depth or min(args.level_weights) < 0 or max(args.level_weights) <= 0:
        raise UserError(f"--level-weights {args.level_weights} must give {depth} non-negative weights, one per level "
                        f"(not all 0), e.g. --level-weights {' '.join(['1'] * depth)}")
    args.balance_level = depth if args.balance_level is None else args.balance_level
    if not 1 <= args.balance_level <= depth:
        raise UserError(f"--balance-level {args.balance_level} must be a level between 1 (top) and {depth} (deepest)")


# ---------------------------------------------------------------- the tree

class LabelTree:
    """The classes of every level, each named by its path from the root, and for every
    deepest class its ancestor at each level. Classes are sorted by path, level by level."""

    def __init__(self, leaf_paths: Sequence[Tuple[str, ...]], level_names: Sequence[str]):
        leaves = sorted(set(leaf_paths))
        self.level_names = list(level_names)
        depth = len(self.level_names)
        prefixes = [sorted({p[:level + 1] for p in leaves}) for level in range(depth)]
        self.classes = [[SEP.join(p) for p in level] for level in prefixes]
        index = [{p: i for i, p in enumerate(level)} for level in prefixes]
        # ancestors[l, leaf] = the leaf's class at level l (the deepest level maps to itself)
        self.ancestors = torch.tensor([[index[level][p[:level + 1]] for p in leaves] for level in range(depth)],
                                      dtype=torch.long).view(depth, len(leaves))
        # parents[l][c] = the class at level l-1 above class c of level l (level 0 has none)
        self.parents = [torch.zeros(0, dtype=torch.long)] + [
            torch.tensor([index[level - 1][p[:level]] for p in prefixes[level]], dtype=torch.long)
            for level in range(1, depth)]

    @property
    def depth(self) -> int:
        return len(self.level_names)

    @property
    def sizes(self) -> List[int]:
        return [len(c) for c in self.classes]

    @property
    def leaves(self) -> List[str]:
        return self.classes[-1]

    def level_targets(self, leaf_targets, level: int) -> torch.Tensor:
        """The class at `level` (0 = top) of each deepest-level target."""
        leaf_targets = torch.as_tensor(leaf_targets, dtype=torch.long)
        return self.ancestors[level].to(leaf_targets.device)[leaf_targets]

    def split(self, logits: torch.Tensor) -> List[torch.Tensor]:
        """The concatenated outputs of LevelHeads, one tensor per level."""
        return list(torch.split(logits, self.sizes, dim=1))


# ---------------------------------------------------------------- data

class HierarchicalDataset(FileListDataset):
    """Image files whose target is the deepest class (an index into `tree.leaves`)."""

    def __init__(self, samples: List[Tuple[str, Tuple[str, ...]]], level_names: Sequence[str], where: str,
                 tree: Optional[LabelTree] = None):
        self.tree = tree or LabelTree([p for _, p in samples], level_names)
        index = {tuple(c.split(SEP)): i for i, c in enumerate(self.tree.leaves)}
        unknown = sorted({SEP.join(p) for _, p in samples if p not in index})
        if unknown:
            raise UserError(f"classes {unknown[:3]} of {where!r} are not among the training classes; the val split "
                            f"must use the training split's class paths")
        super().__init__([(path, index[p]) for path, p in samples], list(self.tree.leaves))


def folder_samples(root: str, depth: int) -> List[Tuple[str, Tuple[str, ...]]]:
    """(image, class path) for root/<level1>/.../<levelN>/image; any image at another
    depth, or a class folder with no images, is a plain error."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root!r} does not exist; pass the folder that holds train/ and val/ (or the "
                        f"level-1 class folders)")
    samples = []
    for dirpath, dirnames, names in walk_once(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        images = sorted(n for n in names if is_image_file(n))
        if images and len(parts) != depth:
            raise UserError(f"--hierarchy-depth {depth} expects every image {depth} folders below {root!r} "
                            f"(<level1>/.../<level{depth}>/image), but {os.path.join(dirpath, images[0])!r} is "
                            f"{len(parts)} deep; give every branch {depth} levels of folders, or pass the "
                            f"--hierarchy-depth the tree has")
        if parts and not images and not dirnames:
            raise UserError(f"class folder {dirpath!r} holds no images; add images to it or remove the folder")
        samples += [(os.path.join(dirpath, n), parts) for n in images]
    if not samples:
        raise UserError(f"data folder {root!r} holds no images; put them in {root}/<level1>/.../<level{depth}>/")
    return samples


def csv_samples(csv_path: str, depth: int, tree: Optional[LabelTree] = None
                ) -> Tuple[List[Tuple[str, Tuple[str, ...]]], List[str]]:
    """(image, class path) for csv rows `path,level1,...,levelN` (paths relative to the
    csv; a header row names the levels), and the level names.

    The deepest level is required. A level above it may be left empty when the deepest
    name (with the levels that are given) has one parent path only: in the other rows
    of this csv, or in `tree` (the training classes) for a val csv. A name under two
    parents then cannot be placed, and that row is an error."""
    if not os.path.isfile(csv_path):
        raise UserError(f"csv manifest {csv_path!r} does not exist; pass a csv with rows `path,level1,...,level{depth}`")
    base = os.path.dirname(os.path.abspath(csv_path))
    names = [f"level{i + 1}" for i in range(depth)]
    rows: List[Tuple[int, str, List[str]]] = []
    for line, row in enumerate(read_csv_rows(csv_path), start=1):
        cells = [c.strip() for c in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        if not rows and cells[0].lower() in ("path", "file", "filename", "image"):
            names = [c or n for c, n in zip(cells[1:] + [""] * depth, names)]
            continue
        labels = cells[1:] + [""] * (depth + 1 - len(cells))
        if any(labels[depth:]):
            raise UserError(f"row {line} of {csv_path!r} has {len([c for c in labels if c])} labels but "
                            f"--hierarchy-depth is {depth}; give one column per level or pass the "
                            f"--hierarchy-depth the csv has")
        rows.append((line, cells[0], labels[:depth]))
    if not rows:
        raise UserError(f"csv manifest {csv_path!r} lists no images; add rows `path,{','.join(names)}`")
    for line, path, labels in rows:
        if not labels[-1]:
            raise UserError(f"row {line} of {csv_path!r} ({path}) has no {names[-1]} label; every image needs its "
                            f"deepest level (`path,{','.join(names)}`)")
        if any(SEP in c for c in labels):
            raise UserError(f"row {line} of {csv_path!r} has a label containing {SEP!r}, which separates the levels "
                            f"of a class path; give one name per column")
    # the full paths the deepest names are known under, to place rows that leave levels out
    known = ([tuple(c.split(SEP)) for c in tree.leaves] if tree is not None
             else sorted({tuple(labels) for _, _, labels in rows if all(labels)}))
    samples = []
    for line, path, labels in rows:
        if not all(labels):
            fits = [p for p in known if all(not given or given == have for given, have in zip(labels, p))]
            missing = names[labels.index("")]
            if not fits:
                raise UserError(f"row {line} of {csv_path!r} ({path}) has no {missing} label and "
                                f"{labels[-1]!r} appears in no complete row to take it from; fill in every level")
            if len(fits) > 1:
                parents = sorted({SEP.join(p[:-1]) for p in fits})
                raise UserError(f"row {line} of {csv_path!r} gives {names[-1]} {labels[-1]!r} without its {missing}, "
                                f"but {labels[-1]!r} appears under {len(parents)} parents ({', '.join(parents[:3])}); "
                                f"fill in that row's {missing}")
            labels = list(fits[0])
        samples.append((os.path.join(base, path), tuple(labels)))
    absent = [p for p, _ in samples if not os.path.isfile(p)]
    if absent:
        raise UserError(f"{len(absent)} file(s) listed in {csv_path!r} do not exist, e.g. {absent[0]!r}; paths are "
                        f"read relative to the csv's folder")
    return samples, names


def hierarchical_dataset(args: argparse.Namespace, split: str,
                         tree: Optional[LabelTree] = None) -> Optional[HierarchicalDataset]:
    """The labelled `split` ('train' or 'val') of --dataset imagefolder or csv with
    --hierarchy-depth levels; None when there is no val split. `tree`: the training
    split's, which the val split must use."""
    depth, root = args.hierarchy_depth, args.data
    if args.dataset == "csv":
        # DATA is train.csv, or a folder holding train.csv and val.csv (as common.data.datasets reads it)
        folder = os.path.isdir(root)
        path = os.path.join(root, f"{split}.csv") if folder else root if split == "train" else None
        if path is None or (split == "val" and not os.path.isfile(path)):
            return None
        samples, names = csv_samples(path, depth, tree)
    elif args.dataset == "imagefolder":
        has_split = os.path.isdir(os.path.join(root, "train"))
        path = os.path.join(root, split) if has_split else root if split == "train" else None
        if path is None or (split == "val" and not os.path.isdir(path)):
            return None
        samples = folder_samples(path, depth)
        names = [f"level{i + 1}" for i in range(depth)]
    else:
        raise UserError(f"--hierarchy-depth reads labels from nested class folders or a csv with one column per "
                        f"level; use --dataset imagefolder or --dataset csv instead of {args.dataset}")
    return HierarchicalDataset(samples, tree.level_names if tree is not None else names, path, tree)


# ---------------------------------------------------------------- model and loss

class LevelHeads(nn.Module):
    """One head per level on the same features. The outputs are concatenated (level 1
    first), so the classifier stays one module with one output: DDP, checkpoints
    (`module.fc.*`), the frozen backbone's sanity check and the logits gather need
    nothing new, and the backbone runs once per batch for every level."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=1)


class HierarchicalLoss(nn.Module):
    """Sum over levels of weight x cross-entropy of that level's head against the
    target's class at that level; `class_weight` weights the classes of `weighted_level`."""

    def __init__(self, tree: LabelTree, level_weights: Sequence[float], weighted_level: int = -1,
                 class_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.tree, self.level_weights = tree, list(level_weights)
        self.weighted_level = weighted_level % tree.depth
        self.register_buffer("ancestors", tree.ancestors.clone())
        self.register_buffer("class_weight", class_weight)

    def level_losses(self, logits: torch.Tensor, target: torch.Tensor) -> List[torch.Tensor]:
        return [F.cross_entropy(out, self.ancestors[level][target],
                                weight=self.class_weight if level == self.weighted_level else None)
                for level, out in enumerate(self.tree.split(logits))]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss for w, loss in zip(self.level_weights, self.level_losses(logits, target)))


# ---------------------------------------------------------------- decoding and metrics

def decode(logits: torch.Tensor, tree: LabelTree, decoding: str = "independent") -> List[torch.Tensor]:
    """Scores per level whose argmax is the decision. independent: each head on its own;
    top-down: each level's scores outside the children of the class predicted above are
    -inf; path: a class scores the best summed log-probability of a whole path through it,
    and every level's decision lies on the single best path."""
    levels = [x.float() for x in tree.split(logits)]
    if decoding == "independent":
        return levels
    if decoding == "top-down":
        out = [levels[0]]
        for level in range(1, tree.depth):
            parent = out[-1].argmax(dim=1)
            allowed = tree.parents[level].to(parent.device)[None, :] == parent[:, None]
            out.append(levels[level].masked_fill(~allowed, float("-inf")))
        return out
    if decoding != "path":
        raise ValueError(f"unknown decoding {decoding!r}")
    ancestors = tree.ancestors.to(logits.device)
    path = sum(F.log_softmax(x, dim=1)[:, ancestors[level]] for level, x in enumerate(levels))  # (N, leaves)
    best = path.argmax(dim=1)
    out = []
    for level, size in enumerate(tree.sizes):
        index = ancestors[level].expand_as(path)
        scores = path.new_full((path.shape[0], size), float("-inf")).scatter_reduce(1, index, path, "amax")
        # two paths with exactly equal scores: the decision is the best leaf's ancestor at every level
        out.append(scores.scatter(1, ancestors[level][best][:, None], float("inf")))
    return out


def consistency_rate(preds: Sequence[torch.Tensor], tree: LabelTree) -> float:
    """Percent of samples whose predicted class at every level is a child of the class
    predicted at the level above."""
    ok = torch.ones_like(preds[0], dtype=torch.bool)
    for level in range(1, tree.depth):
        ok &= tree.parents[level].to(preds[level].device)[preds[level]] == preds[level - 1]
    return 100.0 * ok.float().mean().item()


def path_accuracy(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Percent of samples right at every level."""
    ok = torch.ones_like(preds[0], dtype=torch.bool)
    for p, t in zip(preds, targets):
        ok &= p == t
    return 100.0 * ok.float().mean().item()


def hierarchical_report(logits: torch.Tensor, leaf_target: torch.Tensor, tree: LabelTree, decoding: str,
                        level_weights: Sequence[float]) -> Dict:
    """common.eval.metrics' classification_report for every level (under `decoding`, plus that
    level's val loss), the consistency rate and whole-path top-1 of the decisions and of
    the independent argmax, and the weighted loss. `acc1` is the whole-path top-1."""
    logits, leaf_target = logits.float().cpu(), leaf_target.long().cpu()
    targets = [tree.level_targets(leaf_target, level) for level in range(tree.depth)]
    scores = decode(logits, tree, decoding)
    levels = []
    for level, (s, t, raw) in enumerate(zip(scores, targets, tree.split(logits))):
        report = classification_report(s, t, tree.classes[level])
        report.update(level=level + 1, name=tree.level_names[level], val_loss=F.cross_entropy(raw, t).item())
        levels.append(report)
    preds = [s.argmax(dim=1) for s in scores]
    independent = [x.argmax(dim=1) for x in tree.split(logits)]
    path_acc1 = path_accuracy(preds, targets)
    return {"decoding": decoding, "levels": levels, "acc1": path_acc1, "path_acc1": path_acc1,
            "consistency_rate": consistency_rate(preds, tree), "num_samples": int(leaf_target.shape[0]),
            "independent_path_acc1": path_accuracy(independent, targets),
            "independent_consistency_rate": consistency_rate(independent, tree),
            "val_loss": sum(w * r["val_loss"] for w, r in zip(level_weights, levels))}
