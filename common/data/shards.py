"""Image shards in the WebDataset layout (make_shards.py writes them; docs/shards.md).

A split is `OUT/<split>-000000.tar`, `-000001.tar`, ... and `OUT/<split>.index.json`. Each
tar holds samples as adjacent members named `KEY.<ext>` (the source image's bytes, unchanged:
no decode, no re-encode; <ext> is the source's extension in lower case, e.g. jpg, png, webp)
then `KEY.cls` (the class index as ASCII text, -1 for an unlabelled image). KEY is a
zero-padded running number over the split (no dot in it: WebDataset splits a name at its
first dot). The index, written last and atomically, lists the shards with their sample
counts and byte sizes, the total, the label map (`classes[i]` is the name of class i), the
source and how the samples were ordered; a split without its index is unfinished.

Nothing here prints: progress goes to a callback (common/data may not import common/log,
tests/test_layers.py), so a future reader can import this module alone."""
import hashlib
import io
import os
import random
import re
import tarfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from common.errors import UserError, reason
from common.files.atomic import atomic_path, write_json_atomic

FORMAT = "webdataset"
VERSION = 1
SHARD_DIGITS = 6  # train-000000.tar
MIN_KEY_DIGITS = 6
BLOCK = tarfile.BLOCKSIZE  # 512: a member is one header block plus its data padded to blocks
END = 2 * BLOCK  # the two zero blocks that end an archive
# done, total, bytes written so far, shards finished
Progress = Callable[[int, int, int, int], None]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '500MiB' -> 500 * 2**20, '4096' -> 4096 (decimal units, as disks count)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 1GB, 500MB, 256MiB or 4096 (bytes)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:0{SHARD_DIGITS}d}.tar"


def index_name(split: str) -> str:
    return f"{split}.index.json"


def existing(out: str, split: str) -> List[str]:
    """The names in `out` that belong to `split`'s shards or index (temp files, which start
    with a dot, are not counted)."""
    if not os.path.isdir(out):
        return []
    pattern = re.compile(re.escape(split) + r"-[0-9]+\.tar")
    return sorted(n for n in os.listdir(out) if pattern.fullmatch(n) or n == index_name(split))


def order(count: int, seed: Optional[int]) -> List[int]:
    """The source samples' indices in the order they are written: shuffled with `seed`, or kept
    (None). The listing is sorted by class, so kept order puts one or two classes in each shard."""
    idx = list(range(count))
    if seed is not None:
        random.Random(seed).shuffle(idx)
    return idx


