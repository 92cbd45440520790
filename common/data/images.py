"""Image files on disk: decoding (reduced-scale JPEG decode, EXIF rotation, 16-bit
images), a folder of class folders (ImageFolder, links followed once) and csv manifests."""
import codecs
import csv
import json
import os
import sys
import time
from typing import BinaryIO, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from common.data import listing
from common.data.arrays import NPY_EXTENSIONS, read_array
from common.data.channels import check_count, to_tensor
from common.errors import UserError

# .npy arrays are read with --in-channels other than 3 (common/data/arrays.py)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp") + NPY_EXTENSIONS


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def pil_loader(path: str, min_side: Optional[int] = None) -> Image.Image:
    """Decode to RGB. With `min_side`, a JPEG much larger than needed is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's draft) as long as both sides stay at
    least `min_side`: a 4000x3000 photo for 224 px crops decodes about 10x faster."""
    with open(path, "rb") as f:
        return decode_image(f, min_side)


def decode_image(f: BinaryIO, min_side: Optional[int] = None) -> Image.Image:
    """pil_loader's decoding of an open file or a BytesIO (an image inside a shard)."""
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


def load_full_depth(path: str, channels: int, data: Optional[bytes] = None):
    """The image as a (C, H, W) float tensor of its stored values (--in-channels other than 3);
    another channel count than the run's is one sentence."""
    arr = read_array(path, data)
    check_count(arr.shape[2], channels, repr(path))
    return to_tensor(arr)


def refuse_array(path: str) -> None:
    if path.lower().endswith(NPY_EXTENSIONS):
        raise UserError(f"{path!r} is an array, which the 8-bit RGB path (--in-channels 3) does not read; pass "
                        f"--in-channels with its channel count, or auto")


class FileListDataset(Dataset):
    """Images on disk: `samples` is a list of (path, label); label -1 means unlabelled.
    `full_depth` (set by common.data.datasets.read_channels): 0 decodes 8-bit RGB PIL
    images, N reads (N, H, W) float tensors at full depth."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str]):
        self.samples = samples
        self.classes = classes
        self.targets = [t for _, t in samples]
        self.full_depth = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.load(index)

    def load(self, index: int, min_side: Optional[int] = None):
        path, target = self.samples[index]
        if self.full_depth:
            return load_full_depth(path, self.full_depth), target
        refuse_array(path)
        return pil_loader(path, min_side), target

    def path(self, index: int) -> str:
        return self.samples[index][0]


def walk_once(top: str, skip: Tuple[str, ...] = (), skip_is_real: bool = False):
    """os.walk following links (class folders are often links to other disks), but never
    into a folder already walked, nor into the real folders `skip` (with `skip_is_real`, they
    are realpaths already: a thousand class folders are not resolved again for each class): a
    link back up the tree would repeat its images ~40 levels deep, each copy under a longer path."""
    seen = set(skip) if skip_is_real else {os.path.realpath(p) for p in skip}
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen)
        yield dirpath, dirnames, names


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _inside_any(real_path: str, real_folders: set) -> bool:
    """any(_inside(real_path, f) for f in real_folders) for realpaths, in one set look-up per
    ancestor of real_path instead of one comparison per folder."""
    while True:
        if real_path in real_folders:
            return True
        parent = os.path.dirname(real_path)
        if parent == real_path:
            return False
        real_path = parent


def image_folder(root: str) -> FileListDataset:
    """A folder of class folders (ImageFolder), or a flat folder of unlabelled images. Images
    directly in `root` beside class folders are read as unlabelled (label -1) and said: never
    dropped without a word. A link from one class folder into another (or up to `root`) is not
    followed: those images are read once, under their own class. The listing is cached outside
    the folder and reused while no listed folder changed (common/data/listing.py)."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root!r} does not exist; pass the folder that holds "
                        f"train/ and val/ (or class folders), or use --dataset synthetic to try the code")
    identity = {"kind": "imagefolder", "root": os.path.abspath(root), "extensions": list(IMG_EXTENSIONS)}
    prefix = listing.prefix_of(root)
    found, why = listing.load(root, identity, root, prefix)
    if found is not None:
        listing.log(f"=> {root}: {len(found.samples)} images in {len(found.classes)} class folder(s), listing read "
                    f"from {listing.cache_path(root)} ({len(found.watched)} folder(s) unchanged)")
    else:
        if why != listing.NO_CACHE:  # a first listing says nothing until PROGRESS_EVERY files
            listing.log(f"=> {root}: listing the folder again ({why})")
        started = time.time()
        found = _scan(root, started)
        listing.save(root, identity, root, prefix, found, started)
    samples, classes, elsewhere = found.samples, found.classes, found.elsewhere
    if elsewhere:
        print(f"warning: {len(elsewhere)} image link(s) in {root!r} lead into another class folder (e.g. "
              f"{elsewhere[0]!r}); those images are read once, under the class folder that holds them",
              file=sys.stderr, flush=True)
    if found.loose and classes:
        print(f"=> {root}: the {found.loose} images directly in it are read as unlabelled, beside the "
              f"{len(samples) - found.loose} images in its {len(classes)} class folder(s); move them into a class "
              f"folder to label them", flush=True)
    return FileListDataset(samples, classes)


