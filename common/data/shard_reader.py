"""`--dataset shards DATA`: images in tar shards of the WebDataset layout (docs/shards.md), as
a map-style dataset, so that everything the scripts do with an image folder (per-sample
seeded views, counted skips of unreadable images, --gpu-decode's bytes, feature extraction,
reports) works on shards unchanged; the reading order that keeps the reads inside the
shards, front to back, is common/data/shard_order.py's.

DATA is a folder of `*.tar` (make_shards.py's `train-NNNNNN.tar` / `val-NNNNNN.tar` are the
two splits; any other names are all the train split), a brace pattern
(`/data/train-{000000..000511}.tar`) or a text file with one shard path per line. A sample is
the members that share a key (the member's path up to the first dot of its file name, as
WebDataset reads it): one image (`KEY.jpg|jpeg|png|webp|...`) and an optional label
(`KEY.cls`, `KEY.json`, `KEY.txt`: a class index, or a class name; `-1` or none:
unlabelled). The label map is `<split>.index.json`'s (make_shards.py) when the folder has
one, else the class indices found (or the names, sorted).

Why plain `tarfile` headers and not the `webdataset` package: the package streams samples
from an IterableDataset, so a mid-epoch resume would replay the stream up to its position,
and every loader worker would need its own slice of the shards (a rank's sample order would
then depend on -j). Here the shards' member headers are read once (cached like the folder
listings, common/data/listing.py), every sample is (shard, offset, size), and a read is one
`os.pread`: the order is the sampler's alone, and nothing new is installed.

Nothing here prints except the one-line summaries on rank 0 (listing.log): common/data may
not import common/log."""
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.data import listing
from common.data.images import decode_image, load_full_depth, refuse_array
from common.data.shards import index_name
from common.errors import UserError, reason

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "npy")  # npy: --in-channels
LABEL_EXTS = ("cls", "json", "txt")  # the first one a sample has is its label
CACHE_VERSION = 2  # 2: .npy members are images
OPEN_FILES = 16  # shard files a process keeps open for reading
# the header scan reads this much at a time: small images put many headers in one read, and a
# large image's data is skipped by a seek past the buffer
READ_BUFFER = 1 << 20
_BRACE = re.compile(r"\{([0-9]+)\.\.([0-9]+)\}")
_BLOCK = tarfile.BLOCKSIZE


# ---------------------------------------------------------------- which shards

