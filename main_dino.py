#!/usr/bin/env python
"""DINO pretraining (Caron et al., 2021), as facebookresearch/dino trains it, for ViTs and ResNets.

    python main_dino.py --dataset synthetic -a vit_tiny --epochs 5 -b 64 --out-dim 1024 --local-crops-number 2
    python main_dino.py /data/imagenet -a vit_b_16 -b 512 --epochs 100 --multiprocessing-distributed
    python main_dino.py /data/imagenet -a resnet50 -b 512 --epochs 100 --multiprocessing-distributed  # SGD recipe

A student (backbone + DINOHead) sees 2 global and --local-crops-number local crops, its EMA
teacher the 2 global ones; the student matches the teacher's centred (--center-momentum),
sharpened (--teacher-temp after --warmup-teacher-temp-epochs) output (dino/). Defaults are
DINO's: AdamW for ViTs, lr 5e-4 x batch/256 after 10 warmup epochs, cosine to --min-lr 1e-6,
weight decay 0.04 rising to 0.4 by a cosine, --clip-grad 3, the last layer frozen in the first
epoch, teacher momentum 0.996 rising to 1, --out-dim 65536, crops (0.4, 1) / (0.05, 0.4); for
other families DINO's ResNet-50 recipe: SGD lr 0.03 x batch/256, weight decay 1e-4, crops
(0.14, 1) / (0.05, 0.14). Checkpoints hold `student` and `teacher` as DINO writes them
(`backbone.*`, `head.*`, the student `module.`-prefixed under DDP, a ViT under timm's names)
beside this repo's state_dict; evaluation takes the teacher, as DINO's own (docs/dino.md).
"""
import argparse
import functools
from typing import Dict

import torch

from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.cli import (ArgumentParser, add_pretrain_args, add_recipe_args, add_training_args, add_view_args, given,
                        switch)
from common.data.datasets import SMALL_CROP_MAX
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.errors import UserError
from common.log.progress import log
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import multi_view_data
from common.train.optim import LARS, scaled_lr, split_decay_groups
from common.train.pretrain_args import finalize_pretrain_args, finalize_view_args
from common.train.recipes import SMALL_DATA_BATCH, SMALL_DATA_BUDGET, DataProfile, chosen, epochs_for_budget
from common.train.run import PretrainRun
from common.train.schedule import cosine_momentum
from common.train.step import train_one_epoch
from common.watch.entropy import EntropyWatch
from common.watch.view_check import view_check_only
from dino import schedule
from dino.augment import dino_views, local_crop_size
from dino.builder import DINO, checkpoint_layout
from export.backbone import export_at_end

OPTIMIZERS = ("adamw", "sgd", "lars")
# DINO's values per optimizer: AdamW its ViT recipe, SGD its ResNet-50 one (README); LARS (in its
# code, without a published recipe) takes SGD's
RECIPES = {"adamw": dict(lr=0.0005, weight_decay=0.04, weight_decay_end=0.4),
           "sgd": dict(lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4),
           "lars": dict(lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4)}
