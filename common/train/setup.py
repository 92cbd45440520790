"""The pretraining scripts' shared flags and their derived defaults (main_moco.py,
main_simclr.py, main_inpaint.py): views, the kNN monitor, --save-every-iters, the
not-learning stop; checked before any worker starts."""
import argparse
import os
from typing import Callable, Optional, Sequence

from common.augment.transforms import Recipe
from common.ckpt.io import (
    prepare_output_dir,
)
from common.ckpt.resume import check_same_flags, resumed_args, run_seed
from common.cli import check_training_flags, given
from common.data.datasets import SMALL_CROP_MAX, build_dataset, default_crop_size
from common.dist.world import expected_world_size, is_first_process, per_worker, uses_cuda
from common.errors import UserError
from common.train.data import fit_default_batch
from common.train.recipes import RecipeValues, apply_recipe
from common.train.source_views import choose_views
from common.train.trial import trial_planned
from common.watch.collapse import LearningWatch


def add_view_args(parser: argparse.ArgumentParser) -> None:
    """The two-view methods' flags (MoCo, SimCLR): augmentation strength, crops, --gpu-augment,
    and what to do when the contrastive task stays at chance."""
    parser.add_argument("--color-strength", default=1.0, type=float,
                        help="colour distortion strength s: SimCLR jitter 0.8s/0.8s/0.8s/0.2s, MoCo v2 "
                             "(--aug-plus) jitter 0.4s/0.4s/0.4s/0.1s; 1.0 is the papers' recipe")
    parser.add_argument("--gray-images", action="store_true",
                        help="the images are grayscale: views get brightness and contrast jitter only (saturation, "
                             "hue and random grayscale do nothing to a gray image); --recipe small sets it when every "
                             "sampled image has equal channels")
    parser.add_argument("--crop-min", default=None, type=float,
                        help="smallest RandomResizedCrop area fraction (default: the method's, 0.2 MoCo, 0.08 "
                             "SimCLR; raise it for small objects or low-resolution images)")
    parser.add_argument("--crop-max", default=1.0, type=float,
                        help="largest RandomResizedCrop area fraction (default 1: the whole image); below 1 on "
                             "sources much larger than --crop-size, the views keep the source's fine detail")
    parser.add_argument("--gpu-augment", default=None, action=argparse.BooleanOptionalAction,
                        help="loader workers only decode, crop and flip; colour jitter, grayscale, blur and "
                             "normalisation run batched on the training device (default: on with a GPU)")
    parser.add_argument("--stop-if-not-learning", action="store_true",
                        help="stop (exit status 3, checkpoint kept) when the contrastive accuracy stayed near "
                             "chance for two epochs in a row (from the second epoch on, past the lr warmup); without it the epoch line "
                             "warns and metrics.jsonl says not_learning")
    parser.add_argument("--gpu-decode", action="store_true",
                        help="loader workers only read the files; JPEG decoding (nvJPEG), crop and flip run on the "
                             "training device too, then --gpu-augment's ops: for a GPU faster than the loader "
                             "cores can feed (e.g. with --compile; watch `data N%%` in the progress line)")


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    """Flags every pretraining script takes: the kNN monitor, --save-every-iters and --init."""
    parser.add_argument("--knn-every", default=0, type=int,
                        help="kNN accuracy of the backbone on the labelled train/val split every N epochs (0: off)")
    parser.add_argument("--stop-at-epoch", default=0, type=int, metavar="N",
                        help="stop after N epochs of the --epochs schedule, checkpoint kept (--resume auto continues "
                             "the same schedule exactly; the recipe trial runs its candidates this way); 0: off")
    parser.add_argument("--payoff", default=True, action=argparse.BooleanOptionalAction,
                        help="when the train split has labels: a 5-fold logreg probe on them (never val) before "
                             "training and at the end (and every --knn-every epochs) says whether pretraining "
                             "beat the network it started from (OUTPUT_DIR/payoff.json)")
    parser.add_argument("--payoff-groups", default=None, metavar="REGEX",
                        help="keep images of one group (a simulation, a part, a wafer) in one fold of the payoff "
                             "probe and the recipe trial: the regex's first group (else its match) in each file name "
                             "names the image's group, e.g. '^(s[0-9]+)_'; near-copies split across folds score the "
                             "probe on images it has all but seen")
    parser.add_argument("--save-every-iters", default=0, type=int, metavar="N",
                        help="also write checkpoint_last.pth.tar every N iterations inside an epoch (0: only at "
                             "epoch ends); a killed job then loses at most N iterations")
    parser.add_argument("--export-at-end", action="store_true",
                        help="after the last epoch, also write the backbone as OUTPUT_DIR/exported/"
                             "backbone-<sha256[:8]>.pth + .json (export_backbone.py's torchvision format; "
                             "torch.hub.load(<repo>, 'backbone', path=OUTPUT_DIR, source='local') loads it)")
    parser.add_argument("--init", default=None, metavar="imagenet|PATH",
                        help="start the backbone (both MoCo encoders) from these weights and continue pretraining: "
                             "'imagenet' (torchvision's weights for -a, from the local torch hub cache only), a "
                             "torchvision state_dict, an export_backbone.py export, or any checkpoint main_lincls.py "
                             "takes; stored in the checkpoint, ignored by --resume")


