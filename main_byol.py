#!/usr/bin/env python
"""BYOL (Grill et al., 2020) and, with --simsiam, SimSiam (Chen and He, 2021) pretraining.

    python main_byol.py --dataset synthetic -a resnet18 --no-small-images --epochs 5 -b 64
    python main_byol.py --dataset synthetic -a resnet18 --no-small-images --epochs 5 -b 64 --simsiam
    python main_byol.py /data/imagenet -a resnet50 -b 4096 --epochs 300 --multiprocessing-distributed
    python main_byol.py /data/imagenet -a resnet50 -b 512 --simsiam --multiprocessing-distributed

Defaults follow the papers where the repo's optimizers allow: BYOL LARS lr 0.2 x batch/256,
weight decay 1.5e-6, 10 warmup epochs then cosine, target momentum 0.996 rising to 1 by a
cosine over the steps, projector and predictor 4096 / 256; SimSiam (facebookresearch/simsiam)
SGD lr 0.05 x batch/256, weight decay 1e-4, momentum 0.9, cosine without warmup, the
predictor's lr kept fixed (--fix-pred-lr), projector 2048, predictor bottleneck 512. Both
default to 100 epochs and a batch of 512 (SimSiam's; BYOL's paper trains 300-1000 epochs at
4096). The views are BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0.2 on the second;
common/augment/asymmetric.py), SimSiam's MoCo v2 aug-plus for both (crop 0.08 as BYOL). Checkpoints use facebookresearch/simsiam's keys (`module.encoder.*`,
`module.predictor.*`) and, for BYOL, `module.target_encoder.*`. No negatives, so the
collapse watch is the std and the effective rank of the l2-normalised output
(common/watch/collapse.py StdWatch, docs/byol.md).
"""
import argparse
import functools
from typing import Dict

import torch.nn as nn

from byol.builder import BYOL
from common.augment import transforms as augment
from common.augment.asymmetric import byol_views
from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.cli import (ArgumentParser, add_pretrain_args, add_recipe_args, add_training_args, add_view_args,
                        given, switch)
from common.data.datasets import SMALL_CROP_MAX
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.errors import UserError
from common.log.progress import log
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import two_view_data
from common.train.optim import OPTIMIZERS, build_optimizer, scaled_lr, split_decay_groups
from common.train.recipes import SMALL_DATA_BATCH, SMALL_DATA_BUDGET, DataProfile, chosen, epochs_for_budget, shown
from common.train.run import PretrainRun, lr_schedule
from common.train.schedule import cosine_momentum
from common.train.pretrain_args import finalize_pretrain_args, finalize_view_args
from common.train.step import train_one_epoch
from common.watch.collapse import StdWatch
from common.watch.view_check import view_check_only
from export.backbone import export_at_end
from moco.augment import moco_v2

# each paper's values for the flags left at None (a flag given always wins)
PAPER = {"byol": dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10.0, proj_dim=256,
                      proj_hidden_dim=4096, pred_hidden_dim=4096, fix_pred_lr=False),
         "simsiam": dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, warmup_epochs=0.0, proj_dim=2048,
                         proj_hidden_dim=None, pred_hidden_dim=512, fix_pred_lr=True)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="BYOL and SimSiam pretraining")
    add_training_args(parser, lr=0.2, epochs=100, batch_size=512, schedule=(), weight_decay=1.5e-6, name="byol",
                      helps={"lr": "base learning rate: the lr used is this x batch/256 (default: BYOL's 0.2, "
                                   "SimSiam's 0.05)",
                             "weight_decay": "weight decay (default: BYOL's 1.5e-6, SimSiam's 1e-4)"})
    # None: the paper's value for BYOL or SimSiam (finalize_args); both: cosine after the warmup
    parser.set_defaults(cos=True, warmup_epochs=None, lr=None, weight_decay=None)
    g = parser.add_argument_group("byol / simsiam")
    switch(g, "--simsiam", help="SimSiam: the target is the online network behind a stop-gradient (no momentum "
                                "copy), SimSiam's projector, predictor and SGD recipe")
    g.add_argument("--proj-dim", default=None, type=int,
                   help="output width of projector and predictor (default: BYOL 256, SimSiam 2048)")
    g.add_argument("--proj-hidden-dim", default=None, type=int,
                   help="hidden width of the projection head (default: BYOL 4096, SimSiam the backbone's feature "
                        "width)")
    g.add_argument("--pred-hidden-dim", default=None, type=int,
                   help="hidden width of the predictor (default: BYOL 4096, SimSiam's bottleneck 512)")
    g.add_argument("--byol-m", default=0.996, type=float,
                   help="BYOL: the target network's momentum tau at the start, raised to 1 by a half cosine over "
                        "the run, every step")
    g.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="default: lars for BYOL (BN and biases excluded from weight decay and trust ratio), sgd "
                        "for SimSiam")
    g.add_argument("--lars-eta", default=0.001, type=float, help="LARS trust coefficient")
    switch(g, "--fix-pred-lr", default=None,
           help="keep the predictor's lr at the base lr, out of the schedule (facebookresearch/simsiam's "
                "--fix-pred-lr; default: on with --simsiam, off for BYOL)")
    switch(g, "--stop-grad", default=True,
           help="no gradient through the target branch; --no-stop-grad is both papers' ablation whose output "
                "collapses: the targets are the online projections with their gradient, no momentum copy (for "
                "checking the collapse watch)")
    add_view_args(parser)
    add_pretrain_args(parser)
    add_recipe_args(parser, "BYOL/SimSiam for 1k-20k images (epochs for 100,000 images seen, SGD at batch 64, "
                            f"warmup a tenth of the epochs; crop-min 0.3 at <= {SMALL_CROP_MAX} px): SimCLR's "
                            f"budget, not measured for these methods", trial=False)
    return parser


