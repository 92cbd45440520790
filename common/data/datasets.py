"""`--dataset` (the flags: common/cli/groups.py): the factory that turns them into a dataset of
`(PIL image, label)`: imagefolder (default), csv manifest, cifar10, cifar100, stl10, mnist,
fashion-mnist (torchvision, `--download` only when asked), shards (tar files in the WebDataset
layout, common/data/shard_reader.py) and synthetic (generated,
learnable, for tests and demos). Image files are read in common/data/images.py; the
augmentation is applied by common/data/transformed.py."""
import argparse
import os
from typing import Any, Dict, Optional

import torchvision.datasets as tvd
from torch.utils.data import Dataset

from common.data import listing
from common.data.arrays import check_channels, one_count, read_array
from common.data.channels import (DETECT_SAMPLE, Channels, channels_of, describe, measure_stats, pil_full_depth,
                                  sample_indices)
from common.data.images import FileListDataset, csv_manifest, image_folder
from common.data.shard_reader import ShardDataset, shard_dataset
from common.data.synthetic import SyntheticPatterns
from common.errors import UserError

DATASETS = ("imagefolder", "csv", "shards", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist", "synthetic")
# images of these datasets are small: default crop 32 px (96 for STL-10)
SMALL_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "mnist": 32, "fashion-mnist": 32, "stl10": 96, "synthetic": 32}
# px: a crop this size or smaller is a small image (CIFAR-sized), a larger one an ImageNet-sized
# one. Small: the CIFAR stem by default (--small-images), no blur in the views, and the probes'
# train/eval transforms resize instead of RandomResizedCrop / resize to crop/0.875
SMALL_CROP_MAX = 64


# ---------------------------------------------------------------- torchvision sources

class _TorchvisionDataset(Dataset):
    """A torchvision dataset giving RGB PIL images (MNIST-style grayscale is made 3-channel),
    or with `full_depth` N (read_channels) (N, H, W) float tensors."""

    def __init__(self, ds):
        self.ds = ds
        self.full_depth = 0
        self.classes = list(getattr(ds, "classes", []))
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = getattr(ds, "labels", [])
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, target = self.ds[index]
        if self.full_depth:
            return pil_full_depth(img, self.full_depth, self.path(index)), int(target)
        return img.convert("RGB"), int(target)

    def path(self, index: int) -> str:
        return f"{type(self.ds).__name__}[{index}]"


def _torchvision(name: str, root: str, split: str, download: bool) -> Dataset:
    train = split in ("train", "pretrain")
    try:
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
            ds = tvd.STL10(root, split=stl_split, download=download)
            ds.targets = [int(t) for t in ds.labels]
        else:
            cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100,
                   "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
            ds = cls(root, train=train, download=download)
    except RuntimeError as e:
        raise UserError(f"{name} was not found under {root!r} ({e}); point DATA at the folder that "
                        f"holds it, or add --download to fetch it")
    return _TorchvisionDataset(ds)


# ---------------------------------------------------------------- factory

def read_channels(dataset: Dataset, channels: int) -> Dataset:
    """`dataset` reading (channels, H, W) float tensors at full depth (channels other than 3:
    common/data/channels.py), or 8-bit RGB PIL images (3)."""
    dataset.full_depth = 0 if channels == 3 else channels
    return dataset


def build_dataset(args: argparse.Namespace, split: str) -> Optional[Dataset]:
    """The raw dataset (PIL image, label) for `split`: 'pretrain' (every image, labels
    ignored), 'train' or 'val' (labelled). Returns None when there is no val split."""
    dataset = _build(args, split)
    # --in-channels auto is read from the images themselves (common/train/channels.py), as PIL images
    if dataset is not None and args.in_channels not in (None, "auto"):
        read_channels(dataset, int(args.in_channels))
    return dataset


