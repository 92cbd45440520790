"""Presets (`--recipe small`): flag values a method's script fills in when the command line
left those flags at their defaults. Every value set is printed, and the checkpoint's args
record them like any flag, so a run says exactly what it ran."""
import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from common.cli import given
from common.data.datasets import build_dataset, default_crop_size
from common.log.progress import log

# images seen in pretraining (`--recipe small` sets --epochs = budget / images): the budgets that
# beat random init in bench/quality.py's small-data table; MoCo learns more slowly per image than
# SimCLR there (docs/small-data.md: why these values)
# (BYOL/SimSiam, distillation: SimCLR's budget, not measured for them; docs/byol.md, docs/distill.md)
SMALL_DATA_BUDGET = {"moco": 200000, "simclr": 100000, "inpaint": 100000, "byol": 100000, "distill": 100000,
                     "dino": 100000}
SMALL_DATA_BATCH = 64  # both contrastive recipes' batch


def epochs_for_budget(num_images: int, budget: int) -> int:
    """Epochs that show the model `budget` images, at least one."""
    return max(1, round(budget / num_images))


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def shown(dest: str, value: object) -> str:
    """A value as the command line gives it: --x, --no-x, --x VALUE."""
    if isinstance(value, bool):
        return flag(dest) if value else "--no-" + flag(dest)[2:]
    if isinstance(value, (list, tuple)):  # nargs flags: --global-crops-scale 0.3 1
        return f"{flag(dest)} {' '.join(f'{v:g}' for v in value)}"
    return f"{flag(dest)} {value}"


def chosen(args: argparse.Namespace, dest: str, recipe_value: object) -> object:
    """The value `dest` will have under the recipe: the typed one, else the recipe's (for a
    recipe value that depends on another flag, e.g. the queue on the batch in use)."""
    return getattr(args, dest) if given(args, dest) else recipe_value


def set_by_recipe(args: argparse.Namespace, dest: str) -> bool:
    """Whether `dest` holds the recipe's value (a --recipe other than default, the flag not
    typed): a warning about such a value would criticise the recipe's own choice."""
    return args.recipe != "default" and not given(args, dest)


PROFILE_SAMPLE = 32  # images read to profile the data: a second or two


@dataclass(frozen=True)
class DataProfile:
    """What `--recipe small` looks at: how many images, whether they are grayscale (every
    sampled image has equal channels) and their median shortest side in pixels (0 when the
    dataset cannot say, e.g. none of the sampled images could be read)."""
    images: int
    grayscale: bool
    short_side: int


def profile_data(dataset: Dataset, sample: int = PROFILE_SAMPLE) -> DataProfile:
    """Read up to `sample` images spread over `dataset`; unreadable ones are left out."""
    n = len(dataset)
    step = max(1, n // max(1, sample))
    sides, gray = [], True
    for i in range(0, n, step)[:sample]:
        try:
            img = dataset[i][0]
        except (OSError, ValueError):
            continue
        if isinstance(img, torch.Tensor):  # --in-channels other than 3: (C, H, W), gray when C is 1
            sides.append(min(img.shape[1:]))
            gray = gray and img.shape[0] == 1
            continue
        sides.append(min(img.size))
        if gray and img.mode not in ("L", "1", "I", "F", "I;16"):
            px = np.asarray(img.convert("RGB"))
            gray = bool((px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all())
    return DataProfile(n, gray and bool(sides), int(np.median(sides)) if sides else 0)


def crop_for_source(short_side: int, default: int) -> int:
    """`--recipe small`'s crop for sources of this shortest side: 32 px for small sources (the
    crop the Fashion-MNIST table measured), 64 px for larger ones, whose detail a 32 px view
    resizes away (docs/small-data.md: the crop for the source); `default` when the source size
    is unknown. Larger crops cost the square of their side on a CPU and were not found to
    learn better on the inspection benchmark, so the recipe stops at 64."""
    if short_side <= 0:
        return default
    return 32 if short_side <= 48 else 64


# a method's recipe: (the data's profile, the crop size in use, args) -> the flag values it sets
RecipeValues = Callable[[DataProfile, int, argparse.Namespace], Dict[str, object]]


def apply_recipe(args: argparse.Namespace, values: RecipeValues,
                 saved: Dict[str, object]) -> Optional[Tuple[DataProfile, Dataset]]:
    """`--recipe small`: the crop size for the data's source size and the grayscale views for
    grayscale data (both shared by every method), then values(profile, crop_size, args), for
    the flags the command line did not give (args.given_flags); a resumed run (`saved`: its
    checkpoint's args) keeps the values it started with, since the dataset may have grown and
    a new --epochs would bend its lr schedule mid-run. Every value set is printed. Returns the
    data's profile and the pretraining dataset (None for `--recipe default`), for the views'
    choice (common/train/source_views.py)."""
    if args.recipe == "default":
        return None
    dataset = build_dataset(args, "pretrain")
    data = profile_data(dataset)
    shared: Dict[str, object] = {"crop_size": crop_for_source(data.short_side, default_crop_size(args))}
    if data.grayscale:
        shared["gray_images"] = True
    crop = chosen(args, "crop_size", saved.get("crop_size", shared["crop_size"]))
    num_images = data.images
    log(f"=> --recipe {args.recipe}: {num_images} images, {'grayscale' if data.grayscale else 'colour'}, "
        f"median shortest side {data.short_side or 'unknown'} px")
    set_, kept, restored, differs = [], [], [], []
    for dest, value in {**shared, **values(data, crop, args)}.items():
        if given(args, dest):
            kept.append(shown(dest, getattr(args, dest)))
        elif dest in saved:
            setattr(args, dest, saved[dest])
            restored.append(shown(dest, saved[dest]))
            if saved[dest] != value:
                differs.append(shown(dest, value))
        else:
            setattr(args, dest, value)
            set_.append(shown(dest, value))
    if restored:
        log(f"=> --recipe {args.recipe}: the resumed run keeps the values it started with: {' '.join(restored)}"
            + (f" (for today's {num_images} images the recipe would set {' '.join(differs)}; pass a flag to "
               f"change it)" if differs else ""))
    if set_ or not restored:
        log(f"=> --recipe {args.recipe} for {num_images} images at {crop} px sets: {' '.join(set_) or 'nothing'}")
    if kept:
        log(f"=> --recipe {args.recipe}: kept from the command line: {', '.join(kept)}")
    return data, dataset
