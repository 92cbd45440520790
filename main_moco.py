#!/usr/bin/env python
"""MoCo v1/v2 pretraining.

    python main_moco.py --dataset synthetic -a resnet18 --epochs 5 -b 64 --moco-k 4096 --mlp --aug-plus --cos
    python main_moco.py /data/imagenet -a resnet50 --lr 0.03 -b 256 --mlp --aug-plus --cos --multiprocessing-distributed
"""
import argparse
import functools
from typing import Dict

import torch

from common.augment import transforms as augment
from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.cli import (ArgumentParser, add_pretrain_args, add_recipe_args, add_training_args, add_view_args,
                        switch)
from common.data.datasets import SMALL_CROP_MAX
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.distributed.world import expected_world_size
from common.errors import UserError
from common.log.progress import log
from common.nets.batchnorm import bn_group_warning, fewest_positions
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import two_view_data
from common.train.recipes import (SMALL_DATA_BATCH, SMALL_DATA_BUDGET, DataProfile, chosen, epochs_for_budget,
                                  set_by_recipe)
from common.train.run import PretrainRun, lr_schedule
from common.train.schedule import cosine_momentum
from common.train.pretrain_args import finalize_pretrain_args, finalize_view_args, learning_watch
from common.train.step import train_one_epoch
from common.train.trial import recipe_trial
from common.watch.view_check import view_check_only
from export.backbone import export_at_end
from moco.augment import moco_v1, moco_v2
from moco.builder import MoCo
from moco.small_data import fitted_queue, momentum_warning, queue_warning
from moco.split_bn import SplitBatchNorm


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="MoCo pretraining")
    add_training_args(parser, lr=0.03, epochs=200, batch_size=256, schedule=(120, 160), weight_decay=1e-4, name="moco")
    # facebookresearch/moco's names; --proj-dim and --temperature: the same ideas' names in main_simclr.py
    g = parser.add_argument_group("moco")
    g.add_argument("--moco-dim", "--proj-dim", default=128, type=int, dest="moco_dim",
                   help="feature dimension: output width of the encoder's fc or MLP head")
    g.add_argument("--moco-k", default=65536, type=int, help="queue size; number of negative keys")
    g.add_argument("--moco-m", default=0.999, type=float, help="momentum of the key encoder")
    switch(g, "--moco-m-cos",
           help="raise the key-encoder momentum from --moco-m to 1 by a half cosine over the run (BYOL, MoCo v3): a "
                "fast-moving key encoder early, a stable queue late; for short runs")
    g.add_argument("--moco-t", "--temperature", default=0.07, type=float, dest="moco_t", help="softmax temperature")
    switch(g, "--mlp", help="MLP projection head (MoCo v2)")
    switch(g, "--aug-plus", help="MoCo v2 augmentation (colour jitter 0.8, blur)")
    switch(g, "--symmetric", help="symmetric loss: both views as query and key")
    g.add_argument("--bn-splits", default=8, type=int,
                   help="BN groups that simulate multi-GPU shuffle-BN in a single-process run")
    add_view_args(parser)
    add_pretrain_args(parser)
    add_recipe_args(parser, "MoCo v2 for 1k-20k images (epochs for 200,000 images seen, queue a tenth of the "
                            f"dataset, momentum 0.99, T 0.5, batch 64, lr 0.06 cosine; crop-min 0.3 at <= "
                            f"{SMALL_CROP_MAX} px): bench/quality.py's measured recipe")
    return parser


def small_data_recipe(data: DataProfile, crop_size: int, args: argparse.Namespace) -> Dict[str, object]:
    """`--recipe small`: bench/quality.py's small-data MoCo v2 recipe (docs/moco.md: Small datasets).
    The queue holds at most a tenth of the images, a multiple of the keys one step enqueues
    with the batch in use (the recipe's 64 or a given -b)."""
    batch = chosen(args, "batch_size", SMALL_DATA_BATCH)
    values: Dict[str, object] = dict(epochs=epochs_for_budget(data.images, SMALL_DATA_BUDGET["moco"]),
                                     batch_size=SMALL_DATA_BATCH, lr=0.06, cos=True, mlp=True, aug_plus=True,
                                     moco_t=0.5, moco_m=0.99, bn_splits=2,
                                     moco_k=fitted_queue(data.images, batch * (2 if args.symmetric else 1)))
    if crop_size <= SMALL_CROP_MAX:
        values["crop_min"] = 0.3  # 0.2 cuts most of a 28-32 px object away
    return values


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    finalize_pretrain_args(args, "moco", model_flags=("--moco-dim", "--moco-k", "--mlp", "--symmetric"),
                           recipe=small_data_recipe, views=view_recipe, trial=True)
    finalize_view_args(args)
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    if args.moco_k % keys_per_step != 0:
        raise UserError(f"--moco-k {args.moco_k} is not a multiple of the {keys_per_step} keys enqueued per step "
                        f"(global batch{' x2 with --symmetric' if args.symmetric else ''}); "
                        f"use e.g. --moco-k {max(1, args.moco_k // keys_per_step) * keys_per_step}")
    world = expected_world_size(args)
    splits = args.bn_splits if world == 1 and args.bn_splits > 1 else 1  # DDP: shuffle-BN per process instead
    per_process = args.batch_size // world
    positions = fewest_positions(args.arch, args.small_images, args.crop_size)
    if positions == 0 and args.bn_splits > 1:  # LayerNorm networks (ConvNeXt, Swin, ViT): nothing to split
        log(f"=> {args.arch} has no BatchNorm: shuffle-BN (--bn-splits) is not needed and is off")
        args.bn_splits = 1
    elif per_process % splits == 0:  # (else the worker names the divisibility problem)
        warning = bn_group_warning(per_process // splits, positions,
                                   f"-b {args.batch_size} over {world} process(es)"
                                   + (f" in --bn-splits {splits} groups" if splits > 1 else ""),
                                   "raise -b, lower --bn-splits, or keep more resolution (--small-images, a larger "
                                   "--crop-size)")
        if warning:
            log(f"warning: {warning}")
    return args


