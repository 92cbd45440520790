"""`--recipe small` on sources much larger than the crop: which views keep an instance signal.

A 64 px view of a whole 256 px inspection image resizes its fine texture away, and when every
image shares one global structure (a grid, a weave, a wafer) nothing else tells two images
apart once the colour jitter has moved their brightness: the contrastive task stays at chance
and the backbone ends below its random initialisation (docs/small-data.md). Views cut at the
source's own scale (a crop of the crop's size in source pixels, no resizing) keep that texture;
weaker jitter keeps what the texture alone cannot carry. Which of these a dataset needs is
measured, not guessed: the view check (common/watch/view_check.py) of each candidate in turn.
The method's own views come first and are kept whenever they leave some instance signal
(METHOD_PIXELS, the view check's no-signal level: photographs of objects, or a weave the crop
still resolves), since the source-scale views are measured on inspection-like data only; when
they leave none, source-scale views with weaker and weaker jitter follow, and the first that
reaches LEARNABLE_PIXELS is used (none does: the candidate that keeps the most). Every figure
and the choice are printed, and the values are stored in the checkpoint's args like any flag."""
import argparse
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import Dataset

from common.augment.transforms import Views, views_for
from common.cli import given
from common.data.channels import channels_of
from common.log.progress import log
from common.train.recipes import epochs_for_budget
from common.watch.view_check import NO_SIGNAL_PIXELS, view_check

# a source at least this many crops wide gets the candidates (a 256 px source and a 64 px crop:
# 4); below it a whole-image view keeps most of the source's pixels anyway
SOURCE_SCALE_RATIO = 3
# the view check's pixel separation from which the contrastive task was learned in
# docs/small-data.md (views that stayed at chance there reached up to 0.66, MoCo's; the ones
# that learned 0.68 and above, Fashion-MNIST's recipes included)
LEARNABLE_PIXELS = 0.7
# the method's views are kept from here on (the view check's own warning level)
METHOD_PIXELS = NO_SIGNAL_PIXELS
STRENGTHS = (1.0, 0.5, 0.25, 0.1)  # the source-scale candidates' --color-strength, strongest first
# images seen with source-scale views: they make the instance task easy (contrastive accuracy
# near 80 % of 127), and past this budget the backbone trades the class's local detail for the
# instance's texture (docs/small-data.md: the budget with source-scale views)
SOURCE_SCALE_BUDGET = 20000
FLAGS = ("crop_min", "crop_max", "color_strength")


def source_scale_area(crop_size: int, short_side: int) -> float:
    """The area fraction of a square crop_size crop of a source whose shortest side is
    short_side: RandomResizedCrop at exactly this scale cuts views of the source's own pixels
    (exactly on a square source; on a 4:3 one a view covers about 1.15x the crop's side)."""
    return min(1.0, (crop_size / short_side) ** 2)


def candidates(args: argparse.Namespace, short_side: int) -> List[Dict[str, object]]:
    """The views to try, in order: the method's own, then source-scale crops, strongest jitter first."""
    area = round(source_scale_area(args.crop_size, short_side), 6)
    return [{}] + [{"crop_min": area, "crop_max": area, "color_strength": s} for s in STRENGTHS]


def describe(candidate: Dict[str, object]) -> str:
    if not candidate:
        return "the method's views"
    return (f"source-scale views (--crop-min {candidate['crop_min']:g} --crop-max {candidate['crop_max']:g}) "
            f"at --color-strength {candidate['color_strength']:g}")


def choose_views(args: argparse.Namespace, dataset: Dataset, short_side: int,
                 views: Callable[[argparse.Namespace], Views], saved: Dict[str, object]) -> Optional[Dict]:
    """Set args' crop scale and colour strength for sources of `short_side` px (see the module
    docstring); `views(args)` builds the script's recipe. A flag given on the command line is
    kept and nothing is measured; a resumed run (`saved`: its checkpoint's args) keeps the
    values it started with. Returns the chosen candidate (None when nothing was measured)."""
    if saved:  # whoever chose them (this check, or the recipe trial on any source size)
        kept = [f for f in FLAGS if saved.get(f) is not None and not given(args, f)]
        for f in kept:
            setattr(args, f, saved[f])
        if kept:
            log(f"=> --recipe {args.recipe}: the resumed run keeps the views it started with: "
                + " ".join(f"--{f.replace('_', '-')} {saved[f]:g}" for f in kept))
        return None
    if short_side < SOURCE_SCALE_RATIO * args.crop_size or len(dataset) < 2:
        return None
    if any(given(args, f) for f in FLAGS):
        return None
    measured, figures = [], []
    for cand in candidates(args, short_side):
        trial = argparse.Namespace(**{**vars(args), **cand})
        # seed 0 for every candidate: the same images and draws, so the figures compare the views alone
        recipe = views_for(views(trial), channels_of(args))[0]  # (--in-channels other than 3: the N-channel views)
        result = view_check(dataset, recipe, args.arch, args.small_images, torch.device("cpu"))
        figures.append(f"{describe(cand)}: {100 * result['pixels']:.0f}% by pixels, "
                       f"{100 * result['features']:.0f}% by features")
        measured.append((result["pixels"], cand))
        if result["pixels"] >= (METHOD_PIXELS if not cand else LEARNABLE_PIXELS):
            chosen = cand
            break
    else:  # none reached its level: the one that keeps the most (the run's own view check then warns)
        chosen = max(measured, key=lambda m: m[0])[1]
    for f, value in chosen.items():
        setattr(args, f, value)
    budget = shorter_budget(args, len(dataset)) if chosen else ""
    levels = (f"the method's views are kept from {100 * METHOD_PIXELS:.0f}% by pixels, others need "
              f"{100 * LEARNABLE_PIXELS:.0f}%")
    log(f"=> --recipe {args.recipe}: {short_side} px sources, {args.crop_size} px crops; the view check of each "
        f"candidate (two views of an image more alike than views of two images, 50% by chance; {levels}):\n   "
        + "\n   ".join(figures) + f"\n=> --recipe {args.recipe} uses {describe(chosen)}{budget}")
    return chosen


def shorter_budget(args: argparse.Namespace, images: int) -> str:
    """Source-scale views' budget (SOURCE_SCALE_BUDGET images seen) in place of the recipe's,
    unless --epochs was given; a warmup the recipe set shrinks with it. Returns what changed,
    for the log line."""
    if given(args, "epochs"):
        return ""
    epochs = epochs_for_budget(images, SOURCE_SCALE_BUDGET)
    if epochs >= args.epochs:
        return ""
    if not given(args, "warmup_epochs"):
        args.warmup_epochs = round(args.warmup_epochs * epochs / args.epochs, 2)
    args.epochs = epochs
    return (f", for {SOURCE_SCALE_BUDGET:,} images seen: --epochs {epochs}"
            + (f" --warmup-epochs {args.warmup_epochs:g}" if args.warmup_epochs else ""))
