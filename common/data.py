"""Dataset factory and the sampler that makes resume exact.

Sources (`--dataset`): imagefolder (default), csv manifest, cifar10, cifar100, stl10,
mnist, fashion-mnist (torchvision, `--download` only when asked) and synthetic
(generated, learnable, for tests and demos).

Every dataset yields `(PIL image, label)`; `TransformedDataset` applies the
augmentation. When the sampler hands it `(index, seed)` keys, the augmentation of
each sample is seeded from that key alone, so what a sample looks like does not
depend on the number of loader workers or on where a run was resumed.
"""
import argparse
import csv
import math
import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from common.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("imagefolder", "csv", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist", "synthetic")
# images of these datasets are small: default crop 32 px (96 for STL-10)
SMALL_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "mnist": 32, "fashion-mnist": 32, "stl10": 96, "synthetic": 32}


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=DATASETS,
                   help="where images come from (default: imagefolder, DATA/train + DATA/val "
                        "or a folder of class folders)")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download cifar10/cifar100/stl10/mnist/fashion-mnist into DATA")
    g.add_argument("--strict-data", action="store_true",
                   help="stop on an unreadable image instead of skipping it with a warning")
    g.add_argument("--synthetic-size", default=2000, type=int,
                   help="number of generated training images for --dataset synthetic (val: a quarter)")
    g.add_argument("--synthetic-classes", default=10, type=int,
                   help="number of pattern classes for --dataset synthetic (at most 10)")
    g.add_argument("--synthetic-image-size", default=32, type=int,
                   help="side of generated images for --dataset synthetic")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def pil_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


# ---------------------------------------------------------------- file-backed sources

class FileListDataset(Dataset):
    """Images on disk: `samples` is a list of (path, label); label -1 means unlabelled."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str]):
        self.samples = samples
        self.classes = classes
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return pil_loader(path), target

    def path(self, index: int) -> str:
        return self.samples[index][0]


def image_folder(root: str) -> FileListDataset:
    """A folder of class folders (ImageFolder), or a flat folder of unlabelled images."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root!r} does not exist; pass the folder that holds "
                        f"train/ and val/ (or class folders), or use --dataset synthetic to try the code")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        files = [e.path for e in entries if e.is_file() and is_image_file(e.name)]
        if not files:
            raise UserError(f"data folder {root!r} holds no images and no class folders; "
                            f"put images in {root}/<class>/ (or directly in {root} for unlabelled data)")
        return FileListDataset([(p, -1) for p in files], classes=[])
    samples, classes = [], []
    for idx, d in enumerate(class_dirs):
        files = []
        for dirpath, _, names in sorted(os.walk(d.path, followlinks=True)):
            files += [os.path.join(dirpath, n) for n in sorted(names) if is_image_file(n)]
        if not files:
            raise UserError(f"class folder {d.path!r} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add images to it or remove the folder")
        classes.append(d.name)
        samples += [(p, idx) for p in files]
    return FileListDataset(samples, classes)


def csv_manifest(csv_path: str, classes: Optional[List[str]] = None) -> FileListDataset:
    """Rows `path,label` (a header row is allowed; label may be empty for unlabelled
    images); paths are relative to the csv's folder."""
    if not os.path.isfile(csv_path):
        raise UserError(f"csv manifest {csv_path!r} does not exist; pass a csv with rows `path,label`")
    base = os.path.dirname(os.path.abspath(csv_path))
    rows = []
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#"):
                continue
            if i == 0 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue
            label = row[1].strip() if len(row) > 1 else ""
            rows.append((os.path.join(base, row[0].strip()), label))
    if not rows:
        raise UserError(f"csv manifest {csv_path!r} lists no images; add rows `path,label`")
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} file(s) listed in {csv_path!r} do not exist, e.g. {missing[0]!r}; "
                        f"paths are read relative to the csv's folder")
    if classes is None:
        classes = sorted({lab for _, lab in rows if lab})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for _, lab in rows if lab and lab not in index})
    if unknown:
        raise UserError(f"labels {unknown[:5]} in {csv_path!r} are not among the training classes; "
                        f"val labels must be the training labels")
    return FileListDataset([(p, index[lab] if lab else -1) for p, lab in rows], classes)


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
    import torchvision.datasets as tvd
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


# ---------------------------------------------------------------- synthetic source

