"""`--dataset` (the flags: common/cli/groups.py): the factory that turns them into a dataset of
`(PIL image, label)`: imagefolder (default), csv manifest, cifar10, cifar100, stl10, mnist,
fashion-mnist (torchvision, `--download` only when asked), shards (tar files in the WebDataset
layout, common/data/shard_reader.py) and synthetic (generated,
learnable, for tests and demos). Image files are read in common/data/images.py; the
augmentation is applied by common/data/transformed.py."""
import argparse
import os
from typing import Optional

import torchvision.datasets as tvd
from torch.utils.data import Dataset

from common.data.images import csv_manifest, image_folder
from common.data.shard_reader import shard_dataset
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
    """A torchvision dataset giving RGB PIL images (MNIST-style grayscale is made 3-channel)."""

    def __init__(self, ds):
        self.ds = ds
        self.classes = list(getattr(ds, "classes", []))
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = getattr(ds, "labels", [])
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        img, target = self.ds[index]
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

def build_dataset(args: argparse.Namespace, split: str) -> Optional[Dataset]:
    """The raw dataset (PIL image, label) for `split`: 'pretrain' (every image, labels
    ignored), 'train' or 'val' (labelled). Returns None when there is no val split."""
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