def method(args: argparse.Namespace) -> str:
    """The checkpoints' method name: a SimSiam checkpoint resumes only as SimSiam."""
    return "simsiam" if args.simsiam else "byol"


def small_data_recipe(data: DataProfile, crop_size: int, args: argparse.Namespace) -> Dict[str, object]:
    """`--recipe small`: SimCLR's small-data budget and batch, SGD (at batch 64 LARS' trust ratio
    barely moves the weights: main_simclr.py) at SimSiam's lr 0.05 x B/256 and wd 1e-4;
    the warmup a tenth of the epochs in use. Not measured for BYOL/SimSiam beyond docs/byol.md."""
    epochs = chosen(args, "epochs", epochs_for_budget(data.images, SMALL_DATA_BUDGET["byol"]))
    values: Dict[str, object] = dict(epochs=epochs, warmup_epochs=min(10.0, epochs / 10),
                                     batch_size=SMALL_DATA_BATCH, optimizer="sgd", lr=0.05, weight_decay=1e-4)
    if crop_size <= SMALL_CROP_MAX:
        values["crop_min"] = 0.3
    return values


def fill_paper_defaults(args: argparse.Namespace) -> None:
    """The flags left at None get the paper's value (BYOL's or SimSiam's); printed."""
    filled = [shown(dest, value) for dest, value in PAPER[method(args)].items()
              if getattr(args, dest) is None and value is not None]
    for dest, value in PAPER[method(args)].items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    log(f"=> {method(args)}'s defaults: {' '.join(filled) or 'none needed'}")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    fill_paper_defaults(args)
    finalize_pretrain_args(args, method(args), model_flags=("--proj-dim", "--proj-hidden-dim", "--pred-hidden-dim",
                                                            "--stop-grad"),
                           recipe=small_data_recipe, views=view_recipe)
    finalize_view_args(args)
    if args.crop_min is None:
        args.crop_min = 0.08  # BYOL's crop scale (SimSiam's code: 0.2)
    if not 0 <= args.byol_m <= 1:
        raise UserError(f"--byol-m {args.byol_m} is a momentum in [0, 1]; BYOL uses 0.996")
    if args.simsiam and given(args, "byol_m"):
        raise UserError("--byol-m sets BYOL's target momentum; SimSiam has no momentum copy: drop it or --simsiam")
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: the projector's BatchNorm needs 2 or more images "
                        f"(BYOL uses 4096, SimSiam 512)")
    return args


def view_recipe(args: argparse.Namespace) -> augment.Views:
    """The views: BYOL's asymmetric pair (view 1 always blurred, view 2 blurred 10 % and
    solarized 20 %), SimSiam's MoCo v2 aug-plus for both (facebookresearch/simsiam); blur only
    above SMALL_CROP_MAX px. --view-check-only and the run's view check take the same views
    (a pair: view 1 against view 2)."""
    kwargs = dict(blur=args.crop_size > SMALL_CROP_MAX, strength=args.color_strength, crop_min=args.crop_min,
                  gray_images=args.gray_images, crop_max=args.crop_max)
    return moco_v2(args.crop_size, **kwargs) if args.simsiam else byol_views(args.crop_size, **kwargs)


