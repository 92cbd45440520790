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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
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
    g.add_argument("--synthetic-classes", default=8, type=int,
                   help="number of classes (foreground hues) for --dataset synthetic (2 to 12)")
    g.add_argument("--synthetic-image-size", default=32, type=int,
                   help="side of generated images for --dataset synthetic")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def pil_loader(path: str, min_side: Optional[int] = None) -> Image.Image:
    """Decode to RGB. With `min_side`, a JPEG much larger than needed is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's draft) as long as both sides stay at
    least `min_side`: a 4000x3000 photo for 224 px crops decodes about 10x faster."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if min_side:
            img.draft(None, (min_side, min_side))  # no-op for other formats
        img = ImageOps.exif_transpose(img)  # phone photos are stored sideways with an EXIF rotation
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit (and 32-bit integer) images: PIL's convert("RGB") clips them to 255, almost all white
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
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
        return self.load(index)

    def load(self, index: int, min_side: Optional[int] = None):
        path, target = self.samples[index]
        return pil_loader(path, min_side), target

    def path(self, index: int) -> str:
        return self.samples[index][0]


def _walk_once(top: str):
    """os.walk following links (class folders are often links to other disks), but never
    into a folder already walked: a link back up the tree would repeat its images ~40
    levels deep, each copy under a longer path."""
    seen = set()
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen)
        yield dirpath, dirnames, names


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
        for dirpath, _, names in sorted(_walk_once(d.path)):
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
        by_case: Dict[str, List[str]] = {}
        for c in classes:
            by_case.setdefault(c.lower(), []).append(c)
        clashes = [names for names in by_case.values() if len(names) > 1]
        if clashes:
            print(f"warning: labels in {csv_path!r} differ only in case and are kept as separate classes: "
                  f"{', '.join(' / '.join(repr(n) for n in names) for names in clashes[:5])}; fix the csv if they "
                  f"are the same class", file=sys.stderr, flush=True)
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
    """Generated images a network can learn from augmentations alone.

    The class is the hue of the foreground (`num_classes` hues around the colour
    wheel). Everything else is random nuisance: which pattern draws the foreground
    (stripes, rings, checkerboard, disc, ...), its frequency, phase and position,
    saturation, brightness, the grey background and pixel noise. A random-init
    network's features are dominated by that layout, so its kNN accuracy is mediocre;
    contrastive pretraining learns to ignore what crops and flips change and keeps the
    hue, and beats it within ~100 steps on a CPU. That makes a fast, honest test of
    "pretraining learned something" (tests/test_main_moco.py and the probe tests).
    """

    PATTERNS = ("hstripes", "vstripes", "checker", "rings", "dots", "disc", "square", "plus", "xhatch", "triangle")
    MAX_CLASSES = 12

    def __init__(self, size: int = 2000, num_classes: int = 8, image_size: int = 32, seed: int = 0):
        if not 2 <= num_classes <= self.MAX_CLASSES:
            raise UserError(f"--synthetic-classes must be between 2 and {self.MAX_CLASSES}, got {num_classes}")
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed
        self.classes = [f"hue{round(360 * i / num_classes):03d}" for i in range(num_classes)]
        self.targets = [i % num_classes for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def path(self, index: int) -> str:
        return f"synthetic[{self.seed}:{index}]"

    @staticmethod
    def pattern_mask(rng: np.random.Generator, s: int, name: str) -> np.ndarray:
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        r = np.hypot(y - cy, x - cx)
        freq, phase, size = rng.uniform(2.0, 5.0), rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4)
        wave = lambda t: np.sin(2 * np.pi * freq * t + phase)  # noqa: E731
        if name == "hstripes":
            return wave(y) > 0
        if name == "vstripes":
            return wave(x) > 0
        if name == "checker":
            return (wave(x) > 0) ^ (wave(y) > 0)
        if name == "rings":
            return wave(r) > 0
        if name == "dots":
            return wave(x) * wave(y) > 0.4
        if name == "disc":
            return r < size
        if name == "square":
            d = np.maximum(abs(y - cy), abs(x - cx))
            return (d < size) & (d > size * 0.5)
        if name == "plus":
            return ((abs(y - cy) < size * 0.3) & (abs(x - cx) < size)) | ((abs(x - cx) < size * 0.3) & (abs(y - cy) < size))
        if name == "xhatch":
            return (wave(x + y) > 0.3) | (wave(x - y) > 0.3)
        return (abs(y - cy) < size) & (abs(x - cx) < (y - cy + size) / 2)  # triangle

    def __getitem__(self, index: int):
        import colorsys

        label = self.targets[index]
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        mask = self.pattern_mask(rng, s, self.PATTERNS[rng.integers(len(self.PATTERNS))])[..., None]
        hue = (label / self.num_classes + rng.uniform(-0.03, 0.03)) % 1.0
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)), dtype=np.float32)
        bg = np.full(3, rng.uniform(0.0, 0.3), dtype=np.float32)
        img = np.where(mask, fg, bg) + rng.normal(0, 0.05, size=(s, s, 3)).astype(np.float32)
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

def load_sample(dataset: Dataset, index: int, min_side: Optional[int] = None):
    """dataset[index], decoded at reduced size where the source can (image files)."""
    if isinstance(dataset, FileListDataset):
        return dataset.load(index, min_side)
    if isinstance(dataset, SubsetDataset):
        return load_sample(dataset.base, dataset.indices[index], min_side)
    return dataset[index]


class TransformedDataset(Dataset):
    """Applies `transform`; seeds it per sample when the key is `(index, seed)`;
    skips unreadable images (or stops, with `strict`). `decode_side`: the shortest side
    the transform needs, so large JPEGs decode at reduced scale (see pil_loader)."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None, strict: bool = False,
                 decode_side: Optional[int] = None):
        self.base, self.transform, self.strict, self.decode_side = base, transform, strict, decode_side
        # shared across loader workers (torch pickles shared-memory tensors by handle)
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int):
        for attempt in range(len(self.base)):
            i = (index + attempt) % len(self.base)
            try:
                return load_sample(self.base, i, self.decode_side)
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


