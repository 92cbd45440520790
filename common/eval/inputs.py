"""What main_lincls.py and main_knn.py both set up before they evaluate anything: the
backbone --pretrained names, the labelled train/val splits (flat or
hierarchical) with their checks, the label subset (--label-fraction / --label-subset) and
the un-augmented view the network sees of them."""
import argparse
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common.augment.transforms import eval_decode_side, eval_transform
from common.ckpt.pretrained import extract_backbone, load_backbone, load_pretrained
from common.data.datasets import build_dataset
from common.data.subsets import class_counts, load_subset, save_subset, stratified_subset
from common.data.transformed import TransformedDataset
from common.distributed.collectives import is_main_process
from common.errors import UserError
from common.eval.hierarchical_data import hierarchical_dataset
from common.eval.label_tree import LabelTree
from common.nets.models import build_backbone
from common.data.channels import channels_of

def pretrained_backbone(args: argparse.Namespace, num_classes: int = 1000, load: bool = True,
                        keep_reference: bool = False) -> Tuple[nn.Module, str, Dict[str, torch.Tensor]]:
    """-a's network with the backbone of --pretrained (common.ckpt.pretrained knows every
    layout; `load` False or --pretrained none: random init). Returns (model, where its
    weights came from, with keep_reference a copy of the checkpoint's backbone tensors for
    a later sanity check, else {})."""
    # num_classes sizes the fc a classifier replaces: it still draws from the RNG, so a run's
    # head init depends on it
    model = build_backbone(args.arch, num_classes=num_classes, small_images=args.small_images,
                           in_channels=args.in_channels)
    ckpt = load_pretrained(args.pretrained, args.arch) if load else None
    if ckpt is None:
        return model, "random init", {}
    where = args.pretrained if args.pretrained != "imagenet" else "torchvision ImageNet weights"
    layout = load_backbone(model, ckpt, where)
    source = f"{where} ({ckpt.get('method') or 'reference'} checkpoint, layout {layout})"
    reference = {k: v.clone() for k, v in extract_backbone(ckpt["state_dict"])[0].items()} if keep_reference else {}
    return model, source, reference


def check_label_subset_args(args: argparse.Namespace) -> None:
    if not 0.0 < args.label_fraction <= 1.0:
        raise UserError(f"--label-fraction must be in (0, 1], got {args.label_fraction}; e.g. 0.01 for 1% of the labels")
    if args.label_subset and args.label_fraction != 1.0:
        raise UserError("--label-subset and --label-fraction both choose the training images; pass only one")


def label_subset(train: Dataset, args: argparse.Namespace) -> Tuple[Optional[List[int]], Optional[str]]:
    """The train indices --label-subset / --label-fraction name, the same ones every time, and
    the label_subset.json written beside the run; (None, None) when every label is used."""
    if args.label_subset:
        indices = load_subset(args.label_subset, train)
    elif args.label_fraction < 1.0:
        indices = stratified_subset(train.targets, args.label_fraction, args.subset_seed, train.classes)
    else:
        return None, None
    targets = [train.targets[i] for i in indices]
    missing = [train.classes[c] for c, n in enumerate(class_counts(targets, len(train.classes))) if n == 0]
    if missing:
        raise UserError(f"the label subset has no image of class(es) {missing[:5]}; draw another with --label-fraction")
    path = os.path.join(args.output_dir, "label_subset.json")
    if is_main_process():
        save_subset(path, indices, train, args.label_fraction if not args.label_subset else -1.0, args.subset_seed)
    return indices, path


def training_labels(train: Dataset, args: argparse.Namespace) -> Tuple[Optional[List[int]], str]:
    """The train indices whose labels are used (None: all of them) and how they were chosen,
    for the log: the labelled images of a partly labelled train split (a csv with empty
    labels: the unlabelled pool), or the --label-fraction / --label-subset draw."""
    unlabelled = sum(1 for t in train.targets if t < 0)
    if unlabelled:
        if args.label_fraction != 1.0 or args.label_subset:
            raise UserError(f"{unlabelled} train images have no label, and --label-fraction / --label-subset draw "
                            f"from a labelled train split; drop the flag (the labelled images are used) or label "
                            f"every train image")
        return [i for i, t in enumerate(train.targets) if t >= 0], f"the labelled ones; {unlabelled} have no label"
    indices, path = label_subset(train, args)
    if indices is None:
        return None, ""
    drawn = f"label subset {args.label_subset}" if args.label_subset else f"label fraction {args.label_fraction}"
    return indices, f"{drawn}, saved to {path}"


class Splits(NamedTuple):
    train: Dataset
    val: Optional[Dataset]  # None: the data has no val split
    tree: Optional[LabelTree]  # --hierarchy-depth: classes are the deepest level's paths
    classes: List[str]  # the training split's ([] when unlabelled)


def labelled(dataset: Optional[Dataset], split: str, needs: str, way_out: str = "", partly: bool = False) -> Dataset:
    """`dataset`, refused when it is absent or has an image without a label (with `partly`:
    when none has one). `needs` names who needs the labels and `way_out` how to do without,
    for the message."""
    if dataset is None:
        raise UserError(f"{needs} needs a labelled {split} split; give DATA/train and DATA/val class folders "
                        f"(or train.csv and val.csv with --dataset csv){way_out}")
    unlabelled = sum(1 for t in dataset.targets if t < 0)
    if partly and getattr(dataset, "classes", None) and unlabelled < len(dataset):
        return dataset
    if not getattr(dataset, "classes", None) or unlabelled:
        raise UserError(f"{unlabelled or len(dataset)} {split} images have no label; {needs} needs every image in "
                        f"a class folder (or a label in the csv){way_out}")
    return dataset


def eval_splits(args: argparse.Namespace, needs: Optional[str], way_out: str = "",
                partly_labelled_train: bool = False) -> Splits:
    """The train and val splits of DATA. With `needs` (see labelled) both must be labelled
    with the same classes (train only partly with `partly_labelled_train`: a csv's rows with
    an empty label); without, either may be unlabelled and val absent. With --hierarchy-depth
    the tree is read from train, and val must use its classes."""
    def check(ds: Optional[Dataset], split: str) -> Optional[Dataset]:
        partly = partly_labelled_train and split == "train" and not args.hierarchy_depth
        return labelled(ds, split, needs, way_out, partly) if needs else ds

    # train is checked before val is read, so its problem is the one reported
    if args.hierarchy_depth:
        train = check(hierarchical_dataset(args, "train"), "train")
        tree = train.tree
        val = check(hierarchical_dataset(args, "val", tree), "val")
    else:
        tree = None
        train = check(build_dataset(args, "train"), "train")
        val = check(build_dataset(args, "val"), "val")
    classes = list(getattr(train, "classes", None) or [])
    if needs and list(val.classes) != classes:
        raise UserError(f"val classes {list(val.classes)[:5]} differ from train classes {classes[:5]}; "
                        f"the val split must have the same classes as the train split")
    return Splits(train, val, tree, classes)


def eval_view(dataset: Dataset, args: argparse.Namespace) -> TransformedDataset:
    """What the network is evaluated on: resize and centre crop, no augmentation. An
    unreadable image is left out: a stand-in would be counted (or fitted) under this
    image's label, once more."""
    return TransformedDataset(dataset, eval_transform(args.crop_size, channels_of(args)), args.strict_data,
                              decode_side=eval_decode_side(args.crop_size), skip_unreadable=True)