def expand_braces(pattern: str) -> List[str]:
    """`train-{000000..000003}.tar` -> the four names (zero padding kept as written; several
    ranges multiply out, the first varying slowest)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    if hi < lo:
        raise UserError(f"the range {m.group(0)} in {pattern!r} counts down; write it low..high")
    width = len(m.group(1)) if m.group(1).startswith("0") else 0
    out = []
    for n in range(lo, hi + 1):
        out += expand_braces(pattern[:m.start()] + f"{n:0{width}d}" + pattern[m.end():])
    return out


def shard_paths(spec: str, split: str) -> Tuple[List[str], Optional[str]]:
    """The shard files of `split` ('train' or 'val') named by DATA `spec`, in name order, and
    the folder that may hold their `<split>.index.json`. A pattern or a list file names the
    train split only (val: none). Missing files are one sentence."""
    if not spec:
        raise UserError("--dataset shards needs DATA: a folder of .tar shards, a pattern like "
                        "train-{000000..000009}.tar, or a text file listing shard paths")
    if os.path.isdir(spec):
        tars = sorted(n for n in os.listdir(spec) if n.endswith(".tar") and not n.startswith("."))
        named = {s: [n for n in tars if re.fullmatch(re.escape(s) + r"-[0-9]+\.tar", n)] for s in ("train", "val")}
        if named["train"]:
            chosen = named[split]
        else:
            chosen = tars if split == "train" else []
        if split == "train" and not chosen:
            raise UserError(f"{spec!r} holds no .tar shards; write them with make_shards.py, or pass a pattern "
                            f"or a list of shard paths")
        return [os.path.join(spec, n) for n in chosen], spec
    if split == "val":
        return [], None
    if _BRACE.search(spec) or spec.endswith(".tar"):
        paths = expand_braces(spec)
    elif os.path.isfile(spec):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        paths = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
        if not paths:
            raise UserError(f"the shard list {spec!r} names no shards; put one .tar path per line")
    else:
        raise UserError(f"{spec!r} is not a folder, a shard list or a .tar pattern; pass a folder of .tar shards, "
                        f"a pattern like train-{{000000..000009}}.tar, or a text file listing shard paths")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(paths)} shards named by {spec!r} do not exist, e.g. "
                        f"{missing[0]!r}; fix the pattern or the list")
    folders = {os.path.dirname(p) for p in paths}
    return paths, folders.pop() if len(folders) == 1 else None


# ---------------------------------------------------------------- one shard's members

def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if field[:1] == b"\x80":  # GNU base-256 for a member of 8 GiB or more
        return int.from_bytes(field[1:], "big")
    return int(text, 8) if text else 0


def _members(path: str) -> Tuple[List[Tuple[str, int, int]], Optional[str]]:
    """(name, data offset, size) of each regular member, read from the headers alone, and the
    reason the shard ends early (None when it ends with its end-of-archive blocks). Plain
    ustar headers are parsed here (about 10x faster than tarfile); a shard with pax or GNU
    long-name headers is read by tarfile."""
    out: List[Tuple[str, int, int]] = []
    size_on_disk = os.path.getsize(path)
    with open(path, "rb", buffering=READ_BUFFER) as f:  # a seek inside the buffer costs no read
        offset = 0
        while True:
            f.seek(offset)
            h = f.read(_BLOCK)
            if len(h) < _BLOCK:
                return out, (f"it ends inside a header at byte {offset}" if h or not out
                             else "it has no end-of-archive blocks")
            if h == b"\0" * _BLOCK:
                return out, None
            try:
                check = _octal(h[148:156])
            except ValueError:
                check = -1
            if check != sum(h) - sum(h[148:156]) + 8 * 32:
                return out, f"the header at byte {offset} is damaged (checksum)"
            kind = h[156:157]
            if kind in (b"x", b"g", b"L", b"K"):
                return _members_by_tarfile(path, size_on_disk)
            size = _octal(h[124:136])
            data = offset + _BLOCK
            if data + size > size_on_disk:
                return out, f"member {_name(h)!r} needs {size} bytes at {data}, past the file's end ({size_on_disk})"
            if kind in (b"0", b"\0", b"7"):
                out.append((_name(h), data, size))
            offset = data + -(-size // _BLOCK) * _BLOCK


def _name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0]
    prefix = h[345:500].split(b"\0", 1)[0] if h[257:262] == b"ustar" else b""
    full = prefix + b"/" + name if prefix else name
    return full.decode("utf-8", "surrogateescape")


def _members_by_tarfile(path: str, size_on_disk: int) -> Tuple[List[Tuple[str, int, int]], Optional[str]]:
    out = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.offset_data + m.size > size_on_disk:
                    return out, f"member {m.name!r} runs past the file's end"
                if m.isfile():
                    out.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        return out, reason(e)
    return out, None


def split_name(name: str) -> Tuple[str, str]:
    """WebDataset's (key, extension): the path up to the first dot of the file name, the rest
    in lower case."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return folder + slash + stem, ext.lower() if dot else ""


