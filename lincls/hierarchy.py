"""Hierarchical labels for the classifier (`main_lincls.py --hierarchy-depth N`): one head
per level on the shared backbone, the summed per-level loss, consistent decoding, and the
per-level, consistency and whole-path report. The label tree itself and its reading from
disk are shared with main_knn.py (common/eval/label_tree.py, hierarchical_data.py).
"""
import argparse
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.cli import FlagSpec
from common.eval.label_tree import LabelTree, check_hierarchy_depth, consistency_rate, path_accuracy
from common.eval.metrics import classification_report

DECODINGS = ("independent", "top-down", "path")

# the classifier's flags, shown in the "hierarchical labels" group beside --hierarchy-depth
CLASSIFIER_FLAGS: Sequence[FlagSpec] = (
    (("--level-weights",), dict(default=None, type=float, nargs="+", metavar="W",
                                help="loss weight of each level, level 1 first (default: 1 each)")),
    (("--consistent",), dict(default=None, nargs="?", const="top-down", choices=DECODINGS[1:],
                             help="decode so every predicted class is a child of the predicted parent: top-down (each "
                                  "level restricted to the children of the level above's prediction; the bare flag) "
                                  "or path (the whole path with the highest summed log-probability)")),
    (("--balance-level",), dict(default=None, type=int, metavar="L",
                                help="level (1 = top) whose classes --balanced-sampling and --class-weights balance "
                                     "(default: the deepest)")),
)


def check_hierarchy_flags(args: argparse.Namespace) -> None:
    """Fill --level-weights and --balance-level; reject values that cannot mean anything."""
    check_hierarchy_depth(args)
    depth = args.hierarchy_depth
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