def view_recipe(args: argparse.Namespace) -> augment.Recipe:
    """The two views' augmentation (MoCo v2 with --aug-plus, else v1); --view-check-only
    checks the same recipe without training."""
    if args.aug_plus:
        return moco_v2(args.crop_size, blur=args.crop_size > SMALL_CROP_MAX, strength=args.color_strength,
                       crop_min=args.crop_min, gray_images=args.gray_images, crop_max=args.crop_max)
    return moco_v1(args.crop_size, args.crop_min, args.gray_images, args.crop_max)


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: two augmented views of every image, labels unused (--gpu-augment: the colour
    # and blur half of the recipe runs batched on the device)
    aug = view_recipe(args)
    data = two_view_data(args, env, aug, batch_size, workers)
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    queue = queue_warning(args.moco_k, len(data.dataset), keys_per_step)
    if queue and set_by_recipe(args, "moco_k"):  # the recipe's own choice, the smallest it can make: information
        log(f"=> --recipe {args.recipe} set --moco-k {args.moco_k}, one step's {keys_per_step} keys, the smallest "
            f"queue there is: {100 * args.moco_k / len(data.dataset):.0f}% of the {len(data.dataset)} images, above "
            f"the tenth it aims at (a smaller -b lowers it)")
        queue = None
    for warning in (queue,
                    momentum_warning(args.moco_m, args.epochs * data.iters_per_epoch, args.moco_m_cos,
                                     from_init=bool(args.init))):
        if warning:
            log(f"warning: {warning}")

    # ---- model
    norm_layer = None
    if not env.distributed and args.bn_splits > 1:
        if batch_size % args.bn_splits != 0:
            raise UserError(f"--batch-size {batch_size} is not divisible by --bn-splits {args.bn_splits}; "
                            f"change one of them")
        norm_layer = functools.partial(SplitBatchNorm, num_splits=args.bn_splits)
    model = MoCo(functools.partial(build_backbone, args.arch, small_images=args.small_images, norm_layer=norm_layer,
                                   crop_size=args.crop_size, in_channels=args.in_channels),
                 args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, args.symmetric)
    init_backbone(args, model.encoder_q, model.encoder_k)  # --init: both encoders start from it
    model = place_model(model, env, args, networks=model.networks())
    moco = model.module if env.distributed else model

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=env.device.type == "cuda")
    scaler = Precision.from_args(args).scaler(env.device)

    # ---- resume (--resume PATH|auto): model, optimizer, scaler and RNG from the checkpoint; a mid-epoch
    # checkpoint continues its epoch at start_iter
    checkpoints = Checkpoints(model, optimizer, scaler, args, "moco")
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor, payoff probe, collapse and learning watches, stop
    run = PretrainRun(args, env, data, lr_schedule(args, args.lr), (start_epoch, start_iter), checkpoints,
                      collapse_hint="on a small dataset lower --moco-k (see the queue warning), else lower --lr",
                      learning=learning_watch(args, 1 + args.moco_k, 0.2, "--moco-t", args.moco_t))  # 1 positive + K

    def key_momentum(progress: float) -> None:  # --moco-m-cos, per step as MoCo v3
        moco.m = cosine_momentum(args.moco_m, progress, args.epochs)

    run.check_views(aug)  # do two views of an image still look alike? (a few seconds)
    run.before_training(moco.encoder_q)  # the untrained network's kNN and payoff probe, to compare with

    # ---- epochs: train (the step loop: common/train/step.py), then kNN monitor, metrics line, checkpoint, stop
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run,
                                 per_step=key_momentum if args.moco_m_cos else None)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        record = run.end_epoch(epoch, result, backbone=moco.encoder_q)  # kNN, payoff, watches, metrics line
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
