"""The derived defaults and checks of the pretraining scripts' shared flags (main_moco.py,
main_moco_v3.py, main_simclr.py, main_inpaint.py; the flags themselves: common/cli/pretrain.py):
views, the kNN monitor, --save-every-iters, the not-learning stop; checked before any
worker starts."""
import argparse
import os
from typing import Callable, Optional, Sequence

from common.augment.transforms import Views
from common.ckpt.io import (
    prepare_output_dir,
)
from common.ckpt.resume import check_same_flags, resumed_args, run_seed
from common.cli import check_training_flags, given
from common.data.datasets import SMALL_CROP_MAX, default_crop_size, resolve_channels
from common.distributed.world import expected_world_size, is_first_process, per_worker, uses_cuda
from common.errors import UserError
from common.train.data import fit_default_batch, pretraining_images
from common.train.recipes import RecipeValues, apply_recipe
from common.train.source_views import choose_views
from common.train.trial import trial_planned
from common.watch.collapse import LearningWatch


def learning_watch(args: argparse.Namespace, candidates: int, method_crop_min: float, temperature_flag: str,
                   temperature: float) -> LearningWatch:
    """The not-learning check of a two-view run whose contrastive accuracy picks the positive
    among `candidates`, with what to try named for this run's own values."""
    crop_min = args.crop_min or method_crop_min
    if args.crop_max < 1:  # views cut from part of the source (source-scale views): a larger crop, same scale
        crops = (f"larger crops at the same scale (--crop-size {2 * args.crop_size} --crop-min "
                 f"{min(1.0, 4 * crop_min):g} --crop-max {min(1.0, 4 * args.crop_max):g}, now {crop_min:g} and "
                 f"{args.crop_max:g})")
    else:
        crops = f"larger crops (--crop-min {min(1.0, max(0.3, 2 * crop_min)):g}, now {crop_min:g})"
    hint = (f"weaker colour jitter (--color-strength {args.color_strength / 2:g}, now {args.color_strength:g}), "
            f"{crops}, a lower {temperature_flag} (now {temperature:g}), or a larger --crop-size if the images are "
            f"much larger than {args.crop_size} px")
    return LearningWatch(100.0 / candidates, args.epochs, hint, args.warmup_epochs)


def finalize_view_args(args: argparse.Namespace) -> None:
    """add_view_args' derived defaults and checks."""
    if args.gpu_augment is None:
        args.gpu_augment = uses_cuda(args) or args.gpu_decode
    if args.gpu_decode and not args.gpu_augment:
        raise UserError("--gpu-decode runs the whole augmentation on the device; drop --no-gpu-augment")
    if args.noise < 0:
        raise UserError(f"--noise {args.noise} is a noise strength in channel stds; pass 0 (off) or more, e.g. 0.1")
    if args.crop_min is not None and not 0 < args.crop_min <= 1:
        raise UserError(f"--crop-min {args.crop_min} is an area fraction; use a value in (0, 1], e.g. 0.2")
    if not 0 < args.crop_max <= 1 or (args.crop_min is not None and args.crop_max < args.crop_min):
        raise UserError(f"--crop-max {args.crop_max} must be an area fraction in (0, 1], at least --crop-min")


def finalize_pretrain_args(args: argparse.Namespace, name: str, model_flags: Sequence[str] = (),
                           recipe: Optional[RecipeValues] = None,
                           views: Optional[Callable[[argparse.Namespace], Views]] = None,
                           trial: bool = False) -> argparse.Namespace:
    """Derived defaults every pretraining script shares; checked before any worker starts.
    `model_flags`: the script's flags that shape the model; resuming with another value of
    one of them is refused with its name. `recipe`: the script's `--recipe small` values;
    `views`: the script's view recipe, for `--recipe small`'s choice of views on sources much
    larger than the crop (common/train/source_views.py); `trial`: the script runs the recipe
    trial on train labels (common/train/trial.py), which then chooses the views instead."""
    check_training_flags(args)
    args.output_dir = args.output_dir or os.path.join("runs", name)
    if not vars(args).get("view_check_only"):  # (--view-check-only writes nothing: no folder, no lock)
        prepare_output_dir(args.output_dir, new_run=not args.resume, overwrite=args.overwrite,
                           lock=is_first_process(args))
    resume_path, saved = resumed_args(args.resume, args.output_dir, name)
    args.seed = run_seed(args.seed, saved)  # stored in the checkpoint: resume replays it
    resolve_channels(args, "pretrain", saved)  # --in-channels, and the statistics of a count other than 3
    profiled = apply_recipe(args, recipe, saved) if recipe is not None else None
    args.crop_size = args.crop_size or default_crop_size(args)
    if args.small_images is None:
        args.small_images = args.crop_size <= SMALL_CROP_MAX
    if profiled is not None and views is not None:
        data, dataset = profiled
        if not trial or saved or trial_planned(args):  # else the trial measures the views on the labels
            choose_views(args, dataset, data.short_side, views, saved)
    if args.stop_at_epoch < 0:
        raise UserError(f"--stop-at-epoch {args.stop_at_epoch} is negative; pass the number of epochs to stop "
                        f"after, or 0 for off")
    if args.save_every_iters < 0:
        raise UserError(f"--save-every-iters {args.save_every_iters} is negative; pass N > 0, or 0 to save only at "
                        f"epoch ends")
    if not given(args, "batch_size"):  # (a given -b is kept: too large, the loader says so)
        # the images the run trains on: without the payoff's held-out ones
        fit_default_batch(args, len(pretraining_images(args, say=False)), expected_world_size(args))
    per_worker(args.batch_size, expected_world_size(args))
    if resume_path:
        # (-a/--arch is checked with the checkpoint's own arch field when it is loaded)
        check_same_flags(saved, args, ("--small-images",) + tuple(model_flags), resume_path)
    return args