def _scan(root: str, started: float) -> "listing.Listing":
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and is_image_file(e.name)]
    if not class_dirs:
        if not loose:
            raise UserError(f"data folder {root!r} holds no images and no class folders; "
                            f"put images in {root}/<class>/ (or directly in {root} for unlabelled data)")
        return listing.Listing([(p, -1) for p in loose], [], [""], loose=len(loose))
    prefix = listing.prefix_of(root)
    dirs = [""]
    seen_files, next_report = 0, listing.PROGRESS_EVERY
    real = {d.path: os.path.realpath(d.path) for d in class_dirs}
    real_root = os.path.realpath(root)
    samples, classes, elsewhere = [], [], []
    for idx, d in enumerate(class_dirs):
        others = tuple(r for p, r in real.items() if p != d.path and not _inside(real[d.path], r))
        others_set = set(others)
        files = []
        for dirpath, _, names in sorted(walk_once(d.path, skip=(real_root,) + others, skip_is_real=True)):
            dirs.append(dirpath[len(prefix):])
            # one realpath per folder, one lstat per file (a realpath only for a link) and a set
            # look-up per ancestor: a realpath per file and class folder made 100k files in 100
            # classes a 146 s scan
            dir_elsewhere = _inside_any(os.path.realpath(dirpath), others_set)
            for n in sorted(names):
                path = os.path.join(dirpath, n)
                if not is_image_file(n):
                    continue
                if (_inside_any(os.path.realpath(path), others_set) if os.path.islink(path)
                        else dir_elsewhere):  # a file link into another class
                    elsewhere.append(path)
                    continue
                files.append(path)
            seen_files += len(names)
            if seen_files >= next_report:
                listing.log(f"=> {root}: listed {seen_files} files so far, in {len(dirs) - 1} folder(s) of "
                            f"{idx + 1}/{len(class_dirs)} class folder(s) ({time.time() - started:.0f} s)")
                next_report = (seen_files // listing.PROGRESS_EVERY + 1) * listing.PROGRESS_EVERY
        if not files:
            raise UserError(f"class folder {d.path!r} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add images to it or remove the folder")
        classes.append(d.name)
        samples += [(p, idx) for p in files]
    samples += [(p, -1) for p in loose]
    return listing.Listing(samples, classes, dirs, elsewhere, len(loose))


def read_csv_rows(csv_path: str) -> List[List[str]]:
    """Every row of a csv manifest. Excel's "CSV UTF-8" starts the file with a byte order
    mark, which plain utf-8 would keep in the first cell (the header then is not
    recognised, or the first path does not exist): "utf-8-sig" drops it. A file in
    another encoding is one sentence saying where it stops being UTF-8."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError:
        raise UserError(_not_utf8(csv_path)) from None
    except csv.Error as e:
        raise UserError(f"csv manifest {csv_path!r} cannot be read as csv ({e}); check its quoting "
                        f"(an unclosed \" swallows the rest of the file)") from None


def _not_utf8(csv_path: str) -> str:
    with open(csv_path, "rb") as f:
        data = f.read()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode Text" export
        return f"csv manifest {csv_path!r} is UTF-16 text; save it as UTF-8 (in Excel: Save As > CSV UTF-8)"
    # the offset within the file, not within the decoder's buffer: decode it whole
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        data[skip:].decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        pos = skip + e.start
        line = data.count(b"\n", 0, pos) + 1
        where = f" (byte 0x{data[pos]:02x} at offset {pos}, line {line})"
    return f"csv manifest {csv_path!r} is not UTF-8 text{where}; save it as UTF-8 (in Excel: Save As > CSV UTF-8)"


def csv_manifest(csv_path: str, classes: Optional[List[str]] = None) -> FileListDataset:
    """Rows `path,label` (a header row is allowed; label may be empty for unlabelled
    images); paths are relative to the csv's folder. The result is cached like image_folder's
    (common/data/listing.py) while the csv and the folders of its files are unchanged."""
    if not os.path.isfile(csv_path):
        raise UserError(f"csv manifest {csv_path!r} does not exist; pass a csv with rows `path,label`")
    csv_abs = os.path.abspath(csv_path)
    identity = {"kind": "csv", "csv": csv_abs, "given_classes": classes}
    variant = "" if classes is None else json.dumps(classes)
    found, why = listing.load(csv_path, identity, csv_abs, "", variant)
    if found is not None:
        listing.log(f"=> {csv_path}: {len(found.samples)} images, listing read from "
                    f"{listing.cache_path(csv_path, variant)} (the csv and {len(found.watched) - 1} folder(s) unchanged)")
        for w in found.warnings:
            print(w, file=sys.stderr, flush=True)
        return FileListDataset(found.samples, found.classes)
    if why != listing.NO_CACHE:
        listing.log(f"=> {csv_path}: reading the manifest again ({why})")
    started = time.time()
    base = os.path.dirname(csv_abs)
    rows = []
    for i, row in enumerate(read_csv_rows(csv_path)):
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
    warnings = []
    if classes is None:
        classes = sorted({lab for _, lab in rows if lab})
        by_case: Dict[str, List[str]] = {}
        for c in classes:
            by_case.setdefault(c.lower(), []).append(c)
        clashes = [names for names in by_case.values() if len(names) > 1]
        if clashes:
            warnings.append(f"warning: labels in {csv_path!r} differ only in case and are kept as separate classes: "
                            f"{', '.join(' / '.join(repr(n) for n in names) for names in clashes[:5])}; fix the csv "
                            f"if they are the same class")
            print(warnings[-1], file=sys.stderr, flush=True)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for _, lab in rows if lab and lab not in index})
    if unknown:
        raise UserError(f"labels {unknown[:5]} in {csv_path!r} are not among the training classes; "
                        f"val labels must be the training labels")
    samples = [(p, index[lab] if lab else -1) for p, lab in rows]
    # a file added or removed changes its folder's mtime; the csv's own mtime covers its rows
    watched = [csv_abs] + sorted({os.path.dirname(p) for p, _ in rows})
    listing.save(csv_path, identity, csv_abs, "", listing.Listing(samples, classes, watched, warnings=warnings),
                 started, variant)
    return FileListDataset(samples, classes)