def build_byol_optimizer(byol: BYOL, args: argparse.Namespace, lr: float):
    """build_optimizer's optimizer for the online network; with --fix-pred-lr the predictor's
    groups carry `fix_lr` (the per-step hook puts their lr back to the base lr)."""
    if not args.fix_pred_lr:
        return build_optimizer(byol, args, lr)  # (the target's parameters need no gradient: left out)
    optimizer = build_optimizer(byol.encoder, args, lr)
    groups = split_decay_groups(byol.predictor) if args.optimizer == "lars" else [
        {"params": list(byol.predictor.parameters())}]
    for group in groups:
        optimizer.add_param_group({**group, "fix_lr": True})
    return optimizer


def collapse_hint(args: argparse.Namespace) -> str:
    """What the collapse warning tells the user to try (SimSiam has no target network, so
    --byol-m is not named for it)."""
    if not args.stop_grad:
        return "dropping --no-stop-grad"
    return "a lower --lr" if args.simsiam else "a lower --lr, or a --byol-m closer to 1"


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: two views of every image, labels unused
    aug = view_recipe(args)
    data = two_view_data(args, env, aug, batch_size, workers)

    # ---- model: online encoder + projector, predictor; BYOL: target encoder + projector
    model = BYOL(functools.partial(build_backbone, args.arch, small_images=args.small_images,
                                   in_channels=args.in_channels, crop_size=args.crop_size),
                 args.proj_dim, args.proj_hidden_dim, args.pred_hidden_dim, args.byol_m, args.simsiam, args.stop_grad)
    init_backbone(args, model.encoder, *((model.target_encoder,) if model.momentum_target else ()))  # --init
    if env.distributed and env.device.type == "cuda":
        # BYOL and SimSiam: BN statistics over the global batch (their references' SyncBN)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = place_model(model, env, args, networks=model.networks())
    byol = model.module if env.distributed else model

    lr = scaled_lr(args.lr, args.batch_size, "linear")
    optimizer = build_byol_optimizer(byol, args, lr)
    scaler = Precision.from_args(args).scaler(env.device)
    log(f"=> {method(args)}: {args.optimizer} lr {lr:.4g} (--lr {args.lr} x batch {args.batch_size}/256)"
        + (", predictor lr fixed" if args.fix_pred_lr else ""))

    # ---- resume (--resume PATH|auto): model, optimizer, scaler and RNG from the checkpoint; a mid-epoch
    # checkpoint continues its epoch at start_iter
    checkpoints = Checkpoints(model, optimizer, scaler, args, method(args))
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor, payoff probe, the collapse watch on the output's std
    # and, for SimSiam (its last BN hides a collapse from the std), its effective rank (no negatives: no
    # contrastive accuracy to judge), stop
    hint = collapse_hint(args)
    run = PretrainRun(args, env, data, lr_schedule(args, lr), (start_epoch, start_iter), checkpoints,
                      learning=StdWatch(args.proj_dim, hint, batch=batch_size, judge_rank=args.simsiam))

    def per_step(progress: float) -> None:  # after the step's lr is set (common/train/step.py)
        if byol.momentum_target:  # BYOL's tau, per step: 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
            byol.m = cosine_momentum(args.byol_m, progress, args.epochs)
        for group in optimizer.param_groups:
            if group.get("fix_lr"):
                group["lr"] = lr

    run.check_views(aug)  # do two views of an image still look alike? (a few seconds)
    run.before_training(byol.encoder)  # the untrained network's kNN and payoff probe, to compare with

    # ---- epochs: train (the step loop: common/train/step.py), then kNN monitor, metrics line, checkpoint, stop
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run, per_step=per_step)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        record = run.end_epoch(epoch, result, backbone=byol.encoder)  # kNN, payoff, watches, metrics line
        last = checkpoints.save_epoch(epoch, record, **run.checkpoint_keys())  # + retention
        run.stop_if_asked(epoch)  # --stop-at-epoch, --stop-if-not-learning
    if args.export_at_end and last:  # main process, once the last epoch's checkpoint is written
        export_at_end(*last, args.output_dir)  # its backbone, as export_backbone.py writes it


# --view-check-only: the view check of view_recipe alone, then exit (common/watch/view_check.py)
main = script_main(get_args_parser, finalize_args, main_worker, instead=functools.partial(view_check_only, view_recipe))


if __name__ == "__main__":
    main()