def add_trial_args(parser: argparse.ArgumentParser) -> None:
    """The recipe trial's flags (common/train/trial.py), for the scripts that run it."""
    parser.add_argument("--trial", default=True, action=argparse.BooleanOptionalAction,
                        help="--recipe small with train labels: train each candidate recipe briefly, score it with a "
                             "cross-validated logreg probe on the train labels (never val), continue the best "
                             "(OUTPUT_DIR/trial.json); --no-trial: the view check alone picks the views")
    parser.add_argument("--stop-if-no-gain", action="store_true",
                        help="stop after the trial (exit status 4, the trial runs kept) when even the best candidate "
                             "does not beat the untrained network by more than the fold spread")


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
    if args.crop_min is not None and not 0 < args.crop_min <= 1:
        raise UserError(f"--crop-min {args.crop_min} is an area fraction; use a value in (0, 1], e.g. 0.2")
    if not 0 < args.crop_max <= 1 or (args.crop_min is not None and args.crop_max < args.crop_min):
        raise UserError(f"--crop-max {args.crop_max} must be an area fraction in (0, 1], at least --crop-min")


def finalize_pretrain_args(args: argparse.Namespace, name: str, model_flags: Sequence[str] = (),
                           recipe: Optional[RecipeValues] = None,
                           views: Optional[Callable[[argparse.Namespace], Recipe]] = None,
                           trial: bool = False) -> argparse.Namespace:
    """Derived defaults every pretraining script shares; checked before any worker starts.
    `model_flags`: the script's flags that shape the model; resuming with another value of
    one of them is refused with its name. `recipe`: the script's `--recipe small` values;
    `views`: the script's view recipe, for `--recipe small`'s choice of views on sources much
    larger than the crop (common/train/source_views.py); `trial`: the script runs the recipe
    trial on train labels (common/train/trial.py), which then chooses the views instead."""
    check_training_flags(args)
    args.output_dir = args.output_dir or os.path.join("runs", name)
    prepare_output_dir(args.output_dir, new_run=not args.resume, overwrite=args.overwrite,
                       lock=is_first_process(args))
    resume_path, saved = resumed_args(args.resume, args.output_dir, name)
    profiled = apply_recipe(args, recipe, saved) if recipe is not None else None
    args.seed = run_seed(args.seed, saved)  # stored in the checkpoint: resume replays it
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
        fit_default_batch(args, profiled[0].images if profiled else len(build_dataset(args, "pretrain")),
                          expected_world_size(args))
    per_worker(args.batch_size, expected_world_size(args))
    if resume_path:
        # (-a/--arch is checked with the checkpoint's own arch field when it is loaded)
        check_same_flags(saved, args, ("--small-images",) + tuple(model_flags), resume_path)
    return args