class SyntheticPatterns(Dataset):
    """Generated images whose class is a shape or texture (stripes, rings, checkerboard,
    ...) while colours, phase, scale and position are random: a network can learn the
    classes from augmentations alone, and colour statistics say nothing about them."""

    PATTERNS = ("hstripes", "vstripes", "checker", "rings", "dots", "disc", "square", "plus", "xhatch", "triangle")

    def __init__(self, size: int = 2000, num_classes: int = 10, image_size: int = 32, seed: int = 0):
        if not 2 <= num_classes <= len(self.PATTERNS):
            raise UserError(f"--synthetic-classes must be between 2 and {len(self.PATTERNS)}, got {num_classes}")
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed
        self.classes = list(self.PATTERNS[:num_classes])
        self.targets = [i % num_classes for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def path(self, index: int) -> str:
        return f"synthetic[{self.seed}:{index}]"

    def __getitem__(self, index: int):
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        r = np.hypot(y - cy, x - cx)
        freq = rng.uniform(3.0, 5.0)
        phase = rng.uniform(0, 2 * np.pi)
        size = rng.uniform(0.2, 0.35)
        name = self.PATTERNS[label]
        if name == "hstripes":
            m = np.sin(2 * np.pi * freq * y + phase) > 0
        elif name == "vstripes":
            m = np.sin(2 * np.pi * freq * x + phase) > 0
        elif name == "checker":
            m = (np.sin(2 * np.pi * freq * x + phase) > 0) ^ (np.sin(2 * np.pi * freq * y + phase) > 0)
        elif name == "rings":
            m = np.sin(2 * np.pi * freq * r + phase) > 0
        elif name == "dots":
            m = (np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y + phase)) > 0.5
        elif name == "disc":
            m = r < size
        elif name == "square":
            d = np.maximum(abs(y - cy), abs(x - cx))
            m = (d < size) & (d > size * 0.6)
        elif name == "plus":
            m = ((abs(y - cy) < size * 0.25) & (abs(x - cx) < size)) | ((abs(x - cx) < size * 0.25) & (abs(y - cy) < size))
        elif name == "xhatch":
            m = (np.sin(2 * np.pi * freq * (x + y) + phase) > 0.3) | (np.sin(2 * np.pi * freq * (x - y) + phase) > 0.3)
        else:  # triangle pointing up
            m = (y - cy < size) & (y - cy > -size) & (abs(x - cx) < (y - cy + size) / 2)
        fg, bg = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
        if np.abs(fg - bg).sum() < 0.6:  # keep the pattern visible
            fg = 1.0 - bg
        img = np.where(m[..., None], fg, bg) + rng.normal(0, 0.05, size=(s, s, 3)).astype(np.float32)
        return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)), label


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


# ---------------------------------------------------------------- transform + fault tolerance

class TransformedDataset(Dataset):
    """Applies `transform`; seeds it per sample when the key is `(index, seed)`;
    skips unreadable images (or stops, with `strict`)."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None, strict: bool = False):
        self.base, self.transform, self.strict = base, transform, strict
        # shared across loader workers (torch pickles shared-memory tensors by handle)
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int):
        for attempt in range(len(self.base)):
            i = (index + attempt) % len(self.base)
            try:
                return self.base[i]
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad files
                path = self.base.path(i) if hasattr(self.base, "path") else str(i)
                if self.strict:
                    raise UserError(f"cannot read image {path!r} ({e}); fix or remove the file, "
                                    f"or drop --strict-data to skip unreadable images")
                self.skipped += 1
                print(f"warning: skipping unreadable image {path!r} ({e})", file=sys.stderr, flush=True)
        raise UserError("no image in the dataset can be read; check the data folder")

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        if isinstance(key, (tuple, list)):
            index, seed = key
            img, target = self._load(index)
            if self.transform is not None:
                # fork_rng keeps the caller's RNG stream untouched (workers=0 shares it)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    img = self.transform(img)
            return img, target
        img, target = self._load(key)
        return (self.transform(img) if self.transform is not None else img), target


# ---------------------------------------------------------------- sampler

class ResumableSampler(Sampler):
    """DistributedSampler that yields `(index, seed)` keys and can start mid-epoch.

    The permutation depends only on (seed, epoch); each rank takes every
    world_size-th element, padded so all ranks see the same number of batches.
    `set_epoch(epoch, start_sample)` skips the first `start_sample` samples of this
    rank (a mid-epoch resume continues without repeating or skipping samples).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if drop_last:
            self.num_samples = length // num_replicas
        else:
            self.num_samples = math.ceil(length / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        if total > len(order):
            order += order[: total - len(order)]
        return order[:total][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for pos, idx in enumerate(self.indices()):
            if pos < self.start:
                continue
            # one seed per (run seed, epoch, sample): augmentations independent of workers/resume
            yield idx, ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + idx) % (2 ** 63)

    def __len__(self) -> int:
        return self.num_samples - self.start
