#!/usr/bin/env python
"""SimCLR pretraining.

    python main_simclr.py --dataset synthetic -a resnet18 --no-small-images --epochs 5 -b 64 --temperature 0.5
    python main_simclr.py /data/imagenet -a resnet50 -b 4096 --epochs 100 --multiprocessing-distributed

Defaults are SimCLR's ImageNet recipe: LARS, lr 0.3 x batch/256, weight decay 1e-6,
10 warmup epochs then cosine, temperature 0.1, 2-layer projection head with BN.
"""
import argparse
import functools
from typing import Dict

import torch
import torch.nn as nn

from common.augment import transforms as augment
from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.cli import (ArgumentParser, add_pretrain_args, add_recipe_args, add_training_args, add_view_args,
                        switch)
from common.data.datasets import SMALL_CROP_MAX
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.distributed.world import expected_world_size, uses_cuda
from common.errors import UserError
from common.log.progress import log
from common.nets.batchnorm import bn_group_warning, fewest_positions
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import two_view_data
from common.train.optim import OPTIMIZERS, build_optimizer, scaled_lr
from common.train.recipes import SMALL_DATA_BATCH, SMALL_DATA_BUDGET, DataProfile, chosen, epochs_for_budget
from common.train.run import PretrainRun, lr_schedule
from common.train.pretrain_args import finalize_pretrain_args, finalize_view_args, learning_watch
from common.train.step import train_one_epoch
from common.train.trial import recipe_trial
from common.watch.view_check import view_check_only
from export.backbone import export_at_end
from simclr.augment import simclr_augmentation
from simclr.builder import SimCLR


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="SimCLR pretraining")
    add_training_args(parser, lr=0.3, epochs=100, batch_size=256, schedule=(), weight_decay=1e-6, name="simclr",
                      helps={"lr": "base learning rate: the lr used is this x batch/256 (--lr-scaling linear; sqrt: x "
                                   "sqrt(batch/256), none: absolute)"})
    # SimCLR's schedule: linear warmup, then cosine (--no-cos: the step --schedule instead)
    parser.set_defaults(cos=True, warmup_epochs=10.0)
    g = parser.add_argument_group("simclr")
    # --temperature, --proj-dim, --proj-hidden-dim: main_moco.py and main_moco_v3.py take them too, beside
    # the reference names --moco-t, --moco-dim, --moco-mlp-dim
    g.add_argument("--temperature", default=0.1, type=float,
                   help="NT-Xent temperature (0.1 for large batches; 0.5 works better for small ones)")
    g.add_argument("--proj-dim", default=128, type=int, help="output width of the projection head")
    g.add_argument("--proj-hidden-dim", default=None, type=int,
                   help="hidden width of the projection head (default: the backbone's feature width)")
    g.add_argument("--proj-layers", default=2, type=int, choices=(2, 3),
                   help="linear layers in the projection head (2: SimCLR v1, 3: SimCLR v2)")
    switch(g, "--proj-bn", default=True,
           help="BatchNorm after every linear layer of the projection head (as in the SimCLR code)")
    g.add_argument("--optimizer", default="lars", choices=OPTIMIZERS,
                   help="LARS excludes BN and biases from weight decay and trust-ratio adaptation")
    g.add_argument("--lars-eta", default=0.001, type=float, help="LARS trust coefficient")
    g.add_argument("--lr-scaling", default="linear", choices=("linear", "sqrt", "none"),
                   help="lr used = --lr x batch/256 (linear), --lr x sqrt(batch/256) (sqrt), or --lr (none)")
    switch(g, "--blur", default=None,
           help=f"Gaussian blur augmentation (default: on for crops > {SMALL_CROP_MAX} px, off for CIFAR-sized "
                f"images)")
    switch(g, "--sync-bn", default=None,
           help="BatchNorm statistics over the global batch (SimCLR's global BN; default: on with several GPUs; "
                "PyTorch cannot sync BN between CPU processes)")
    add_view_args(parser)
    add_pretrain_args(parser)
    add_recipe_args(parser, "SimCLR for 1k-20k images (epochs for 100,000 images seen, SGD lr 0.1 unscaled, wd "
                            f"1e-4, T 0.2, batch 64, warmup a tenth of the epochs; crop-min 0.3 at <= "
                            f"{SMALL_CROP_MAX} px): bench/quality.py's measured recipe")
    return parser


