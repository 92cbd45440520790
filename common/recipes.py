"""Presets (`--recipe small`): flag values a method's script fills in when the command line
left those flags at their defaults. Every value set is printed, and the checkpoint's args
record them like any flag, so a run says exactly what it ran."""
import argparse
from typing import Callable, Dict, List

from common.datasets import build_dataset, default_crop_size
from common.logging import log

RECIPES = ("default", "small")
# images seen in pretraining (`--recipe small` sets --epochs = budget / images) that beat random
# init on 2k- and 10k-image Fashion-MNIST pools (bench/quality.py; README: Small datasets).
# MoCo learns more slowly per image than SimCLR there: at 100k its kNN with all labels stayed
# below random init's; 200k (14.5 min at 32 px on 2 CPU cores) passed it.
SMALL_DATA_BUDGET = {"moco": 200000, "simclr": 100000, "inpaint": 100000}


def epochs_for_budget(num_images: int, budget: int) -> int:
    """Epochs that show the model `budget` images, at least one."""
    return max(1, round(budget / num_images))


def add_recipe_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--recipe", default="default", choices=RECIPES,
                        help=f"small: {what}; flags you pass yourself are kept; every value it sets is printed "
                             f"and stored in the checkpoint")


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def apply_recipe(args: argparse.Namespace, defaults: argparse.Namespace,
                 values: Callable[[int, int], Dict[str, object]]) -> List[str]:
    """`--recipe small`: values(num_images, crop_size) for the flags still at their
    `defaults`; returns what was set, as "--flag value" strings (also printed)."""
    if args.recipe == "default":
        return []
    num_images = len(build_dataset(args, "pretrain"))
    crop = args.crop_size or default_crop_size(args)
    set_, kept = [], []
    for dest, value in values(num_images, crop).items():
        if getattr(args, dest) != getattr(defaults, dest):
            kept.append(f"{flag(dest)} {getattr(args, dest)}")
            continue
        setattr(args, dest, value)
        set_.append(flag(dest) if value is True else f"{flag(dest)} {value}")
    log(f"=> --recipe {args.recipe} for {num_images} images at {crop} px sets: {' '.join(set_) or 'nothing'}"
        + (f"; kept from the command line: {', '.join(kept)}" if kept else ""))
    return set_
