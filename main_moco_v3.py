#!/usr/bin/env python
"""MoCo v3 pretraining (Chen, Xie and He, 2021), for ViTs and ResNets.

    python main_moco_v3.py --dataset synthetic -a resnet18 --epochs 5 -b 64 --lr 0.3
    python main_moco_v3.py /data/imagenet -a resnet50 -b 4096 --epochs 100 --multiprocessing-distributed
    python main_moco_v3.py /data/imagenet -a vit_b_16 -b 4096 --lr 1.5e-4 --wd 0.1 --epochs 300 --warmup-epochs 40 \\
        --moco-t 0.2 --stop-grad-conv1 --multiprocessing-distributed

Defaults are moco-v3's recipes: for ResNets (LARS) lr 0.6 x batch/256, weight decay 1e-6, T 1.0;
for ViTs (AdamW) lr 1.5e-4 x batch/256, weight decay 0.1, T 0.2 (RECIPES); both 10 warmup epochs
then cosine, momentum 0.99 rising to 1 by a cosine; BYOL's asymmetric views (common/augment/asymmetric.py,
moco-v3's augmentation1 / augmentation2). Checkpoints use moco-v3's keys
(`module.base_encoder.*`, `module.momentum_encoder.*`, `module.predictor.*`).
"""
import argparse
import functools

import torch
import torch.nn as nn

from common.augment import transforms as augment
from common.augment.asymmetric import byol_views
from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.cli import ArgumentParser, add_pretrain_args, add_training_args, add_view_args, given, switch
from common.data.datasets import SMALL_CROP_MAX
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.errors import UserError
from common.log.progress import log
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import two_view_data
from common.train.optim import LARS, scaled_lr, split_decay_groups
from common.train.run import PretrainRun, lr_schedule
from common.train.schedule import cosine_momentum
from common.train.pretrain_args import finalize_pretrain_args, finalize_view_args, learning_watch
from common.train.step import train_one_epoch
from common.watch.view_check import view_check_only
from export.backbone import export_at_end
from moco.small_data import momentum_warning
from mocov3.builder import MoCoV3

OPTIMIZERS = ("lars", "adamw")
# moco-v3's values per optimizer (its README: ResNet-50 with LARS, ViTs with AdamW), and the
# temperature per family: AdamW's base rate is 4,000x below LARS's, so one default for both
# trains a ViT 4,000x too fast (or a ResNet with AdamW far too slowly)
RECIPES = {"lars": {"lr": 0.6, "weight_decay": 1e-6}, "adamw": {"lr": 1.5e-4, "weight_decay": 0.1}}
TEMPERATURE = {"vit": 0.2, "other": 1.0}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="MoCo v3 pretraining")
    add_training_args(parser, lr=0.6, epochs=100, batch_size=4096, schedule=(), weight_decay=1e-6, name="moco_v3",
                      helps={"lr": "base learning rate: the lr used is this x batch/256 (default: moco-v3's, 0.6 "
                                   "with LARS, 1.5e-4 with AdamW)",
                             "weight_decay": "weight decay (default: moco-v3's, 1e-6 with LARS, 0.1 with AdamW)"})
    # None: moco-v3's value for the optimizer (finalize_args); moco-v3: linear warmup, then cosine
    parser.set_defaults(cos=True, warmup_epochs=10.0, lr=None, weight_decay=None)
    g = parser.add_argument_group("moco v3")
    # moco-v3's names; --proj-dim, --proj-hidden-dim and --temperature: the same ideas' names in main_simclr.py
    g.add_argument("--moco-dim", "--proj-dim", default=256, type=int, dest="moco_dim",
                   help="output width of projector and predictor")
    g.add_argument("--moco-mlp-dim", "--proj-hidden-dim", default=4096, type=int, dest="moco_mlp_dim",
                   help="hidden width of projector and predictor")
    g.add_argument("--moco-m", default=0.99, type=float, help="momentum of the momentum encoder (at the start "
                                                               "with --moco-m-cos)")
    switch(g, "--moco-m-cos", default=True,
           help="raise the momentum from --moco-m to 1 by a half cosine over the run, every step")
    g.add_argument("--moco-t", "--temperature", default=None, type=float, dest="moco_t",
                   help="softmax temperature (default: moco-v3's, 0.2 for ViTs, 1.0 for other families)")
    g.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="default: adamw for ViTs, lars for other families (BN and biases excluded from weight "
                        "decay and trust ratio)")
    switch(g, "--stop-grad-conv1",
           help="ViT: keep the patch projection at its random init (moco-v3's fix for training instability)")
    add_view_args(parser)
    add_pretrain_args(parser)
    return parser


def is_vit(arch: str) -> bool:
    return arch.startswith("vit_")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    args.optimizer = args.optimizer or ("adamw" if is_vit(args.arch) else "lars")
    fill_recipe_defaults(args)
    finalize_pretrain_args(args, "moco_v3", model_flags=("--moco-dim", "--moco-mlp-dim", "--optimizer",
                                                          "--stop-grad-conv1"))
    finalize_view_args(args)
    if args.crop_min is None:
        args.crop_min = 0.08  # moco-v3's (BYOL's) crop scale
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} leaves MoCo v3 no negatives (they are the other keys of "
                        f"the batch); use --batch-size 2 or more (moco-v3 uses 4096)")
    if args.moco_t <= 0:
        raise UserError(f"--moco-t {args.moco_t} must be positive; moco-v3 uses 1.0 for ResNets, 0.2 for ViTs")
    if args.stop_grad_conv1 and not is_vit(args.arch):
        raise UserError(f"--stop-grad-conv1 freezes a ViT's patch projection, which -a {args.arch} has not; drop it")
    return args


