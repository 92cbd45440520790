"""Reading hierarchical labels from disk (`--hierarchy-depth N`): nested class folders or
a csv with one column per level, into datasets whose one target is the deepest class
(common/eval/label_tree.py maps it up to every level)."""
import argparse
import os
from typing import List, Optional, Sequence, Tuple

from common.data.images import FileListDataset, is_image_file, read_csv_rows, walk_once
from common.errors import UserError
from common.eval.label_tree import SEP, LabelTree


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
