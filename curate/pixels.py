"""One pass over the images' pixels, beside the embedding: a small grayscale thumbnail of each
(curate/copies.py compares them) and a few image statistics (curate/outliers.py looks for the
images whose statistics no other image shares: noise, blank frames, a colour photo in a
grayscale set, another size or shape).

Images read at full depth (--in-channels other than 3: (C, H, W) float tensors of stored values)
are made gray by standardising each channel with the run's channel_mean / channel_std and
averaging the channels, in float, rather than through the 8-bit picture to_display shows:
to_display stretches every image by its own percentiles, which would erase the brightness and
contrast differences between images the outlier statistics look for, and it rounds to 8 bits
before the thumbnail is averaged, losing a 16-bit texture under a bright offset. The run's
statistics are one mapping for every image, so brightness still compares across images, and
they put the bands on one scale (a band stored in thousands does not drown one in tens)."""
import time
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.data.channels import RGB, Channels
from common.data.display import stretch
from common.log.progress import log

SIDE = 32  # px of the compared thumbnail at most: a 300 px photo and a 64 px texture compare at the same cost
MIN_SIDE = 16  # px: smaller images are enlarged to it
SAMPLE = 64  # images whose size sets the thumbnail side
STATS_SIDE = 128  # px, at most, of the image the statistics are measured on (fine detail kept, cost bounded)
STATS = ("brightness", "contrast", "entropy", "high frequency", "saturation", "aspect", "size")
# a full-depth image's standardised gray in the 0-255 gray levels the statistics (and FLOORS) are
# counted in: the channels' mean at mid-gray, GRAY_LEVELS levels per standard deviation (+-4 std
# spans the histogram of the entropy)
GRAY_MID = 128.0
GRAY_LEVELS = 32.0
Picture = Union[Image.Image, torch.Tensor]  # an RGB PIL image, or a (C, H, W) tensor at full depth


@dataclass
class Pixels:
    thumbs: torch.Tensor  # N x side x side uint8 grayscale (thumb_side)
    stats: torch.Tensor  # N x len(STATS) float
    side: int  # the median short side of the images, px

    def stat(self, name: str) -> torch.Tensor:
        return self.stats[:, STATS.index(name)]


