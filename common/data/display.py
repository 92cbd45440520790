"""What a person is shown of an image the network reads at full depth (--in-channels other
than 3): grids, thumbnails and reports show 8-bit RGB. One channel is shown as gray; more as the
band triple --show-bands picks (default the first three, as R, G, B). Each shown band is
stretched from its 1st to its 99th percentile, so a faint 16-bit texture is visible and one
hot pixel does not darken the rest."""
import argparse
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from common.errors import UserError


def parse_bands(value: str) -> Tuple[int, int, int]:
    """--show-bands R,G,B: three channel numbers counted from 0."""
    try:
        bands = tuple(int(v) for v in value.split(","))
    except ValueError:
        bands = ()
    if len(bands) != 3 or min(bands) < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not three channel numbers; pass e.g. 3,2,1 (counted from 0)")
    return bands  # type: ignore[return-value]


def check_bands(bands: Optional[Sequence[int]], channels: int) -> None:
    if bands is not None and max(bands) >= channels:
        raise UserError(f"--show-bands {','.join(map(str, bands))} names channel {max(bands)}, but the images have "
                        f"{channels} (0 to {channels - 1}); pick three of those")


def shown_bands(channels: int, bands: Optional[Sequence[int]]) -> Sequence[int]:
    """The channels shown as R, G, B (one channel: itself, as gray)."""
    if channels == 1:
        return (0,)
    return tuple(bands) if bands is not None else (0, 1, 2)


def stretch(x: np.ndarray) -> np.ndarray:
    """(H, W) float -> uint8, from the 1st to the 99th percentile."""
    lo, hi = np.percentile(x, (1, 99))
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def to_display(img: Union[Image.Image, torch.Tensor], bands: Optional[Sequence[int]] = None) -> Image.Image:
    """An RGB PIL image to show: a PIL image as it is (converted to RGB), a (C, H, W) tensor
    of stored values as gray (C = 1) or its --show-bands triple, each band stretched."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    x = img.detach().float().cpu().numpy()
    picks = shown_bands(x.shape[0], bands)
    planes = [stretch(x[b]) for b in picks]
    if len(planes) == 1:
        return Image.fromarray(planes[0], "L").convert("RGB")
    return Image.fromarray(np.stack(planes, axis=2), "RGB")