# ---------------------------------------------------------------- label subsets and class balance
# (main_lincls.py --label-fraction / --balanced-sampling / --class-weights; reused by main_knn and bench)

class SubsetDataset(Dataset):
    """The images `indices` of `base`, keeping `targets`, `classes` and `path` (torch's
    Subset drops them)."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        self.classes = list(getattr(base, "classes", []))
        base_targets = getattr(base, "targets")
        self.targets = [int(base_targets[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]

    def path(self, index: int) -> str:
        i = self.indices[index]
        return self.base.path(i) if hasattr(self.base, "path") else str(i)


def class_counts(targets: Sequence[int], num_classes: int) -> List[int]:
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)
    return [int(c) for c in counts[:num_classes]]


def stratified_subset(targets: Sequence[int], fraction: float, seed: int = 0,
                      class_names: Optional[Sequence[str]] = None) -> List[int]:
    """Indices of a class-stratified `fraction` of the samples: round(fraction * n_c)
    images of every class c, drawn without replacement from a generator seeded by
    `seed` alone (not the run's seed), so every run, method and machine gets the same
    subset. A class left with no image is an error, not a silently smaller problem."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen: List[int] = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        keep = int(math.floor(fraction * len(members) + 0.5))
        if keep == 0:
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            raise UserError(f"--label-fraction {fraction} leaves class {name!r} ({len(members)} images) with no "
                            f"labelled image; use a fraction of at least {1.0 / len(members):.3g}")
        chosen += rng.choice(members, size=keep, replace=False).tolist()
    return sorted(chosen)


def save_subset(path: str, indices: Sequence[int], dataset: Dataset, fraction: float, seed: int) -> None:
    """Write a label subset as JSON (indices, plus paths so a changed dataset is noticed)."""
    import json
    record = {"fraction": fraction, "seed": seed, "dataset_size": len(dataset), "num_images": len(indices),
              "indices": [int(i) for i in indices],
              "paths": [dataset.path(i) for i in indices] if hasattr(dataset, "path") else []}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def load_subset(path: str, dataset: Dataset) -> List[int]:
    """Read a subset written by save_subset and check it still names the same images."""
    import json
    if not os.path.isfile(path):
        raise UserError(f"label subset file {path!r} does not exist; pass a label_subset.json written by main_lincls.py")
    try:
        with open(path) as f:
            record = json.load(f)
        indices = [int(i) for i in record["indices"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path!r} is not a label subset file ({type(e).__name__}); "
                        f"pass a label_subset.json written by main_lincls.py")
    if record.get("dataset_size") != len(dataset) or (indices and max(indices) >= len(dataset)):
        raise UserError(f"label subset {path!r} was drawn from {record.get('dataset_size')} images but the training "
                        f"set has {len(dataset)}; draw a new one with --label-fraction")
    paths = record.get("paths") or []
    if paths and hasattr(dataset, "path") and any(dataset.path(i) != p for i, p in zip(indices, paths)):
        raise UserError(f"label subset {path!r} names images that are not at the same positions in this training "
                        f"set; draw a new one with --label-fraction")
    return indices


def balanced_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weight 1 / (images of its class): every class is drawn equally often."""
    counts = torch.tensor(class_counts(targets, num_classes), dtype=torch.double)
    return 1.0 / counts.clamp(min=1)[torch.as_tensor(list(targets), dtype=torch.long)]


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Loss weight per class, N / (C * n_c) (sklearn's 'balanced'); 1 for a balanced set."""
    counts = torch.tensor(class_counts(targets, num_classes), dtype=torch.float)
    return len(targets) / (num_classes * counts.clamp(min=1))


class BalancedSampler(ResumableSampler):
    """ResumableSampler drawing with replacement, each sample with probability
    proportional to 1 / (its class size) (torch's WeightedRandomSampler), so minority
    classes are oversampled. The draw depends only on (seed, epoch), every rank takes
    its share of one global draw, and mid-epoch starts work as in ResumableSampler."""

    def __init__(self, targets: Sequence[int], num_classes: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(len(targets), num_replicas, rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.weights = balanced_weights(targets, num_classes)

    def indices(self) -> List[int]:
        from torch.utils.data import WeightedRandomSampler
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        total = self.num_samples * self.num_replicas
        order = list(WeightedRandomSampler(self.weights, total, replacement=True, generator=g))
        return order[self.rank::self.num_replicas]
