"""How many channels the network sees and how they are normalised (`--in-channels`, issue 44).

Three channels is today's path: images decoded to 8-bit RGB PIL images, normalised with
ImageNet's statistics (the ones facebookresearch/moco and torchvision's weights expect). Any
other count reads images at full depth (common/data/arrays.py: 16-bit values kept, multi-band
TIFF and .npy) as float tensors of their stored values, normalised with per-channel statistics
measured on a seeded sample of the training images: a 16-bit X-ray and a 13-band satellite tile
have no ImageNet mean."""
import argparse
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_SAMPLE = 256  # images the statistics are measured on (spread over the set, seeded)
DETECT_SAMPLE = 16  # images --in-channels auto reads


@dataclass(frozen=True)
class Channels:
    """The network's input: `count` channels, normalised as (x - mean) / std per channel.
    With count 3 the values are RGB in [0, 1]; otherwise the images' stored values."""
    count: int = 3
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    # --channel-norm image: each image standardised by its own per-channel mean and std instead
    # (mean/std above are then only the set's, for curation's pixel statistics)
    per_image: bool = False

    @property
    def full_depth(self) -> bool:
        """Read through common/data/arrays.py as float tensors, not as 8-bit RGB PIL images."""
        return self.count != 3


RGB = Channels()


def channels_of(args: argparse.Namespace) -> Channels:
    """The Channels a resolved `args` describes (resolve_channels / follow_checkpoint set them)."""
    if args.in_channels in (None, "auto", "3", 3) or args.channel_mean is None:
        return RGB
    return Channels(int(args.in_channels), tuple(args.channel_mean), tuple(args.channel_std),
                    per_image=args.channel_norm == "image")


def parse_in_channels(value: str) -> str:
    """--in-channels: 'auto' or a count of 1 or more (kept as text until resolved)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a channel count; pass 1 (grayscale), 3 (RGB), the "
                                         f"number of bands, or auto")
    return str(n)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) float32 array -> (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def pil_full_depth(img, channels: int, where: str):
    """A PIL image (a torchvision or generated one) as the (C, H, W) float tensor of
    --in-channels `channels`: grayscale stays one channel; an RGB image made gray for 1."""
    if channels == 1 and img.mode not in ("L", "I", "I;16", "F"):
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    check_count(arr.shape[2], channels, where)
    return to_tensor(arr)


def sample_indices(n: int, count: int, seed: int) -> Sequence[int]:
    """`count` of range(n), seeded, spread over the whole set (folders are listed class by class)."""
    if n <= count:
        return range(n)
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def measure_stats(dataset: Dataset, count: int, seed: int,
                  sample: int = STATS_SAMPLE) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """Per-channel mean and std of the stored values over every pixel of a seeded sample of
    `dataset` (in full-depth mode: its samples are (C, H, W) tensors); returns (mean, std,
    images read). A constant channel gets std 1, so it is centred, not divided by zero."""
    total = np.zeros(count)
    squares = np.zeros(count)
    pixels, read = 0, 0
    for i in sample_indices(len(dataset), sample, seed):
        try:
            x = dataset[i][0]
        except (OSError, ValueError):
            continue
        x = x.double().reshape(count, -1)
        total += x.sum(dim=1).numpy()
        squares += (x * x).sum(dim=1).numpy()
        pixels += x.shape[1]
        read += 1
    if not read:
        raise UserError("none of the sampled images could be read to measure the channel statistics; check the "
                        "data folder")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 0.0))
    std = np.where(std > 1e-6 * np.maximum(np.abs(mean), 1.0), std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std), read


def describe(ch: Channels) -> str:
    def fmt(vs: Sequence[float]) -> str:
        return ", ".join(f"{v:.4g}" for v in vs[:8]) + (", ..." if len(vs) > 8 else "")
    return f"mean ({fmt(ch.mean)}), std ({fmt(ch.std)})"


def standardise_per_image(x: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> each image's channels at zero mean and unit std over their pixels
    (--channel-norm image); a flat channel becomes 0."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


class StandardisePerImage:
    """The eval transforms' last step for --channel-norm image."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return standardise_per_image(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_count(found: int, expected: int, where: str) -> None:
    """An image of another channel count than the run's is one sentence naming it."""
    if found != expected:
        raise UserError(f"{where} has {found} channel(s), not the {expected} of --in-channels {expected}; give one "
                        f"kind of image per folder, or pass --in-channels {found} (or auto)")


def first_conv_note(count: int) -> Optional[str]:
    """How RGB weights were fitted to `count` input channels (adapt_rgb_filters), for the log."""
    if count == 3:
        return None
    if count == 1:
        return "the RGB filters summed into one (a gray image then gives the RGB network's response)"
    return f"the RGB filters repeated over {count} channels and scaled by 3/{count}"


def adapt_rgb_filters(weight: torch.Tensor, count: int) -> torch.Tensor:
    """A first layer's RGB weights (out, 3, k, k) for `count` input channels, the usual recipe
    (timm's adapt_input_conv): summed for one channel, repeated and scaled by 3/count for more."""
    if count == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-count // 3)
    return weight.repeat(1, reps, 1, 1)[:, :count] * (3.0 / count)