# crop scales per family: DINO's defaults (ViTs) and its ResNet-50 command
CROPS = {"vit": dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4)),
         "other": dict(global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14))}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="DINO pretraining")
    add_training_args(parser, lr=0.0005, epochs=100, batch_size=512, schedule=(), weight_decay=0.04, name="dino",
                      helps={"lr": "base learning rate: the lr used is this x batch/256, after --warmup-epochs "
                                   "then cosine to --min-lr (default: DINO's, 5e-4 with AdamW, 0.03 with SGD/LARS)",
                             "weight_decay": "weight decay at the start, cosine to --weight-decay-end (default: "
                                             "DINO's, 0.04 with AdamW, 1e-4 with SGD/LARS)"})
    parser.set_defaults(cos=True, warmup_epochs=10.0, lr=None, weight_decay=None)
    g = parser.add_argument_group("dino")
    g.add_argument("--out-dim", default=65536, type=int, help="prototypes of the DINO head (its last layer's width)")
    switch(g, "--norm-last-layer", default=True,
           help="keep the weight norm of the head's last layer at 1 (DINO's default; --no-norm-last-layer for "
                "better ViT-S accuracy, less stable)")
    switch(g, "--use-bn-in-head", help="BatchNorm in the head's MLP (DINO's default: off)")
    g.add_argument("--momentum-teacher", default=0.996, type=float,
                   help="the teacher's EMA momentum at the start, raised to 1 by a half cosine, every step")
    g.add_argument("--teacher-temp", default=0.04, type=float, help="teacher temperature after the warmup")
    g.add_argument("--warmup-teacher-temp", default=0.04, type=float, help="teacher temperature at the start")
    g.add_argument("--warmup-teacher-temp-epochs", default=0, type=int,
                   help="epochs of the teacher temperature's linear warmup (DINO: 30 with --teacher-temp 0.07)")
    g.add_argument("--center-momentum", default=0.9, type=float, help="EMA momentum of the teacher output's centre")
    g.add_argument("--freeze-last-layer", default=1, type=int,
                   help="epochs during which the head's last layer is not updated")
    o = parser.add_argument_group("dino optimisation")
    o.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="default: adamw for ViTs, sgd for other families (biases and norms never decayed)")
    o.add_argument("--lars-eta", default=0.001, type=float, help="LARS trust coefficient")
    o.add_argument("--weight-decay-end", default=None, type=float,
                   help="weight decay at the end (default: DINO's, 0.4 with AdamW, 1e-4 with SGD/LARS)")
    o.add_argument("--min-lr", default=1e-6, type=float, help="lr at the end of the cosine, absolute")
    o.add_argument("--clip-grad", default=3.0, type=float,
                   help="clip every parameter's gradient to this l2 norm, each on its own (0: off)")
    c = parser.add_argument_group("multi-crop")
    c.add_argument("--global-crops-scale", default=None, type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area fractions of the two global crops (default: DINO's, 0.4 1 for ViTs, 0.14 1 else)")
    c.add_argument("--local-crops-number", default=8, type=int, help="local crops per image (0: two global only)")
    c.add_argument("--local-crops-scale", default=None, type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area fractions of the local crops (default: DINO's, 0.05 0.4 for ViTs, 0.05 0.14 else)")
    c.add_argument("--local-crop-size", default=None, type=int,
                   help="local crop side in px (default: 3/7 of --crop-size on a multiple of 8: 96 for 224)")
    add_view_args(parser)
    add_pretrain_args(parser)
    add_recipe_args(parser, "DINO for 1k-20k images (epochs for 100,000 images seen, batch 64, warmup a tenth of "
                            "the epochs, --out-dim 4096, 2 local crops, teacher momentum 0.99; at <= "
                            f"{SMALL_CROP_MAX} px global crops of 0.3-1 and local ones of 0.05-0.3): "
                            "bench/quality.py's small-data DINO, one seed, untuned", trial=False)
    return parser


def small_data_recipe(data: DataProfile, crop_size: int, args: argparse.Namespace) -> Dict[str, object]:
    """`--recipe small`: bench/quality.py's small-data DINO (docs/dino.md). DINO's optimizer
    values per family stay (fill_recipe_defaults: SGD lr 0.03 x B/256 for ResNets). A smaller
    head (4,096 prototypes, not 65,536) and 2 local crops keep a CPU step cheap; teacher
    momentum 0.99 (MoCo's small-data key momentum): at 0.996 a run of a few hundred steps
    leaves the evaluated teacher ~40 % random init. Small crops share the global crops'
    smallest area with the local crops' largest, as both of DINO's recipes do."""
    epochs = chosen(args, "epochs", epochs_for_budget(data.images, SMALL_DATA_BUDGET["dino"]))
    values: Dict[str, object] = dict(epochs=epochs, warmup_epochs=min(10.0, epochs / 10),
                                     batch_size=SMALL_DATA_BATCH, out_dim=4096, local_crops_number=2,
                                     momentum_teacher=0.99)
    if crop_size <= SMALL_CROP_MAX:
        values.update(global_crops_scale=[0.3, 1.0], local_crops_scale=[0.05, 0.3])
    return values


def fill_recipe_defaults(args: argparse.Namespace, values: Dict[str, object], what: str) -> None:
    """Each of `values` where neither the command line nor `--recipe small` set it; what was
    chosen is printed."""
    chosen = []
    for dest, value in values.items():
        if getattr(args, dest) is None:
            setattr(args, dest, list(value) if isinstance(value, tuple) else value)  # (a list, as nargs=2 parses)
            shown = " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"
            chosen.append(f"--{dest.replace('_', '-')} {shown}")
    if chosen:
        log(f"=> DINO's defaults for {what}: {' '.join(chosen)}")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    # --optimizer by family, then --lr, --wd, --weight-decay-end by optimizer; the crop scales by family
    # after the recipe, which sets its own for small crops (so the log never shows values it then replaces)
    family = "vit" if args.arch.startswith("vit_") else "other"
    args.optimizer = args.optimizer or ("adamw" if family == "vit" else "sgd")
    fill_recipe_defaults(args, RECIPES[args.optimizer], args.optimizer)
    finalize_pretrain_args(args, "dino", model_flags=("--out-dim", "--use-bn-in-head", "--norm-last-layer",
                                                       "--local-crops-number", "--optimizer"),
                           recipe=small_data_recipe)
    fill_recipe_defaults(args, CROPS[family], f"-a {args.arch}")
    finalize_view_args(args)
    args.local_crop_size = args.local_crop_size or local_crop_size(args.crop_size)
    for flag in ("crop_min", "crop_max"):
        if given(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is not DINO's: its crops' areas are --global-crops-scale "
                            f"and --local-crops-scale")
    for flag in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(args, flag)
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--{flag.replace('_', '-')} {lo:g} {hi:g}: two area fractions, 0 < MIN <= MAX <= 1")
    if args.local_crops_number < 0 or args.out_dim < 1 or args.freeze_last_layer < 0:
        raise UserError("--local-crops-number and --freeze-last-layer must be 0 or more, --out-dim 1 or more")
    if min(args.teacher_temp, args.warmup_teacher_temp) <= 0:
        raise UserError("--teacher-temp and --warmup-teacher-temp must be positive; DINO uses 0.04 to 0.07")
    if not 0 <= args.momentum_teacher <= 1 or not 0 <= args.center_momentum <= 1:
        raise UserError("--momentum-teacher and --center-momentum are momenta in [0, 1]; DINO: 0.996 and 0.9")
    if args.gpu_decode:
        raise UserError("--gpu-decode decodes two views per image, DINO takes 2 + --local-crops-number; drop it "
                        "(--gpu-augment keeps the colour and blur ops on the device)")
    return args


def view_recipe(args: argparse.Namespace):
    """The crops: [global 1, global 2] + --local-crops-number x [local] (dino/augment.py)."""
    return dino_views(args.crop_size, args.local_crop_size or local_crop_size(args.crop_size),
                      args.local_crops_number, tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                      blur=args.crop_size > SMALL_CROP_MAX, strength=args.color_strength, gray_images=args.gray_images)


def global_pair(args: argparse.Namespace):
    """The two global crops' recipes: what the view check (and --view-check-only) compares."""
    return tuple(view_recipe(args)[:2])


def build_dino_optimizer(model: torch.nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """DINO's parameter groups (weights decayed on the scheduled wd; biases and norms, every
    tensor of <= 1 dimension, never), the teacher and the fixed weight norms left out; the
    decayed group carries `wd_schedule`."""
    groups = split_decay_groups(model)
    groups[0]["wd_schedule"] = True
    if args.optimizer == "lars":
        return LARS(groups, lr, momentum=args.momentum, weight_decay=args.weight_decay, eta=args.lars_eta)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr, weight_decay=args.weight_decay)


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: 2 global + n local crops of every image, labels unused
    crops = view_recipe(args)
    for name, recipe in zip(("global crop 1", "global crop 2", f"{args.local_crops_number} local crops"), crops):
        log(f"=> {name}: {recipe.describe()}")
    data = multi_view_data(args, env, crops, batch_size, workers)

    # ---- model: student and teacher (backbone + DINO head), the loss with its centre
    model = DINO(functools.partial(build_backbone, args.arch, small_images=args.small_images,
                                   in_channels=args.in_channels, crop_size=args.crop_size),
                 args.out_dim, args.local_crops_number, use_bn_in_head=args.use_bn_in_head,
                 norm_last_layer=args.norm_last_layer, warmup_teacher_temp=args.warmup_teacher_temp,
                 teacher_temp=args.teacher_temp, warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
                 epochs=args.epochs, center_momentum=args.center_momentum)
    init_backbone(args, model.student.backbone, model.teacher.backbone)  # --init: both start from it
    if env.distributed and env.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # DINO's ResNets: SyncBN
    model = place_model(model, env, args, networks=model.networks())
    dino = model.module if env.distributed else model

    lr = scaled_lr(args.lr, args.batch_size, "linear")
    optimizer = build_dino_optimizer(model, args, lr)
    scaler = Precision.from_args(args).scaler(env.device)
    log(f"=> {args.optimizer} lr {lr:.4g} (--lr {args.lr} x batch {args.batch_size}/256) to --min-lr {args.min_lr}, "
        f"wd {args.weight_decay} to {args.weight_decay_end}, teacher temp {args.warmup_teacher_temp} to "
        f"{args.teacher_temp}")

    # ---- resume (--resume PATH|auto): model (centre included), optimizer, scaler and RNG; every checkpoint
    # also holds `student` and `teacher` in facebookresearch/dino's layout
    checkpoints = Checkpoints(model, optimizer, scaler, args, "dino",
                              keys=lambda: checkpoint_layout(dino, env.distributed, args.arch.startswith("vit_")))
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor and payoff probe on the teacher's backbone, stop
    lr_fn = functools.partial(schedule.lr_at, base_lr=lr, min_lr=args.min_lr, epochs=args.epochs,
                              warmup_epochs=args.warmup_epochs)
    # the collapse watch (common/watch/entropy.py): warnings, not_learning, --stop-if-not-learning
    watch = EntropyWatch(args.out_dim, "--center-momentum below 1 (DINO: 0.9) and --teacher-temp 0.04 to 0.07")
    run = PretrainRun(args, env, data, lr_fn, (start_epoch, start_iter), checkpoints, learning=watch)

    def per_step(at: float) -> None:  # before the step, beside its lr: DINO's per-iteration schedules
        dino.epoch = int(at)  # the teacher temperature's
        dino.m = cosine_momentum(args.momentum_teacher, at, args.epochs)  # used after this step
        wd = schedule.weight_decay_at(at, args.weight_decay, args.weight_decay_end, args.epochs)
        for group in optimizer.param_groups:
            if group.get("wd_schedule"):
                group["weight_decay"] = wd

    def after_backward() -> None:  # DINO's order: clip, then drop the frozen last layer's gradient
        if args.clip_grad:
            scaler.unscale_(optimizer)
            schedule.clip_gradients(dino.student.parameters(), args.clip_grad)
        schedule.cancel_last_layer(dino.student.head, dino.epoch, args.freeze_last_layer)

    run.check_views(global_pair(args))  # do the two global crops of an image still look alike?
    run.before_training(dino.teacher.backbone)  # the untrained network's kNN and payoff probe

    # ---- epochs: train (the step loop: common/train/step.py; the teacher's EMA after each step), then kNN
    # monitor, metrics line, checkpoint, stop
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run, per_step=per_step,
                                 after_backward=after_backward, after_step=dino.update_teacher)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        record = run.end_epoch(epoch, result, backbone=dino.teacher.backbone)  # kNN, payoff, metrics line
        last = checkpoints.save_epoch(epoch, record, **run.checkpoint_keys())  # + retention
        run.stop_if_asked(epoch)  # --stop-at-epoch
    if args.export_at_end and last:  # main process, once the last epoch's checkpoint is written
        export_at_end(*last, args.output_dir)  # the teacher's backbone, as export_backbone.py writes it


# --view-check-only: the view check of the two global crops alone, then exit (common/watch/view_check.py)
main = script_main(get_args_parser, finalize_args, main_worker, instead=functools.partial(view_check_only, global_pair))


if __name__ == "__main__":
    main()