def small_data_recipe(data: DataProfile, crop_size: int, args: argparse.Namespace) -> Dict[str, object]:
    """`--recipe small`: bench/quality.py's small-data SimCLR recipe (docs/moco.md: Small datasets).
    SGD at batch 64: LARS' trust ratio with lr 0.3 x B/256 barely moves the weights there.
    The warmup is a tenth of the epochs in use (the recipe's or a given --epochs)."""
    epochs = chosen(args, "epochs", epochs_for_budget(data.images, SMALL_DATA_BUDGET["simclr"]))
    values: Dict[str, object] = dict(epochs=epochs, warmup_epochs=min(10.0, epochs / 10),
                                     batch_size=SMALL_DATA_BATCH, optimizer="sgd", lr=0.1, lr_scaling="none",
                                     weight_decay=1e-4, temperature=0.2)
    if crop_size <= SMALL_CROP_MAX:
        values["crop_min"] = 0.3
    return values


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    finalize_pretrain_args(args, "simclr", model_flags=("--proj-dim", "--proj-hidden-dim", "--proj-layers",
                                                         "--proj-bn", "--optimizer"), recipe=small_data_recipe,
                           views=view_recipe, trial=True)
    finalize_view_args(args)
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} leaves NT-Xent no negatives (each image's only other "
                        f"embedding is its positive); use --batch-size 2 or more (SimCLR uses 256 to 4096)")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature} must be positive; SimCLR uses 0.1 to 0.5")
    args.blur = blur_on(args)
    if args.sync_bn and expected_world_size(args) > 1 and (args.cpu or not torch.cuda.is_available()):
        raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run between CPU processes; "
                        "drop --sync-bn")
    world = expected_world_size(args)
    synced = world > 1 and uses_cuda(args) and args.sync_bn is not False  # as main_worker decides
    warning = bn_group_warning(2 * args.batch_size // (1 if synced else world),  # both views pass the BN together
                               fewest_positions(args.arch, args.small_images, args.crop_size),
                               f"two views of -b {args.batch_size}" + ("" if synced or world == 1 else
                                                                        f" over {world} processes"),
                               "raise -b or keep more resolution (--small-images, a larger --crop-size)")
    if warning:
        log(f"warning: {warning}")
    return args


def blur_on(args: argparse.Namespace) -> bool:
    """--blur, by default on for crops above SMALL_CROP_MAX px (SimCLR leaves it out for CIFAR-sized images)."""
    return args.crop_size > SMALL_CROP_MAX if args.blur is None else args.blur


def view_recipe(args: argparse.Namespace) -> augment.Recipe:
    """The two views' augmentation; --view-check-only checks the same recipe without training."""
    return simclr_augmentation(args.crop_size, strength=args.color_strength, blur=blur_on(args), crop_min=args.crop_min,
                               gray_images=args.gray_images, crop_max=args.crop_max)


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: two augmented views of every image, labels unused (--gpu-augment: the colour
    # and blur half of the recipe runs batched on the device)
    aug = view_recipe(args)
    data = two_view_data(args, env, aug, batch_size, workers)

    # ---- model
    model = SimCLR(functools.partial(build_backbone, args.arch, small_images=args.small_images,
                                     in_channels=args.in_channels, crop_size=args.crop_size),
                   args.proj_dim, args.proj_hidden_dim, args.proj_layers, args.proj_bn, args.temperature)
    init_backbone(args, model.encoder)  # --init: continued pretraining from weights you have
    if env.distributed and env.device.type == "cuda" and args.sync_bn is not False:
        # positives of one image sit on one GPU: per-GPU BN statistics would let the
        # network find them through the batch statistics instead of the image content
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif env.distributed:
        log("=> BatchNorm statistics are per process (SyncBatchNorm needs GPUs, or was turned off by --no-sync-bn)")
    model = place_model(model, env, args, networks=model.networks())
    simclr = model.module if env.distributed else model

    lr = scaled_lr(args.lr, args.batch_size, args.lr_scaling)
    optimizer = build_optimizer(model, args, lr)
    scaler = Precision.from_args(args).scaler(env.device)
    log(f"=> {args.optimizer} lr {lr:.4g} (--lr {args.lr} scaled {args.lr_scaling} for batch {args.batch_size}), "
        f"temperature {args.temperature}")

    # ---- resume (--resume PATH|auto): model, optimizer, scaler and RNG from the checkpoint; a mid-epoch
    # checkpoint continues its epoch at start_iter
    checkpoints = Checkpoints(model, optimizer, scaler, args, "simclr")
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor, payoff probe, collapse and learning watches, stop
    # the positive among the 2N-1 other embeddings of the global batch
    run = PretrainRun(args, env, data, lr_schedule(args, lr), (start_epoch, start_iter), checkpoints,
                      learning=learning_watch(args, 2 * args.batch_size - 1, 0.08, "--temperature", args.temperature))

    run.check_views(aug)  # do two views of an image still look alike? (a few seconds)
    run.before_training(simclr.encoder)  # the untrained network's kNN and payoff probe, to compare with

    # ---- epochs: train (the step loop: common/train/step.py), then kNN monitor, metrics line, checkpoint, stop
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        record = run.end_epoch(epoch, result, backbone=simclr.encoder)  # kNN, payoff, watches, metrics line
        last = checkpoints.save_epoch(epoch, record, **run.checkpoint_keys())  # + retention
        run.stop_if_asked(epoch)  # --stop-at-epoch, --stop-if-not-learning
    if args.export_at_end and last:  # main process, once the last epoch's checkpoint is written
        export_at_end(*last, args.output_dir)  # its backbone, as export_backbone.py writes it


# --view-check-only: the view check of view_recipe alone, then exit (common/watch/view_check.py);
# --recipe small with train labels: the trial of candidate recipes runs first (common/train/trial.py)
main = script_main(get_args_parser, finalize_args, main_worker, before_launch=recipe_trial,
                   instead=functools.partial(view_check_only, view_recipe))


if __name__ == "__main__":
    main()
