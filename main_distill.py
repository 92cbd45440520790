#!/usr/bin/env python
"""Knowledge distillation of a frozen teacher into a small backbone, on your unlabelled images
(lightly-train's "distillation" method, its distillationv1).

    python main_distill.py --dataset synthetic -a resnet18 --teacher runs/simclr/checkpoint_last.pth.tar
    python main_distill.py DATA -a mobilenet_v3_small --teacher torchvision:resnet50 --recipe small
    python main_distill.py DATA -a resnet18 --teacher hub:/models/dinov2:dinov2_vits14 --amp

The student (-a) and its projection head to the teacher's width learn to match the teacher's
global feature of each view (distill/loss.py: SEED's cross-entropy over a queue of teacher
features by default, or cosine + a variance term; docs/distill.md has the measurement that
chose it). The teacher (distill/teacher.py: a checkpoint or export this project reads,
torchvision:NAME from the local hub cache, or hub:REPO_DIR:ENTRY) is frozen: eval mode, no
gradient, under --amp's autocast like the student, and not in the checkpoint (its --teacher
spec and feature width are, in args: a resume rebuilds it). With --in-channels N other than 3
the student reads N channels; an RGB teacher is fed the gray channel three times (N = 1) or
the --show-bands triple of them, a teacher trained on N channels all of them. The student's
checkpoint is read like a SimCLR one (`module.encoder.*`) by main_lincls.py, main_knn.py,
export_backbone.py and --init. Defaults: SGD lr 0.05 x batch/256, momentum 0.9, weight decay 1e-4, cosine, 100
epochs, batch 256, MoCo v2's views (crop 0.2) for both views.
"""
import argparse
import functools
from typing import Dict

import torch.nn as nn

from common.augment import transforms as augment
from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.cli import (ArgumentParser, add_pretrain_args, add_recipe_args, add_training_args, add_view_args,
                        switch)
from common.data.channels import channels_of
from common.data.datasets import SMALL_CROP_MAX
from common.data.display import check_bands
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.distributed.world import expected_world_size
from common.errors import UserError
from common.log.progress import log
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import two_view_data
from common.train.optim import OPTIMIZERS, build_optimizer, scaled_lr
from common.train.recipes import SMALL_DATA_BATCH, SMALL_DATA_BUDGET, DataProfile, chosen, epochs_for_budget
from common.train.run import PretrainRun, lr_schedule
from common.train.pretrain_args import finalize_pretrain_args, finalize_view_args
from common.train.step import train_one_epoch
from common.watch.view_check import view_check_only
from distill.builder import Distill, DistillLearningWatch
from distill.data import with_image_index
from distill.loss import LOSSES
from distill.teacher import load_teacher
from export.backbone import export_at_end
from moco.augment import moco_v2


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Distillation of a frozen teacher into a student backbone")
    add_training_args(parser, lr=0.05, epochs=100, batch_size=256, schedule=(), weight_decay=1e-4, name="distill",
                      helps={"lr": "base learning rate: the lr used is this x batch/256"})
    parser.set_defaults(cos=True)
    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, metavar="T",
                   help="the frozen teacher: a checkpoint or export_backbone.py export this project reads, "
                        "torchvision:NAME (its ImageNet weights from the local torch hub cache), or "
                        "hub:REPO_DIR:ENTRY (torch.hub.load(REPO_DIR, ENTRY, source='local'), e.g. DINOv2)")
    g.add_argument("--teacher-size", default=None, type=int,
                   help="the side the teacher sees, the student's views resized to it (default: the checkpoint's "
                        "crop, torchvision's weights' crop, 224 for hub:; a ViT-14 needs a multiple of 14)")
    switch(g, "--cache-teacher",
           help="the teacher's features of the un-augmented images (resize + centre crop), computed once and "
                "matched by every augmented view of the image: one teacher pass per run instead of per step")
    g.add_argument("--distill-loss", default="seed", choices=LOSSES,
                   help="seed: cross-entropy of the student's and teacher's similarities to a queue of teacher "
                        "features (SEED, lightly-train's distillationv1); cosine: 1 - cos + a variance term")
    g.add_argument("--queue-size", default=65536, type=int, help="seed: teacher features in the queue (SEED's 65536)")
    g.add_argument("--temperature", default=0.2, type=float, help="seed: the student's softmax temperature (SEED's)")
    g.add_argument("--teacher-temperature", default=0.05, type=float,
                   help="seed: the teacher's, sharper (its target distribution)")
    g.add_argument("--var-weight", default=1.0, type=float,
                   help="cosine: weight of the term asking each output dimension to vary as much as the teacher's")
    g.add_argument("--proj-hidden-dim", default=None, type=int,
                   help="hidden width of the student's projection head (default: the student's feature width)")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="sgd (momentum 0.9), lars or adam")
    g.add_argument("--lars-eta", default=0.001, type=float, help="LARS trust coefficient")
    add_view_args(parser)
    add_pretrain_args(parser)
    add_recipe_args(parser, "distillation for 1k-20k images (epochs for 100,000 images seen, batch 64, warmup a tenth "
                            f"of the epochs; crop-min 0.3 at <= {SMALL_CROP_MAX} px): SimCLR's budget", trial=False)
    return parser


