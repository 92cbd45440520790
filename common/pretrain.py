"""What the pretraining scripts (main_moco.py, main_simclr.py) share around their epoch
loop: their flags and derived defaults, the two-view loader, resume, and `PretrainRun`,
which keeps a run's metrics log, kNN monitor, stop request and checkpoints. The recipe
itself (augmentation, model, optimizer, lr rule, the epoch loop) is in the scripts."""
import argparse
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from common import augment
from common.checkpoint import (
    check_free_space,
    checkpoint_bytes,
    load_checkpoint,
    prepare_output_dir,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from common.cli import check_training_flags
from common.collapse import CollapseWatch, LearningWatch
from common.datasets import build_dataset, default_crop_size
from common.dist import DistEnv, is_main_process
from common.engine import EpochResult
from common.errors import UserError
from common.gpu_augment import ViewsToDevice
from common.gpu_decode import DecodeToDevice, EncodedViews, check_device_decoding, collate_encoded, read_sample
from common.knn import KnnMonitor
from common.launch import expected_world_size, per_worker, uses_cuda
from common.loader import ResumableSampler, make_loader
from common.logging import MetricsLog, log
from common.preempt import StopRequest
from common.recipes import RecipeValues, apply_recipe
from common.resume import check_arch, check_same_flags, resolve_resume, resumed_args, run_seed
from common.schedule import lr_at
from common.transformed import TransformedDataset, load_sample
from common.view_check import view_check, view_check_message


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
                             "chance for two epochs in a row (from the second epoch on); without it the epoch line "
                             "warns and metrics.jsonl says not_learning")
    parser.add_argument("--gpu-decode", action="store_true",
                        help="loader workers only read the files; JPEG decoding (nvJPEG), crop and flip run on the "
                             "training device too, then --gpu-augment's ops: for a GPU faster than the loader "
                             "cores can feed (e.g. with --compile; watch `data N%%` in the progress line)")


# exit status of a run stopped by --stop-if-not-learning (2 is a usage error, 75 a requeue)
NOT_LEARNING_EXIT = 3
STUCK_EPOCHS_TO_STOP = 2  # one noisy epoch near chance does not stop a run


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    """Flags every pretraining script takes: the kNN monitor and --save-every-iters."""
    parser.add_argument("--knn-every", default=0, type=int,
                        help="kNN accuracy of the backbone on the labelled train/val split every N epochs (0: off)")
    parser.add_argument("--save-every-iters", default=0, type=int, metavar="N",
                        help="also write checkpoint_last.pth.tar every N iterations inside an epoch (0: only at "
                             "epoch ends); a killed job then loses at most N iterations")


def learning_watch(args: argparse.Namespace, candidates: int, method_crop_min: float, temperature_flag: str,
                   temperature: float) -> LearningWatch:
    """The not-learning check of a two-view run whose contrastive accuracy picks the positive
    among `candidates`, with what to try named for this run's own values."""
    crop_min = args.crop_min or method_crop_min
    hint = (f"weaker colour jitter (--color-strength {args.color_strength / 2:g}, now {args.color_strength:g}), "
            f"larger crops (--crop-min {min(1.0, max(0.3, 2 * crop_min)):g}, now {crop_min:g}), a lower "
            f"{temperature_flag} (now {temperature:g}), or a larger --crop-size if the images are much larger than "
            f"{args.crop_size} px")
    return LearningWatch(100.0 / candidates, args.epochs, hint)


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
                           recipe: Optional[RecipeValues] = None) -> argparse.Namespace:
    """Derived defaults every pretraining script shares; checked before any worker starts.
    `model_flags`: the script's flags that shape the model; resuming with another value of
    one of them is refused with its name. `recipe`: the script's `--recipe small` values."""
    check_training_flags(args)
    args.output_dir = args.output_dir or os.path.join("runs", name)
    prepare_output_dir(args.output_dir, new_run=not args.resume, overwrite=args.overwrite)
    resume_path, saved = resumed_args(args.resume, args.output_dir, name)
    if recipe is not None:
        apply_recipe(args, recipe, saved)
    args.seed = run_seed(args.seed, saved)  # stored in the checkpoint: resume replays it
    args.crop_size = args.crop_size or default_crop_size(args)
    if args.small_images is None:
        args.small_images = args.crop_size <= 64
    if args.save_every_iters < 0:
        raise UserError(f"--save-every-iters {args.save_every_iters} is negative; pass N > 0, or 0 to save only at "
                        f"epoch ends")
    per_worker(args.batch_size, expected_world_size(args))
    if resume_path:
        # (-a/--arch is checked with the checkpoint's own arch field when it is loaded)
        check_same_flags(saved, args, ("--small-images",) + tuple(model_flags), resume_path)
    return args


@dataclass
class PretrainData:
    dataset: TransformedDataset
    loader: DataLoader
    sampler: ResumableSampler
    batch_size: int  # per process
    iters_per_epoch: int
    to_device: Callable  # the loader's views -> normalised device tensors (ViewsToDevice, DecodeToDevice)

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """This epoch's order; a mid-epoch resume skips the `start_iter` batches done."""
        if self.sampler is not None:  # benchmarks hand a list of batches
            self.sampler.set_epoch(epoch, start_iter * self.batch_size)


