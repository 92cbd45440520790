"""One pass over the images' pixels, beside the embedding: a small grayscale thumbnail of each
(curate/copies.py compares them) and a few image statistics (curate/outliers.py looks for the
images whose statistics no other image shares: noise, blank frames, a colour photo in a
grayscale set, another size or shape)."""
import time
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.log.progress import log

SIDE = 32  # px of the compared thumbnail at most: a 300 px photo and a 64 px texture compare at the same cost
MIN_SIDE = 16  # px: smaller images are enlarged to it
SAMPLE = 64  # images whose size sets the thumbnail side
STATS_SIDE = 128  # px, at most, of the image the statistics are measured on (fine detail kept, cost bounded)
STATS = ("brightness", "contrast", "entropy", "high frequency", "saturation", "aspect", "size")


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
    sides = sorted(min(base[i][0].size) for base, i in sources[:SAMPLE])
    return max(MIN_SIDE, min(SIDE, sides[len(sides) // 2])) if sides else SIDE


def image_stats(img: Image.Image, side: int = SIDE) -> Tuple[np.ndarray, list]:
    """(side x side uint8 thumbnail, the STATS of `img`): brightness and contrast (mean and std
    of gray, 0-255), entropy of the 64-bin gray histogram (bits), high-frequency energy (mean
    absolute Laplacian over the std: noise is all edges), saturation (mean max - min over RGB,
    0 for gray images), log aspect ratio and log short side."""
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


class _Read(Dataset):
    def __init__(self, sources: Sequence[Tuple[Dataset, int]], side: int):
        self.sources, self.side = sources, side

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, row: int):
        base, i = self.sources[row]
        img = base[i][0]
        thumb, stats = image_stats(img, self.side)
        return torch.from_numpy(thumb), torch.tensor(stats), min(img.size)


def read_pixels(sources: Sequence[Tuple[Dataset, int]], workers: int, batch_size: int = 256) -> Pixels:
    """Thumbnails and statistics of every row's image ((dataset, index) pairs), with a
    progress line every 20 batches."""
    start = time.time()
    loader = DataLoader(_Read(sources, thumb_side(sources)), batch_size=batch_size, num_workers=workers)
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
