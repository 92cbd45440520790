"""The training images of a probe and their loader: all of the labelled train split, or
the class-stratified label subset (--label-fraction / --label-subset), the same one every
time; augmented, and optionally class-balanced."""
import argparse
from typing import NamedTuple, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset

from common.augment import transforms as augment
from common.data.loader import ResumableSampler, make_loader
from common.data.subsets import SubsetDataset, class_counts
from common.data.transformed import TransformedDataset
from common.distributed.collectives import DistEnv
from common.errors import UserError
from common.eval.label_tree import LabelTree
from common.eval.inputs import training_labels
from common.log.progress import log
from common.data.channels import channels_of
from lincls.balance import BalancedSampler


def check_classes(classes: Sequence[str]) -> None:
    """A classifier needs two classes: with one, every prediction is right, 100 % top-1 and F1
    that mean nothing."""
    if len(classes) < 2:
        raise UserError(f"the dataset has only one class ({classes[0]!r}); a classifier needs at least two classes: "
                        f"add another class folder to train/ and val/ (or another label to the csv files)")


def training_subset(train: Dataset, args: argparse.Namespace) -> Tuple[Dataset, str]:
    """The labelled training images: all of train, its labelled rows (a partly labelled csv),
    or the --label-fraction / --label-subset draw, the same every time and saved next to the
    run. Returns (the images, how they were chosen: "" when all are used)."""
    indices, chosen = training_labels(train, args)
    return (train, "") if indices is None else (SubsetDataset(train, indices), chosen)


class TrainingData(NamedTuple):
    images: Dataset  # the raw training images (the label subset, if any)
    dataset: TransformedDataset  # the same, augmented
    loader: DataLoader
    sampler: ResumableSampler
    chosen: str  # how the images were chosen from train ("": all of them), for the log
    # the labels --balanced-sampling and --class-weights balance: the --balance-level classes
    balance_targets: Sequence[int]
    balance_classes: int


def training_data(train: Dataset, args: argparse.Namespace, env: DistEnv, batch_size: int, workers: int,
                  tree: Optional[LabelTree] = None) -> TrainingData:
    """The augmented training images (a label subset with --label-fraction / --label-subset)
    and their loader; with --balanced-sampling, small classes of --balance-level oversampled."""
    images, chosen = training_subset(train, args)
    dataset = TransformedDataset(images, augment.train_classifier(args.crop_size, channels_of(args)), args.strict_data,
                                 decode_side=augment.train_classifier_decode_side(args.crop_size))
    balance_targets, balance_classes = images.targets, len(train.classes)
    if tree is not None:
        balance_targets = tree.level_targets(images.targets, args.balance_level - 1).tolist()
        balance_classes = tree.sizes[args.balance_level - 1]
    sampler = None
    if args.balanced_sampling:
        sampler = BalancedSampler(balance_targets, balance_classes, env.world_size, env.rank, seed=env.seed)
    loader, sampler = make_loader(dataset, batch_size, env, workers, env.seed, drop_last=False, sampler=sampler)
    return TrainingData(images, dataset, loader, sampler, chosen, balance_targets, balance_classes)


def log_training_data(data: TrainingData, num_val: int, batch_size: int, args: argparse.Namespace,
                      tree: Optional[LabelTree] = None) -> None:
    """How many images, iterations and images per class (per level of a hierarchy) a run has."""
    counts = class_counts(data.images.targets, len(data.images.classes))
    log(f"=> {len(data.dataset)} training images" + (f" ({data.chosen})" if data.chosen else "")
        + f", {num_val} val images, {len(data.loader)} iterations/epoch, batch {batch_size}/process; "
        f"images per class {min(counts)}..{max(counts)}")
    if tree is not None:
        for level, (name, n) in enumerate(zip(tree.level_names, tree.sizes)):
            c = class_counts(tree.level_targets(data.images.targets, level).tolist(), n)
            log(f"=> level {level + 1} ({name}): {n} classes, images per class {min(c)}..{max(c)}"
                + (" (balanced by --balanced-sampling/--class-weights)" if level + 1 == args.balance_level
                   and (args.balanced_sampling or args.class_weights) else ""))
