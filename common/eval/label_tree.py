"""The label tree of hierarchical labels (`--hierarchy-depth N`): the classes of every
level, how each deepest class maps up, and the metrics over whole paths. main_knn.py and
main_lincls.py both use it (the files it is read from: common/eval/hierarchical_data.py),
so neither script depends on the other's package.

A class is identified by its path from the root ('tops/shirt'), so the same name may
repeat under different parents. Every image sits at the deepest level, and its deepest
class fixes its class at every level above: datasets keep the deepest class as their
one integer target, and `LabelTree.level_targets` maps it up. That is why label
subsets, samplers, loaders and the DDP logits gather work on hierarchical data unchanged.
"""
import argparse
from typing import List, Sequence, Tuple

import torch

from common.errors import UserError

SEP = "/"

def check_hierarchy_depth(args: argparse.Namespace) -> None:
    """Refuse a negative --hierarchy-depth (0 = flat labels)."""
    depth = args.hierarchy_depth
    if depth < 0:
        raise UserError(f"--hierarchy-depth {depth} must be 0 (flat labels) or the number of label levels, e.g. 2")


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


# ---------------------------------------------------------------- metrics over paths

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