def member_cost(size: int) -> int:
    """Bytes one member of `size` bytes takes in a tar (header + data padded to blocks)."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def closed_size(offset: int) -> int:
    """The size of a tar whose members end at `offset` once closed: the end blocks, then zeros
    up to a whole record (tarfile.RECORDSIZE, 10 KiB), as tarfile's close() writes them."""
    return -(-(offset + END) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def human_size(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} bytes"


def extension(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower()


def _read(path: str) -> Tuple[bytes, float]:
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime
    except OSError as e:
        raise UserError(f"cannot read {path!r} ({reason(e)}); fix or remove it and run again") from None


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Sequence[Tuple[str, int]], out: str, split: str, shard_size: int,
                 progress: Optional[Progress] = None) -> Tuple[List[Dict], bytearray]:
    """Write `samples` (path, label), in this order, into `out`/<split>-NNNNNN.tar of at most
    `shard_size` bytes each (a shard holds at least one sample, so a larger image is a shard
    alone; tarfile ends a tar on a whole 10 KiB record, so no shard is smaller). Returns the
    shards [{"name", "samples", "bytes"}] and the sha256 digests of the bytes read from each
    source, 32 bytes per sample in key order. Every shard appears under
    its name whole (written as a temp file, then renamed); if anything fails or is interrupted,
    the shards this call wrote are removed again and the error goes on."""
    total = len(samples)
    digits = max(MIN_KEY_DIGITS, len(str(max(total - 1, 0))))
    shards: List[Dict] = []
    digests = bytearray()
    written = 0
    done = 0
    pending = None  # (data, mtime) of the sample that did not fit in the last shard
    try:
        while done < total:
            name = shard_name(split, len(shards))
            path = os.path.join(out, name)
            if os.path.exists(path):  # another run writing into the same folder meanwhile
                raise UserError(f"{path} appeared while writing; another make_shards.py run writes into {out}?")
            count = 0
            with atomic_path(path) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    while done < total:
                        src, label = samples[done]
                        data, mtime = pending if pending is not None else _read(src)
                        pending = None
                        cls = str(int(label)).encode("ascii")
                        cost = member_cost(len(data)) + member_cost(len(cls))
                        if count and closed_size(tar.offset + cost) > shard_size:
                            pending = (data, mtime)
                            break
                        key = f"{done:0{digits}d}"
                        _add(tar, f"{key}.{extension(src)}", data, mtime)
                        _add(tar, f"{key}.cls", cls, mtime)
                        digests += hashlib.sha256(data).digest()
                        count += 1
                        done += 1
                        if progress is not None and done < total:  # the last line once the shard is closed
                            progress(done, total, written + tar.offset, len(shards))
            size = os.path.getsize(path)
            written += size
            shards.append({"name": name, "samples": count, "bytes": size})
            if progress is not None:
                progress(done, total, written, len(shards))
    except BaseException:
        for s in shards:
            try:
                os.remove(os.path.join(out, s["name"]))
            except OSError:
                pass
        raise
    return shards, digests


def source_digests(samples: Sequence[Tuple[str, int]]) -> bytearray:
    """sha256 of each source file, read again (for a check of shards written earlier)."""
    digests = bytearray()
    for path, _ in samples:
        digests += hashlib.sha256(_read(path)[0]).digest()
    return digests


def check_shards(out: str, shards: Sequence[Dict], labels: Sequence[int], digests: bytes,
                 progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Re-read every shard with tarfile and verify: it opens and reads to its end; its members
    come in pairs KEY.<image ext>, KEY.cls with KEY the next running number; its sample count
    and byte size are the listed ones; each image's sha256 is `digests`' (the source file's) and
    each class is `labels`' (both in key order); together they hold every sample once. A
    failure is a UserError of one sentence. Returns the number of samples checked."""
    total = len(labels)
    if len(digests) != 32 * total:
        raise ValueError("digests must hold 32 bytes per label")
    digits = max(MIN_KEY_DIGITS, len(str(max(total - 1, 0))))
    key_re = re.compile(r"([0-9]+)\.([a-z0-9]+)")
    seen = 0
    for number, shard in enumerate(shards):
        path = os.path.join(out, shard["name"])

        def bad(what: str) -> UserError:
            return UserError(f"shard {path} fails the check: {what}")

        count = 0
        try:
            with tarfile.open(path, "r:") as tar:
                members = iter(tar)
                for image in members:
                    cls = next(members, None)
                    m = key_re.fullmatch(image.name)
                    if not m or m.group(2) == "cls" or not image.isfile():
                        raise bad(f"member {image.name!r} is not an image member KEY.<ext>")
                    key = m.group(1)
                    if cls is None or cls.name != f"{key}.cls" or not cls.isfile():
                        raise bad(f"image {image.name!r} is not followed by its {key}.cls")
                    if key != f"{seen:0{digits}d}":
                        raise bad(f"sample {key} where sample {seen:0{digits}d} was due")
                    if seen >= total:
                        raise bad(f"it holds sample {key}, beyond the {total} samples of the source")
                    data = tar.extractfile(image).read()
                    if hashlib.sha256(data).digest() != bytes(digests[32 * seen:32 * seen + 32]):
                        raise bad(f"the bytes of {image.name} differ from its source file's (sha256)")
                    text = tar.extractfile(cls).read()
                    if text != str(int(labels[seen])).encode("ascii"):
                        raise bad(f"{cls.name} holds {text[:20]!r}, not the class {labels[seen]}")
                    seen += 1
                    count += 1
        except UserError:
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            raise bad(f"it cannot be read to its end ({reason(e)})") from None
        if count != shard["samples"]:
            raise bad(f"it holds {count} samples, the index lists {shard['samples']}")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise bad(f"it is {size} bytes, the index lists {shard['bytes']}")
        if progress is not None:
            progress(number + 1, len(shards))
    if seen != total:
        raise UserError(f"the shards in {out} hold {seen} samples, the source {total}")
    return seen


def make_index(shards: Sequence[Dict], split: str, classes: Sequence[str], labels: Sequence[int], source: str,
               dataset: str, seed: Optional[int]) -> Dict:
    return {"format": FORMAT, "version": VERSION, "split": split, "source": os.path.abspath(source),
            "dataset": dataset, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "order": "shuffled" if seed is not None else "as listed", "seed": seed,
            "samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
            "unlabelled": sum(1 for t in labels if t < 0), "classes": list(classes),
            "shards": [dict(s) for s in shards]}


def write_index(out: str, split: str, index: Dict) -> str:
    path = os.path.join(out, index_name(split))
    write_json_atomic(path, index)
    return path
