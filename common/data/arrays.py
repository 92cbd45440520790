"""Images that are not 8-bit RGB, read at full depth (issue 44 item 2): 8- and 16-bit
grayscale and RGB PNG/TIFF, multi-band TIFF (tifffile, an optional extra) and `.npy` arrays,
as (H, W, C) float32 arrays holding the stored values unchanged (a 16-bit 65535 stays
65535.0, exactly: float32 holds every integer below 2^24). Scaling is the per-channel
statistics' job, not the reader's, so no bit is thrown away here (pil_loader, the 8-bit RGB
path, scales a 16-bit image to 8 bits).

The datasets read through it when `--in-channels` is not 3 (common/data/channels.py)."""
import io
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from common.errors import UserError, reason
from common.extras import require

NPY_EXTENSIONS = (".npy",)


class UnreadableImage(OSError, UserError):
    """A file that cannot be decoded: an OSError, so the loaders skip it (or stop with
    --strict-data) as they do a broken JPEG, and a UserError's one sentence."""

TIFF_EXTENSIONS = (".tif", ".tiff")
# PIL modes -> the channels read (alpha is dropped: a mask, not a band)
_PIL_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1, "F": 1, "P": 3,
                 "RGB": 3, "RGBA": 3, "RGBX": 3, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def npy_layout(shape: Tuple[int, ...]) -> str:
    """"HWC" or "CHW" for a 3-d array: the channels are the smaller of the first and last
    axes (an image is larger than its band count); a tie reads as H x W x C."""
    return "CHW" if shape[0] < shape[2] else "HWC"


def _npy(path: str, data: Optional[bytes] = None) -> np.ndarray:
    arr = np.load(io.BytesIO(data) if data is not None else path, mmap_mode=None if data is not None else "r",
                  allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        if npy_layout(arr.shape) == "CHW":
            arr = arr.transpose(1, 2, 0)
    else:
        raise UserError(f"{path!r} holds a {arr.ndim}-d array of shape {arr.shape}; an image array is H x W, "
                        f"H x W x C or C x H x W")
    if arr.dtype.kind not in "uif" or arr.dtype.kind == "b":
        raise UserError(f"{path!r} holds {arr.dtype} values; an image array holds integers or floats")
    return np.asarray(arr, dtype=np.float32)


def _pil(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX"):
        img, mode = img.convert("RGB"), "RGB"
    elif mode == "LA":
        img, mode = img.convert("L"), "L"
    elif mode == "1":
        img, mode = img.convert("L"), "L"
    arr = np.asarray(img)
    if arr.dtype.byteorder == ">":  # I;16B
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = arr.astype(np.float32)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _sniff(data: bytes) -> str:
    """The extension bytes of a shard member read as (its name in the shard has none)."""
    if data[:6] == b"\x93NUMPY":
        return ".npy"
    return ".tif" if data[:4] in (b"II*\x00", b"MM\x00*") else ".png"


def read_array(path: str, data: Optional[bytes] = None) -> np.ndarray:
    """The image at `path` (or its bytes `data`, named by `path`: a shard member) as an
    (H, W, C) float32 array of its stored values. Multi-band TIFFs need tifffile (one
    sentence when it is missing); anything unreadable is one sentence naming the file
    (UnreadableImage)."""
    ext = os.path.splitext(path)[1].lower() if data is None else _sniff(data)
    source = (lambda: io.BytesIO(data)) if data is not None else (lambda: path)  # noqa: E731
    try:
        if ext in NPY_EXTENSIONS:
            return _npy(path, data)
        if ext in TIFF_EXTENSIONS:
            try:
                with Image.open(source()) as img:
                    return _pil(img)
            except (OSError, ValueError, SyntaxError):  # PIL reads 1-4 samples of 8/16 bits, not bands
                tifffile = require("tifffile")
                with tifffile.TiffFile(source()) as tif:
                    series = tif.series[0]
                    arr, axes = np.asarray(series.asarray()), series.axes
                if arr.ndim == 2:
                    arr = arr[:, :, None]
                elif arr.ndim == 3 and axes.endswith("YX"):  # planar: the bands first, as the file says
                    arr = arr.transpose(1, 2, 0)
                elif arr.ndim != 3:
                    raise UserError(f"{path!r} holds a {arr.ndim}-d image of shape {arr.shape}; pass one image "
                                    f"(H x W x bands) per file")
                return arr.astype(np.float32)
        with Image.open(source()) as img:
            return _pil(img)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UnreadableImage(f"cannot read image {path!r} ({reason(e)}); fix or remove the file") from None


def channel_count(path: str) -> int:
    """The channels read_array gives for `path`, from its header where the format allows."""
    ext = os.path.splitext(path)[1].lower()
    if ext in NPY_EXTENSIONS:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        return 1 if len(shape) == 2 else min(shape[0], shape[2]) if len(shape) == 3 else 0
    if ext not in TIFF_EXTENSIONS:
        try:
            with Image.open(path) as img:
                return _PIL_CHANNELS.get(img.mode, 3)
        except (OSError, ValueError, SyntaxError):
            pass
    return read_array(path).shape[2]


def check_channels(paths: Sequence[str]) -> int:
    """The one channel count of `paths` (a sample of a folder); a mix is one sentence naming an
    example file of two counts."""
    return one_count((channel_count(p), p) for p in paths)


def one_count(counts: Iterable[Tuple[int, str]]) -> int:
    """The one channel count of (count, where) pairs, read lazily; a mix is one sentence naming
    an example of two counts."""
    seen: List[Tuple[int, str]] = []
    for c, p in counts:
        if seen and c != seen[0][0]:
            raise UserError(f"the images mix channel counts: {seen[0][1]!r} has {seen[0][0]}, {p!r} has {c}; "
                            f"give one kind of image per folder (convert the others, or split the folder)")
        if not seen:
            seen.append((c, p))
    if not seen:
        raise UserError("no images to read the channel count from")
    return seen[0][0]