def fill_recipe_defaults(args: argparse.Namespace) -> None:
    """--lr and --wd from moco-v3's recipe for the optimizer, --moco-t for the family, where
    the command line left them out (a flag given always wins); what was chosen is printed."""
    flags = (("lr", "--lr", RECIPES[args.optimizer]["lr"]),
             ("weight_decay", "--wd", RECIPES[args.optimizer]["weight_decay"]),
             ("moco_t", "--moco-t", TEMPERATURE["vit" if is_vit(args.arch) else "other"]))
    chosen = []
    for dest, flag, value in flags:
        if getattr(args, dest) is None:
            setattr(args, dest, value)
            chosen.append(f"{flag} {value:g}")
    if chosen:
        kept = [flag for dest, flag, _ in flags if given(args, dest)]
        log(f"=> moco-v3's defaults for {args.optimizer} and -a {args.arch} set: {' '.join(chosen)}"
            + (f" (kept from the command line: {', '.join(kept)})" if kept else ""))


def view_recipe(args: argparse.Namespace) -> augment.Views:
    """moco-v3's views, BYOL's asymmetric pair (its main_moco.py augmentation1 / augmentation2:
    view 1 always blurred, view 2 blurred 10 % and solarized 20 %; blur only above
    SMALL_CROP_MAX px); --view-check-only checks the same pair without training."""
    return byol_views(args.crop_size, blur=args.crop_size > SMALL_CROP_MAX, strength=args.color_strength,
                      crop_min=args.crop_min, gray_images=args.gray_images, crop_max=args.crop_max)


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: two views of every image, labels unused: BYOL's asymmetric pair, as moco-v3
    aug = view_recipe(args)
    data = two_view_data(args, env, aug, batch_size, workers)
    warning = momentum_warning(args.moco_m, args.epochs * data.iters_per_epoch, args.moco_m_cos,
                               from_init=bool(args.init))
    if warning:
        log(f"warning: {warning}")

    # ---- model: base encoder + projector + predictor, momentum encoder + projector
    model = MoCoV3(lambda: build_backbone(args.arch, small_images=args.small_images, crop_size=args.crop_size,
                                          in_channels=args.in_channels),
                   args.moco_dim, args.moco_mlp_dim, args.moco_t, args.moco_m, args.stop_grad_conv1)
    init_backbone(args, model.base_encoder, model.momentum_encoder)  # --init: both encoders start from it
    if env.distributed and env.device.type == "cuda":
        # as moco-v3: BN statistics over the global batch, so they cannot tell a positive pair apart
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = place_model(model, env, args, networks=model.networks())
    moco = model.module if env.distributed else model

    lr = scaled_lr(args.lr, args.batch_size, "linear")
    if args.optimizer == "lars":
        optimizer = LARS(split_decay_groups(model), lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr,
                                      weight_decay=args.weight_decay)
    scaler = Precision.from_args(args).scaler(env.device)
    log(f"=> {args.optimizer} lr {lr:.4g} (--lr {args.lr} x batch {args.batch_size}/256), T {args.moco_t}")

    # ---- resume (--resume PATH|auto): model, optimizer, scaler and RNG from the checkpoint; a mid-epoch
    # checkpoint continues its epoch at start_iter
    checkpoints = Checkpoints(model, optimizer, scaler, args, "moco_v3")
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor, payoff probe, collapse and learning watches, stop
    # the positive among the global batch's keys
    run = PretrainRun(args, env, data, lr_schedule(args, lr), (start_epoch, start_iter), checkpoints,
                      learning=learning_watch(args, args.batch_size, 0.08, "--moco-t", args.moco_t))

    def momentum(progress: float) -> None:  # per step, as moco-v3
        moco.m = cosine_momentum(args.moco_m, progress, args.epochs) if args.moco_m_cos else args.moco_m

    run.check_views(aug)  # do two views of an image still look alike? (a few seconds)
    run.before_training(moco.base_encoder)  # the untrained network's kNN and payoff probe, to compare with

    # ---- epochs: train (the step loop: common/train/step.py), then kNN monitor, metrics line, checkpoint, stop
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run, per_step=momentum)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        record = run.end_epoch(epoch, result, backbone=moco.base_encoder)  # kNN, payoff, watches, metrics line
        last = checkpoints.save_epoch(epoch, record, **run.checkpoint_keys())  # + retention
        run.stop_if_asked(epoch)  # --stop-at-epoch, --stop-if-not-learning
    if args.export_at_end and last:  # main process, once the last epoch's checkpoint is written
        export_at_end(*last, args.output_dir)  # its backbone, as export_backbone.py writes it


# --view-check-only: the view check of view_recipe alone, then exit (common/watch/view_check.py)
main = script_main(get_args_parser, finalize_args, main_worker, instead=functools.partial(view_check_only, view_recipe))


if __name__ == "__main__":
    main()