def pretrain_data(args: argparse.Namespace, env: DistEnv, transform, batch_size: int, workers: int,
                  decode_side: int, to_device: Callable, read: Callable = load_sample,
                  collate_fn: Optional[Callable] = None) -> PretrainData:
    """Every image of the pretraining split through `transform` (seeded per sample; labels
    unused), in batches of `batch_size` per process. `read` and `collate_fn`: how a sample
    is read and batched (--gpu-decode reads bytes and keeps them in a list)."""
    dataset = TransformedDataset(build_dataset(args, "pretrain"), transform, args.strict_data, decode_side=decode_side,
                                 read=read)
    loader, sampler = make_loader(dataset, batch_size, env, workers, env.seed, collate_fn=collate_fn)
    iters_per_epoch = len(dataset) // env.world_size // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size}; "
                        f"lower --batch-size or add images")
    log(f"=> {len(dataset)} images, {iters_per_epoch} iterations/epoch, {env.world_size} process(es), "
        f"batch {batch_size}/process on {env.device}")
    return PretrainData(dataset, loader, sampler, batch_size, iters_per_epoch, to_device)


def two_view_data(args: argparse.Namespace, env: DistEnv, recipe: augment.Recipe, batch_size: int,
                  workers: int) -> PretrainData:
    """Every image of the pretraining split as two independent views (labels unused); with
    --gpu-augment the workers hand over uint8 crops and the photometric half of `recipe`
    runs batched on the device (data.to_device); with --gpu-decode the workers hand over
    the JPEG bytes and the device decodes and crops too (common/gpu_decode.py)."""
    if args.gpu_decode:
        check_device_decoding(env.device)
        data = pretrain_data(args, env, EncodedViews(recipe, 2), batch_size, workers, recipe.decode_side(),
                             DecodeToDevice(recipe, env.device, args.channels_last, args.strict_data),
                             read=read_sample, collate_fn=collate_encoded)
        log(f"=> JPEG decoding, crops and colour/blur augmentation on {env.device.type} (--gpu-decode)")
        return data
    view_transform = recipe.split() if args.gpu_augment else recipe
    to_device = ViewsToDevice(env.device, args.channels_last, recipe.spec() if args.gpu_augment else None)
    data = pretrain_data(args, env, augment.TwoCropsTransform(view_transform), batch_size, workers,
                         recipe.decode_side(), to_device)
    log(f"=> colour/blur augmentation on "
        f"{env.device.type + ' (--gpu-augment)' if args.gpu_augment else 'the loader workers'}")
    return data


def resume_training(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                    method: str) -> Tuple[int, int]:
    """`--resume PATH|auto`: restore everything and return (epoch, iteration) to continue at;
    (0, 0) for a fresh start."""
    path = resolve_resume(args.resume, args.output_dir)
    if not path:
        if args.resume == "auto":
            log(f"=> --resume auto: no checkpoint in {args.output_dir} yet, starting a new run")
        return 0, 0
    ckpt = load_checkpoint(path, expected_method=method)
    check_arch(ckpt, args.arch, path)
    start_epoch, start_iter = restore_training_state(ckpt, model, optimizer, scaler)
    log(f"=> resumed from {path} at epoch {start_epoch}" + (f", iteration {start_iter}" if start_iter else ""))
    return start_epoch, start_iter


def lr_schedule(args: argparse.Namespace, lr: float) -> Callable[[float], float]:
    """lr at a fractional epoch: `--warmup-epochs` linear warmup to `lr`, then cosine
    (`--cos`) or the step `--schedule`."""
    return functools.partial(lr_at, base_lr=lr, epochs=args.epochs, schedule=args.schedule, cos=args.cos,
                             warmup_epochs=args.warmup_epochs)