def thumb_side(sources: Sequence[Tuple[Dataset, int]]) -> int:
    """The thumbnail side for a data set: SIDE, or the median short side of its first SAMPLE
    images where that is smaller (at least MIN_SIDE). Enlarging a 28 px digit to 32 px only
    resamples it: measured on Fashion-MNIST's planted copies, 28 px found 79 % of them
    against 72 % at 32 px, at the same precision (docs/curate.md)."""
    sides = sorted(min(image_size(base[i][0])) for base, i in sources[:SAMPLE])
    return max(MIN_SIDE, min(SIDE, sides[len(sides) // 2])) if sides else SIDE


def image_size(img: Picture) -> Tuple[int, int]:
    """(width, height) of a PIL image or of a (C, H, W) tensor."""
    if isinstance(img, torch.Tensor):
        return int(img.shape[2]), int(img.shape[1])
    return img.size


def image_stats(img: Picture, side: int = SIDE, channels: Channels = RGB) -> Tuple[np.ndarray, list]:
    """(side x side uint8 thumbnail, the STATS of `img`): brightness and contrast (mean and std
    of gray, 0-255), entropy of the 64-bin gray histogram (bits), high-frequency energy (mean
    absolute Laplacian over the std: noise is all edges), saturation (mean max - min over RGB,
    0 for gray images), log aspect ratio and log short side. A (C, H, W) tensor at full depth
    is measured on its standardised gray (full_depth_stats)."""
    if isinstance(img, torch.Tensor):
        return full_depth_stats(img, side, channels)
    rgb = img.convert("RGB")
    gray = rgb.convert("L")
    thumb = np.asarray(gray.resize((side, side), Image.BILINEAR), dtype=np.uint8).copy()
    scale = min(1.0, STATS_SIDE / max(gray.size))
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    g = np.asarray(gray.resize(size, Image.BOX) if scale < 1 else gray, dtype=np.float32)
    c = np.asarray(rgb.resize(size, Image.BOX) if scale < 1 else rgb, dtype=np.float32)
    hist = np.bincount((g.astype(np.int64) // 4).ravel(), minlength=64) / g.size
    entropy = float(-(hist[hist > 0] * np.log2(hist[hist > 0])).sum())
    std = float(g.std())
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]) if min(g.shape) > 2 \
        else np.zeros(1)
    return thumb, [float(g.mean()), std, entropy, float(lap.mean()) / (std + 1.0),
                   float((c.max(2) - c.min(2)).mean()), float(np.log(img.width / img.height)),
                   float(np.log(min(img.size)))]


def _float_resize(plane: np.ndarray, size: Tuple[int, int], resample: int) -> np.ndarray:
    """An (H, W) float32 plane resized by PIL in mode F (no rounding to 8 bits), with the same
    filters as the RGB path."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), "F").resize(size, resample),
                      dtype=np.float32)


def full_depth_stats(x: torch.Tensor, side: int = SIDE, channels: Channels = RGB) -> Tuple[np.ndarray, list]:
    """image_stats of a (C, H, W) tensor of stored values: gray is the mean of the channels,
    each standardised with the run's statistics, in gray levels (GRAY_MID + GRAY_LEVELS per
    standard deviation: the same for every image); saturation is the mean spread (max - min)
    of the standardised channels in those levels, 0 for one channel. The thumbnail is resized
    in float and then stretched from its 1st to its 99th percentile before it is rounded to
    8 bits: the copy search compares correlations, which an image's own offset and gain do not
    change, so the stretch only keeps a faint texture from rounding away."""
    h, w = x.shape[1:]
    mean = torch.tensor(channels.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(channels.std, dtype=torch.float32).view(-1, 1, 1)
    z = (x.float() - mean) / std
    gray = (GRAY_MID + GRAY_LEVELS * z.mean(0)).numpy()
    spread = (GRAY_LEVELS * (z.amax(0) - z.amin(0))).numpy()
    thumb = stretch(_float_resize(gray, (side, side), Image.BILINEAR))
    scale = min(1.0, STATS_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    g = _float_resize(gray, size, Image.BOX) if scale < 1 else gray
    c = _float_resize(spread, size, Image.BOX) if scale < 1 else spread
    hist = np.bincount((np.clip(g, 0, 255).astype(np.int64) // 4).ravel(), minlength=64) / g.size
    entropy = float(-(hist[hist > 0] * np.log2(hist[hist > 0])).sum())
    std_g = float(g.std())
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]) if min(g.shape) > 2 \
        else np.zeros(1)
    return thumb, [float(g.mean()), std_g, entropy, float(lap.mean()) / (std_g + 1.0), float(c.mean()),
                   float(np.log(w / h)), float(np.log(min(w, h)))]


class _Read(Dataset):
    def __init__(self, sources: Sequence[Tuple[Dataset, int]], side: int, channels: Channels = RGB):
        self.sources, self.side, self.channels = sources, side, channels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, row: int):
        base, i = self.sources[row]
        img = base[i][0]
        thumb, stats = image_stats(img, self.side, self.channels)
        return torch.from_numpy(thumb), torch.tensor(stats), min(image_size(img))


def read_pixels(sources: Sequence[Tuple[Dataset, int]], workers: int, batch_size: int = 256,
                channels: Channels = RGB) -> Pixels:
    """Thumbnails and statistics of every row's image ((dataset, index) pairs), with a
    progress line every 20 batches; `channels`: the run's (--in-channels), whose statistics
    make a full-depth image gray."""
    start = time.time()
    loader = DataLoader(_Read(sources, thumb_side(sources), channels), batch_size=batch_size, num_workers=workers)
    thumbs, stats, sides = [], [], []
    for n, (t, s, side) in enumerate(loader):
        thumbs.append(t)
        stats.append(s)
        sides.append(side)
        if (n + 1) % 20 == 0:
            done = min((n + 1) * batch_size, len(sources))
            rate = done / max(time.time() - start, 1e-6)
            log(f"   pixels: {done}/{len(sources)} images, {rate:.0f} img/s, eta {(len(sources) - done) / rate:.0f} s")
    log(f"=> pixels: thumbnails and statistics of {len(sources)} images in {time.time() - start:.0f} s")
    return Pixels(torch.cat(thumbs), torch.cat(stats).float(), int(torch.cat(sides).float().median()))


# the least spread each statistic is judged against: a statistic every image shares (saturation 0 on
# a grayscale set, one size) would otherwise make the slightest difference (a JPEG's chroma noise, a
# copy resized by 10 %) infinitely odd; gray levels of 0-255, bits, a ratio, logs of a ratio and a side
FLOORS = {"brightness": 2.0, "contrast": 2.0, "entropy": 0.1, "high frequency": 0.05, "saturation": 2.0,
          "aspect": 0.1, "size": 0.3}


def robust_z(x: torch.Tensor, floor: float = 0.0, one_sided: bool = False) -> torch.Tensor:
    """(x - median) over the scaled median absolute deviation (a standard deviation's worth for
    normal data, at least `floor`), absolute unless `one_sided` (then only the high side counts).
    A spread measured in the tail instead (the median to the 99th percentile) was tried: it lets
    a group of foreign images larger than 1 % set their own scale (docs/curate.md)."""
    x = x.float()
    med = x.median()
    z = (x - med) / torch.clamp_min(1.4826 * (x - med).abs().median(), max(floor, 1e-12))
    return z.clamp_min(0.0) if one_sided else z.abs()


def stats_z(pixels: Pixels) -> Dict[str, torch.Tensor]:
    """Each statistic's robust z-score, by name."""
    return {name: robust_z(pixels.stats[:, k], FLOORS[name]) for k, name in enumerate(STATS)}