class Problems:
    """What was left out of the shards, counted by kind with a first example each."""

    def __init__(self):
        self.counts: Dict[str, int] = {}
        self.example: Dict[str, str] = {}

    def add(self, kind: str, example: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.example.setdefault(kind, example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def sentence(self) -> str:
        return "; ".join(f"{n} {kind} (e.g. {self.example[kind]})" for kind, n in self.counts.items())


def scan_shard(path: str, problems: Problems) -> Tuple[List[str], List[int], List[int], List[str]]:
    """(keys, image offsets, image sizes, label texts) of the shard's samples. A sample
    without an image, and the rest of a truncated or damaged shard, go to `problems`."""
    members, broken = _members(path)
    keys, offsets, sizes, labels = [], [], [], []
    named = [split_name(m[0]) for m in members]
    with open(path, "rb", buffering=READ_BUFFER) as f:
        i = 0
        while i < len(members):
            key = named[i][0]
            j = i
            image, label, label_ext = None, None, None
            while j < len(members) and named[j][0] == key:
                ext = named[j][1]
                if ext in IMAGE_EXTS and image is None:
                    image = members[j]
                elif ext in LABEL_EXTS and (label_ext is None or LABEL_EXTS.index(ext) < LABEL_EXTS.index(label_ext)):
                    label, label_ext = members[j], ext
                j += 1
            where = f"{path}: {members[i][0]}"
            if image is None:
                problems.add("labels without an image" if label is not None else "members without an image", where)
            else:
                text = ""
                if label is not None:
                    f.seek(label[1])
                    text = label_ext + ":" + f.read(min(label[2], 4096)).decode("utf-8", "replace")
                keys.append(key)
                offsets.append(image[1])
                sizes.append(image[2])
                labels.append(text)
            i = j
    if broken is not None:
        problems.add("shards cut short", f"{path}: {broken}, after {len(keys)} samples")
    return keys, offsets, sizes, labels


# ---------------------------------------------------------------- labels

def parse_label(text: str) -> Tuple[Optional[int], Optional[str]]:
    """(class index, None) or (None, class name) from `ext:contents`; (-1, None) unlabelled."""
    if not text:
        return -1, None
    ext, _, body = text.partition(":")
    body = body.strip()
    if ext == "json":
        try:
            value = json.loads(body)
        except ValueError:
            raise UserError(f"a .json label is not JSON: {body[:60]!r}; write a number, a name or "
                            f"{{\"label\": ...}}") from None
        if isinstance(value, dict):
            value = next((value[k] for k in ("label", "cls", "class", "target") if k in value), -1)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"a .json label holds {str(value)[:60]!r}; write a class index or a class name")
        body = str(value)
    if re.fullmatch(r"-?[0-9]+", body):
        return int(body), None
    if ext == "cls":
        raise UserError(f"a .cls label holds {body[:60]!r}, not a class index; write the class number")
    return None, body


def label_map(texts: Sequence[str], classes: Optional[List[str]], where: str) -> Tuple[List[int], List[str]]:
    """The samples' class indices and the class names: `classes` given (the index's, or
    train's for val), else the indices found ('0', '1', ...) or the names found, sorted."""
    parsed = [parse_label(t) for t in texts]
    names = sorted({n for _, n in parsed if n is not None})
    numbers = [i for i, _ in parsed if i is not None and i >= 0]
    if names and numbers:
        raise UserError(f"the labels in {where} mix class numbers and class names (e.g. {numbers[0]} and "
                        f"{names[0]!r}); use one kind")
    if classes is None:
        classes = names if names else [str(i) for i in range(max(numbers) + 1 if numbers else 0)]
    index = {c: i for i, c in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise UserError(f"labels {unknown[:5]} in {where} are not among the classes {classes[:5]}...; "
                        f"val labels must be the training labels")
    beyond = [i for i in numbers if i >= len(classes)]
    if beyond and classes:
        raise UserError(f"class index {beyond[0]} in {where} is beyond the {len(classes)} classes of its label map")
    return [i if i is not None else index[n] for i, n in parsed], list(classes)


# ---------------------------------------------------------------- the dataset

class ShardDataset(Dataset):
    """Samples (shard, offset, size, label) of a list of shards; `spans[s]` is shard s's
    (first sample, count). Reads are `os.pread` on files opened once per process (no shared
    file position between loader workers)."""

    def __init__(self, paths: List[str], keys: np.ndarray, shard_of: np.ndarray, offsets: np.ndarray,
                 sizes: np.ndarray, targets: List[int], classes: List[str], shuffle_buffer: int):
        self.paths, self.keys = paths, keys
        self.shard_of, self.offsets, self.sizes = shard_of, offsets, sizes
        self.targets, self.classes = targets, classes
        self.shuffle_buffer = shuffle_buffer  # the training order's buffer (common/data/shard_order.py)
        self.full_depth = 0  # common.data.datasets.read_channels: N reads (N, H, W) float tensors
        counts = np.bincount(shard_of, minlength=len(paths)) if len(shard_of) else np.zeros(len(paths), np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(paths) else np.zeros(0, np.int64)
        self.spans = [(int(a), int(n)) for a, n in zip(starts, counts)]
        self._fds: Dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def path(self, index: int) -> str:
        """Where the image is: `SHARD:KEY`."""
        return f"{self.paths[self.shard_of[index]]}:{self.keys[index]}"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.paths[shard], os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._fds[shard] = fd  # most recently used last
        return fd

    def read_bytes(self, index: int) -> bytes:
        size = int(self.sizes[index])
        data = os.pread(self._fd(int(self.shard_of[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"the shard ends after {len(data)} of the image's {size} bytes")
        return data

    def load(self, index: int, min_side: Optional[int] = None) -> Tuple[Image.Image, int]:
        if self.full_depth:  # --in-channels other than 3: a (C, H, W) float tensor
            return load_full_depth(self.keys[index], self.full_depth, self.read_bytes(index)), self.targets[index]
        refuse_array(self.path(index))
        return decode_image(io.BytesIO(self.read_bytes(index)), min_side), self.targets[index]

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        return self.load(index)


def _cache_file(paths: List[str]) -> Tuple[str, List]:
    identity = []
    for p in paths:
        st = os.stat(p)
        identity.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, identity]).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(listing.cache_dir(), f"shards-{digest[:20]}.npz"), identity


def _scan_all(paths: List[str]) -> Tuple[Dict[str, np.ndarray], Problems]:
    problems = Problems()
    keys, shard_of, offsets, sizes, labels = [], [], [], [], []
    started, reported = time.time(), 0
    for s, p in enumerate(paths):
        k, o, z, t = scan_shard(p, problems)
        keys += k
        offsets += o
        sizes += z
        labels += t
        shard_of += [s] * len(k)
        if len(keys) - reported >= listing.PROGRESS_EVERY:
            reported = len(keys)
            listing.log(f"=> shards: read the headers of {s + 1}/{len(paths)} shards, {len(keys)} samples "
                        f"({time.time() - started:.0f} s)")
    table = {"keys": np.array(keys, dtype=str), "shard_of": np.array(shard_of, dtype=np.int32),
             "offsets": np.array(offsets, dtype=np.int64), "sizes": np.array(sizes, dtype=np.int64),
             "labels": np.array(labels, dtype=str),
             "problems": np.array([json.dumps([problems.counts, problems.example])], dtype=str)}
    return table, problems


def _table(paths: List[str]) -> Tuple[Dict[str, np.ndarray], Problems]:
    """The samples of `paths`, from the cache while no shard's size or mtime changed."""
    cache, _ = _cache_file(paths)
    try:
        with np.load(cache, allow_pickle=False) as z:
            table = {k: z[k] for k in z.files}
        problems = Problems()
        problems.counts, problems.example = json.loads(str(table["problems"][0]))
        listing.log(f"=> shards: {len(table['keys'])} samples in {len(paths)} shards, headers read from {cache}")
        return table, problems
    except (OSError, ValueError, KeyError):
        pass
    table, problems = _scan_all(paths)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **table)
        os.replace(tmp, cache)
    except OSError as e:
        listing.log(f"=> shards: the headers are not cached, {cache} cannot be written ({e})")
    return table, problems


def shard_dataset(spec: str, split: str, strict: bool, shuffle_buffer: int,
                  classes: Optional[List[str]] = None) -> Optional[ShardDataset]:
    """The `split` ('train' or 'val') of DATA `spec` (None: no val shards). `classes`: the
    train split's label map, for val. A problem found in the headers (a shard cut short, a
    sample without an image) stops with `strict`, else its samples are left out and counted
    in one line."""
    if shuffle_buffer < 0:
        raise UserError(f"--shuffle-buffer {shuffle_buffer} is negative; pass a number of samples (0: no buffer)")
    paths, folder = shard_paths(spec, split)
    if not paths:
        return None
    table, problems = _table(paths)
    if problems:
        if strict:
            raise UserError(f"the shards of {spec!r} have problems: {problems.sentence()}; rewrite them with "
                            f"make_shards.py, or drop --strict-data to leave those samples out")
        print(f"warning: left out of {spec!r}: {problems.sentence()} (--strict-data stops here instead)",
              file=sys.stderr, flush=True)
    if len(table["keys"]) == 0:
        raise UserError(f"the {len(paths)} shard(s) of {spec!r} hold no images; write them with make_shards.py "
                        f"(members KEY.jpg and KEY.cls)")
    index_file = os.path.join(folder, index_name(split)) if folder else None
    if classes is None and index_file and os.path.isfile(index_file):
        try:
            with open(index_file, encoding="utf-8") as f:
                classes = [str(c) for c in json.load(f)["classes"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read the label map of {index_file!r} ({reason(e)}); rewrite it with "
                            f"make_shards.py or remove it") from None
    targets, classes = label_map([str(t) for t in table["labels"]], classes, spec)
    # numpy columns, not a million Python objects: ~60 bytes a sample, and forked loader workers
    # share the pages (a Python list's refcounts would copy them)
    ds = ShardDataset(paths, table["keys"], table["shard_of"], table["offsets"],
                      table["sizes"], targets, classes, shuffle_buffer)
    listing.log(f"=> shards: {split} {len(ds)} images in {len(paths)} shard(s) of {spec}, {len(classes)} classes")
    return ds
