"""The evaluation scripts' shared flag groups (main_lincls.py, main_knn.py): the label subset
and hierarchical labels. Their checks: common/eval/inputs.py, common/eval/label_tree.py."""
import argparse
from typing import Sequence

from common.cli.parser import FlagSpec


def add_label_subset_args(parser: argparse.ArgumentParser, who: str) -> argparse._ArgumentGroup:
    """The "labels" group: --label-fraction, --subset-seed and --label-subset; `who` says what
    the labels train ("the probe trains", "kNN votes"), for the help."""
    g = parser.add_argument_group("labels")
    g.add_argument("--label-fraction", default=1.0, type=float,
                   help=f"{who} on a class-stratified fraction of the train labels (e.g. 0.01, 0.1); the "
                        f"subset is saved to OUTPUT_DIR/label_subset.json, and the same seed draws the same "
                        f"images in main_lincls.py and main_knn.py")
    g.add_argument("--subset-seed", default=0, type=int,
                   help="seed of the --label-fraction draw (fixed by default, so every run gets the same subset)")
    g.add_argument("--label-subset", default=None, type=str, metavar="JSON",
                   help="reuse a label_subset.json from an earlier run instead of drawing one")
    return g


def add_hierarchy_args(parser: argparse.ArgumentParser, extra: Sequence[FlagSpec] = ()) -> argparse._ArgumentGroup:
    """The "hierarchical labels" group: --hierarchy-depth, then `extra` (a classifier's
    own flags, e.g. lincls/hierarchy.py's), so that --help shows them together."""
    g = parser.add_argument_group("hierarchical labels")
    g.add_argument("--hierarchy-depth", default=0, type=int, metavar="N",
                   help="labels with N levels: DATA/train/<level1>/.../<levelN>/image (imagefolder) or csv rows "
                        "`path,level1,...,levelN`; 0 = flat labels")
    for names, kwargs in extra:
        g.add_argument(*names, **kwargs)
    return g