def small_data_recipe(data: DataProfile, crop_size: int, args: argparse.Namespace) -> Dict[str, object]:
    """`--recipe small`: SimCLR's small-data budget and batch at this script's SGD rate (0.05 x
    B/256) and the warmup a tenth of the epochs in use."""
    epochs = chosen(args, "epochs", epochs_for_budget(data.images, SMALL_DATA_BUDGET["distill"]))
    values: Dict[str, object] = dict(epochs=epochs, warmup_epochs=min(10.0, epochs / 10), batch_size=SMALL_DATA_BATCH)
    if crop_size <= SMALL_CROP_MAX:
        values["crop_min"] = 0.3
    return values


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    if not args.teacher:
        raise UserError("--teacher is needed: a checkpoint, torchvision:NAME or hub:REPO_DIR:ENTRY (e.g. --teacher "
                        "runs/simclr/checkpoint_last.pth.tar)")
    finalize_pretrain_args(args, "distill", model_flags=("--teacher", "--teacher-size", "--distill-loss",
                                                         "--queue-size", "--proj-hidden-dim"),
                           recipe=small_data_recipe, views=view_recipe)
    finalize_view_args(args)
    if args.crop_min is None:
        args.crop_min = 0.2  # MoCo v2's
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: the projection head's BatchNorm needs 2 or more images")
    if args.temperature <= 0 or args.teacher_temperature <= 0:
        raise UserError(f"--temperature {args.temperature} and --teacher-temperature {args.teacher_temperature} must "
                        f"be positive; SEED uses 0.2 and 0.01 to 0.07")
    if args.queue_size < 0 or args.var_weight < 0:
        raise UserError(f"--queue-size {args.queue_size} and --var-weight {args.var_weight} cannot be negative")
    if args.teacher_size is not None and args.teacher_size < 8:
        raise UserError(f"--teacher-size {args.teacher_size} is too small; pass the side in pixels, e.g. 224")
    if channels_of(args).full_depth:
        check_bands(args.show_bands, args.in_channels)  # the teacher's triple: refused before any worker starts
    if args.cache_teacher and args.gpu_decode:
        raise UserError("--cache-teacher reads each image's index with its views, which --gpu-decode's loader does "
                        "not; drop one of them")
    return args


def view_recipe(args: argparse.Namespace) -> augment.Recipe:
    """The two views' augmentation; --view-check-only checks the same recipe without training."""
    return moco_v2(args.crop_size, blur=args.crop_size > SMALL_CROP_MAX, strength=args.color_strength,
                   crop_min=args.crop_min or 0.2, gray_images=args.gray_images, crop_max=args.crop_max)


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: two augmented views of every image (labels unused); --cache-teacher: with its index
    aug = view_recipe(args)
    data = two_view_data(args, env, aug, batch_size, workers)

    # ---- the frozen teacher (rebuilt from --teacher on resume: it is not in the checkpoint), the student
    # an RGB teacher of an --in-channels student is fed a band triple of its input (distill/teacher.py)
    teacher = load_teacher(args.teacher, args.teacher_size, args.in_channels, args.show_bands).to(env.device)
    args.teacher_dim = teacher.dim  # stored with the flags in every checkpoint
    if args.cache_teacher:
        data = with_image_index(data)
        teacher.cache(args, env.device, workers)
    model = Distill(functools.partial(build_backbone, args.arch, small_images=args.small_images,
                                      in_channels=args.in_channels, crop_size=args.crop_size),
                    teacher, args.proj_hidden_dim, args.distill_loss, args.queue_size, args.temperature,
                    args.teacher_temperature, args.var_weight)
    init_backbone(args, model.encoder)  # --init: the student starts from weights you have
    if env.distributed and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = place_model(model, env, args, networks=model.networks())
    distill = model.module if env.distributed else model

    lr = scaled_lr(args.lr, args.batch_size, "linear")
    optimizer = build_optimizer(model, args, lr)  # the student and its head: the teacher has no parameter here
    scaler = Precision.from_args(args).scaler(env.device)
    log(f"=> distillation ({args.distill_loss} loss) of {args.teacher} into {args.arch}: {args.optimizer} lr {lr:.4g} "
        f"(--lr {args.lr} x batch {args.batch_size}/256); the teacher sees "
        + ("the un-augmented images (cached once), the student augmented views of them" if args.cache_teacher else
           "the student's own augmented views"))

    # ---- resume (--resume PATH|auto): student, head, queue, optimizer, scaler and RNG from the checkpoint
    checkpoints = Checkpoints(model, optimizer, scaler, args, "distill")
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor, payoff probe, learning watch (does a student find its own
    # image's teacher feature among the batch's?), stop
    chance = 100.0 / (args.batch_size // expected_world_size(args))
    hint = (f"a lower --lr (now {args.lr:g}), weaker colour jitter (--color-strength {args.color_strength / 2:g}), or "
            f"a teacher whose features tell these images apart")
    run = PretrainRun(args, env, data, lr_schedule(args, lr), (start_epoch, start_iter), checkpoints,
                      learning=DistillLearningWatch(chance, args.epochs, hint, args.warmup_epochs))

    run.check_views(aug)  # do two views of an image still look alike? (a few seconds)
    run.before_training(distill.encoder)  # the untrained student's kNN and payoff probe, to compare with

    # ---- epochs: train (the step loop: common/train/step.py), then kNN monitor, metrics line, checkpoint, stop
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        record = run.end_epoch(epoch, result, backbone=distill.encoder)  # kNN, payoff, watches, metrics line
        last = checkpoints.save_epoch(epoch, record, **run.checkpoint_keys())  # + retention
        run.stop_if_asked(epoch)  # --stop-at-epoch, --stop-if-not-learning
    if args.export_at_end and last:  # main process, once the last epoch's checkpoint is written
        export_at_end(*last, args.output_dir)  # its backbone, as export_backbone.py writes it


# --view-check-only: the view check of view_recipe alone, then exit (common/watch/view_check.py)
main = script_main(get_args_parser, finalize_args, main_worker, instead=functools.partial(view_check_only, view_recipe))


if __name__ == "__main__":
    main()