def _build(args: argparse.Namespace, split: str) -> Optional[Dataset]:
    name, root = args.dataset, args.data
    if name == "synthetic":
        n = args.synthetic_size if split in ("train", "pretrain") else max(args.synthetic_size // 4, args.synthetic_classes)
        # val is drawn with another seed: different images of the same classes
        return SyntheticPatterns(n, args.synthetic_classes, args.synthetic_image_size, seed=1 if split == "val" else 0)
    if name in ("cifar10", "cifar100", "stl10", "mnist", "fashion-mnist"):
        return _torchvision(name, root, split, args.download)
    if name == "shards":
        # DATA: a folder of train-*.tar (+ val-*.tar), a .tar pattern or a list of shard paths
        if split == "val":
            train = shard_dataset(root, "train", args.strict_data, args.shuffle_buffer)
            return shard_dataset(root, "val", args.strict_data, args.shuffle_buffer, classes=train.classes)
        return shard_dataset(root, "train", args.strict_data, args.shuffle_buffer)
    if name == "csv":
        # DATA is train.csv, or a folder holding train.csv and val.csv
        if os.path.isdir(root):
            train_csv, val_csv = os.path.join(root, "train.csv"), os.path.join(root, "val.csv")
        else:
            train_csv, val_csv = root, None
        train = csv_manifest(train_csv)
        if split == "val":
            return csv_manifest(val_csv, classes=train.classes) if val_csv and os.path.isfile(val_csv) else None
        return train
    # imagefolder
    if not os.path.isdir(root):
        image_folder(root)  # raises the plain missing-folder error
    has_split = os.path.isdir(os.path.join(root, "train"))
    if split == "val":
        val_dir = os.path.join(root, "val")
        if not (has_split and os.path.isdir(val_dir)):
            return None
        train, val = image_folder(os.path.join(root, "train")), image_folder(val_dir)
        if val.classes != train.classes:
            raise UserError(f"val classes {val.classes[:5]}... differ from train classes {train.classes[:5]}...; "
                            f"{val_dir} must hold the same class folders as {os.path.join(root, 'train')}")
        return val
    return image_folder(os.path.join(root, "train") if has_split else root)


def default_crop_size(args: argparse.Namespace) -> int:
    return SMALL_IMAGE_SIZE.get(args.dataset, 224)


# ---------------------------------------------------------------- --in-channels

def detect_channels(dataset: Dataset) -> int:
    """--in-channels auto: the channel count of the first images (a spread of DETECT_SAMPLE);
    a mix is one sentence naming two files."""
    picks = list(sample_indices(len(dataset), DETECT_SAMPLE, 0))
    if isinstance(dataset, FileListDataset):
        return check_channels([dataset.path(i) for i in picks])

    def count(i: int) -> int:
        if isinstance(dataset, ShardDataset):
            return read_array(dataset.keys[i], dataset.read_bytes(i)).shape[2]
        img = dataset.ds[i][0] if isinstance(dataset, _TorchvisionDataset) else dataset[i][0]
        return 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
    return one_count((count(i), dataset.path(i)) for i in picks)


def resolve_channels(args: argparse.Namespace, split: str, saved: Optional[Dict[str, Any]] = None) -> Channels:
    """Turn --in-channels into the run's Channels, kept in args (in_channels, channel_mean,
    channel_std: the checkpoint keeps them): a checkpoint's (`saved`, its args) when it has
    them, else the count given or read from the images (auto), with per-channel statistics
    measured on a seeded sample of `split` for counts other than 3."""
    given = args.in_channels
    if saved and saved.get("in_channels") is not None:
        n = int(saved["in_channels"])
        if given not in (None, "auto", str(n)):
            raise UserError(f"the checkpoint was trained on {n} channel(s), not the {given} of --in-channels; drop "
                            f"--in-channels (it follows the checkpoint)")
        norm = saved.get("channel_norm") or "set"
        if args.channel_norm not in (None, norm):
            raise UserError(f"the checkpoint's images were normalised per {norm}, not per {args.channel_norm}; drop "
                            f"--channel-norm (it follows the checkpoint)")
        args.in_channels, args.channel_mean, args.channel_std = n, saved.get("channel_mean"), saved.get("channel_std")
        args.channel_norm = norm
        return channels_of(args)
    if given == "auto":
        dataset = _build(args, split) or _build(args, "train")
        n = detect_channels(dataset)
        listing.log(f"=> --in-channels auto: {n} channel(s) in each of the {min(len(dataset), DETECT_SAMPLE)} "
                    f"images read" + (", read at full depth" if n != 3 else ", read as 8-bit RGB"))
    else:
        n = 3 if given is None else int(given)
    args.in_channels, args.channel_mean, args.channel_std = n, None, None
    if n == 3 and args.channel_norm == "image":
        raise UserError("--channel-norm image is for images read at full depth (--in-channels other than 3); RGB "
                        "images are normalised with ImageNet's statistics")
    args.channel_norm = args.channel_norm or "set"
    if n == 3:
        return channels_of(args)
    dataset = build_dataset(args, split)
    seed = args.seed or 0
    mean, std, read = measure_stats(dataset, n, seed)
    args.channel_mean, args.channel_std = list(mean), list(std)
    ch = channels_of(args)
    if ch.per_image:
        listing.log(f"=> {n} input channel(s) at full depth, each image standardised per channel by its own mean and "
                    f"std (--channel-norm image); the {split} images' statistics, for curation, measured on {read} "
                    f"images (seed {seed}): {describe(ch)}")
    else:
        listing.log(f"=> {n} input channel(s) at full depth, normalised per channel with the {split} images' own "
                    f"statistics, measured on {read} images (seed {seed}): {describe(ch)}")
    return ch