class PretrainRun:
    """What a pretraining run keeps besides model and optimizer: the resume point (it
    restores a --resume checkpoint when built), the
    metrics log, the kNN monitor, the stop request (SLURM preemption) and the checkpoints.
    The scripts' epoch loop calls `end_epoch` after each epoch and `save_and_requeue` when
    the step loop stopped for preemption; the step loop calls `save_due`/`save_mid_epoch`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, args: argparse.Namespace,
                 env: DistEnv, method: str, data: PretrainData, lr_fn: Callable[[float], float],
                 collapse_hint: str = "lower --lr", learning: Optional[LearningWatch] = None):
        self.model, self.optimizer, self.scaler, self.args, self.env = model, optimizer, scaler, args, env
        self.method, self.data, self.lr_fn = method, data, lr_fn
        # --resume: restores model, optimizer, scaler and RNG; start_iter iterations of
        # start_epoch are already done (a mid-epoch checkpoint)
        self.start_epoch, self.start_iter = resume_training(args, model, optimizer, scaler, method)
        if is_main_process():
            check_free_space(args.output_dir, checkpoint_bytes(model, optimizer))
        self.metrics = MetricsLog(args.output_dir, tensorboard=args.tensorboard)
        # a kill between an epoch's metrics line and its checkpoint would repeat that line
        self.metrics.drop_epochs_from(self.start_epoch)
        self.knn = KnnMonitor(args, env) if args.knn_every else None
        self.untrained: Dict[str, float] = {}  # knn_before_training's, for the first metrics line
        self.stop = StopRequest(env)
        # (a resumed run starts watching afresh: a collapse across the resume point goes unnoticed)
        self.collapse = CollapseWatch(collapse_hint)
        self.learning = learning  # contrastive methods: is the accuracy leaving chance?

    def knn_before_training(self, backbone: nn.Module) -> None:
        """--knn-every on a fresh run: the kNN of the untrained `backbone` (BatchNorm
        statistics from the train images, as the trained network's will be), printed and
        kept in the first epoch's metrics as knn_top1_untrained, so the run shows what
        training bought."""
        if self.knn is None or self.start_epoch or self.start_iter:
            return
        before = self.knn.evaluate_untrained(backbone)
        if before:
            self.untrained = {f"{k}_untrained": v for k, v in before.items()}
            log(f"=> kNN before training: top-1 {before['knn_top1']:.1f} (the initial weights, BatchNorm statistics "
                f"from the train images)")

    def check_views(self, recipe: augment.Recipe) -> None:
        """A fresh run's view check (common/view_check.py): do two views of an image still
        look alike? Printed before the first step, with what to try when they do not."""
        if self.start_epoch or self.start_iter or not is_main_process() or len(self.data.dataset) < 2:
            return  # (one image has no other to compare its views with)
        result = view_check(self.data.dataset.base, recipe, self.args.arch, self.args.small_images, self.env.device)
        log(view_check_message(result, self.learning.hint if self.learning is not None else "milder augmentations"))

    def save_due(self, done: int) -> bool:
        """--save-every-iters: a mid-epoch checkpoint after `done` iterations (the epoch's last
        is followed by the epoch-end checkpoint anyway)."""
        every = self.args.save_every_iters
        return bool(every) and done % every == 0 and done != self.data.iters_per_epoch

    def save_mid_epoch(self, epoch: int, iteration: int) -> None:
        """checkpoint_last.pth.tar at (epoch, iteration): resume continues this epoch there."""
        if is_main_process():
            state = training_state(self.model, self.optimizer, self.scaler, self.args, method=self.method,
                                   epoch=epoch, iteration=iteration)
            path = save_checkpoint(state, self.args.output_dir, epoch_file=False)
            log(f"=> saved mid-epoch checkpoint {path} (epoch {epoch}, iteration {iteration})")

    def save_and_requeue(self, epoch: int, iteration: int) -> int:
        """Preemption: the mid-epoch checkpoint, `scontrol requeue`; returns the exit code."""
        self.save_mid_epoch(epoch, iteration)
        return self.stop.requeue()

    def end_epoch(self, epoch: int, result: EpochResult, backbone: nn.Module) -> Dict[str, float]:
        """kNN monitor on `backbone` (every --knn-every epochs and the last), one line in
        metrics.jsonl and the log, and the epoch's checkpoint. Returns the metrics record."""
        stats = dict(result.stats)
        if self.start_iter:  # the averages cover only the iterations after the resume
            stats["resumed_at_iteration"] = self.start_iter
        self.start_iter = 0
        stats["skipped_images"] = int(self.data.dataset.skipped.item())
        a = self.args
        if self.knn is not None and ((epoch + 1) % a.knn_every == 0 or epoch + 1 == a.epochs):
            stats.update(self.knn.evaluate(backbone))
        record = {"epoch": epoch, "lr": self.lr_fn(epoch + 1 - 1e-9), **stats, **self.untrained}
        self.untrained = {}
        collapsed = self.collapse.update(epoch, stats["acc1"]) if "acc1" in stats else None
        record["collapsed"] = collapsed is not None
        stuck = self.learning.update(epoch, stats["acc1"]) if self.learning is not None and "acc1" in stats else None
        if self.learning is not None:
            record["not_learning"] = stuck is not None
        log(f"=> epoch {epoch} done: " + "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                   if k not in ("epoch", "collapsed", "not_learning"))
            + "".join(f"  WARNING: {w}" for w in (collapsed, stuck) if w))
        self.metrics.write(record)
        if is_main_process():
            save_checkpoint(training_state(self.model, self.optimizer, self.scaler, a, method=self.method,
                                           epoch=epoch + 1, metrics=record),
                            a.output_dir, epoch_file=(epoch + 1) % a.save_freq == 0 or epoch + 1 == a.epochs)
        if stuck and a.stop_if_not_learning and self.learning.stuck_epochs >= STUCK_EPOCHS_TO_STOP:
            log(f"=> --stop-if-not-learning: stopping after epoch {epoch}; the checkpoint is kept (--resume auto "
                f"continues it, e.g. with --epochs of a new recipe)")
            raise SystemExit(NOT_LEARNING_EXIT)
        return record
