#!/usr/bin/env python
"""MoCo v1/v2 pretraining.

    python main_moco.py --dataset synthetic -a resnet18 --epochs 5 -b 64 --moco-k 4096 --mlp --aug-plus --cos
    python main_moco.py /data/imagenet -a resnet50 --lr 0.03 -b 256 --mlp --aug-plus --cos --multiprocessing-distributed
"""
import argparse
import functools
import os
import random

import numpy as np
import torch
import torch.nn as nn

from common import augment
from common.checkpoint import check_arch, load_checkpoint, resolve_resume, restore_training_state, \
    save_checkpoint, training_state
from common.cli import add_training_args
from common.data import TransformedDataset, build_dataset, default_crop_size
from common.dist import DistEnv, cleanup, expected_world_size, is_main_process, launch, per_worker, setup_distributed
from common.engine import make_loader, make_scaler, train_one_epoch
from common.errors import UserError, report_user_errors
from common.knn import KnnMonitor
from common.logging import MetricsLog, log
from common.models import build_backbone
from common.preempt import PreemptionHandler, add_preemption_args
from common.schedule import lr_at
from moco.builder import MoCo, SplitBatchNorm


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MoCo pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_args(parser, lr=0.03, epochs=200, batch_size=256, schedule=(120, 160), weight_decay=1e-4, name="moco")
    g = parser.add_argument_group("moco")
    g.add_argument("--moco-dim", default=128, type=int, help="feature dimension")
    g.add_argument("--moco-k", default=65536, type=int, help="queue size; number of negative keys")
    g.add_argument("--moco-m", default=0.999, type=float, help="momentum of the key encoder")
    g.add_argument("--moco-t", default=0.07, type=float, help="softmax temperature")
    g.add_argument("--mlp", action="store_true", help="MLP projection head (MoCo v2)")
    g.add_argument("--aug-plus", action="store_true", help="MoCo v2 augmentation (colour jitter 0.8, blur)")
    g.add_argument("--symmetric", action="store_true", help="symmetric loss: both views as query and key")
    g.add_argument("--bn-splits", default=8, type=int,
                   help="BN groups that simulate multi-GPU shuffle-BN in a single-process run")
    g.add_argument("--knn-every", default=0, type=int,
                   help="kNN accuracy of the backbone on the labelled train/val split every N epochs (0: off)")
    add_preemption_args(parser)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    args.output_dir = args.output_dir or os.path.join("runs", "moco")
    if args.seed is None:
        args.seed = random.randrange(2 ** 31)  # stored in the checkpoint so resume replays it
    args.crop_size = args.crop_size or default_crop_size(args)
    if args.small_images is None:
        args.small_images = args.crop_size <= 64
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    if args.moco_k % keys_per_step != 0:
        raise UserError(f"--moco-k {args.moco_k} is not a multiple of the {keys_per_step} keys enqueued per step "
                        f"(global batch{' x2 with --symmetric' if args.symmetric else ''}); "
                        f"use e.g. --moco-k {max(1, args.moco_k // keys_per_step) * keys_per_step}")
    per_worker(args.batch_size, expected_world_size(args))
    return args


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env = setup_distributed(local_rank, args)
    torch.manual_seed(args.seed + env.rank)
    np.random.seed(args.seed + env.rank)
    random.seed(args.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch_size = per_worker(args.batch_size, env.world_size)
    # -j is per node (as in facebookresearch/moco): split it over this node's processes
    workers = (args.workers + env.local_world_size - 1) // env.local_world_size

    # ---- data: two augmented views of every image, labels unused
    aug = augment.moco_v2(args.crop_size, blur=args.crop_size > 64) if args.aug_plus else augment.moco_v1(args.crop_size)
    dataset = TransformedDataset(build_dataset(args, "pretrain"), augment.TwoCropsTransform(aug), args.strict_data)
    loader, sampler = make_loader(dataset, batch_size, env, workers, args.seed)
    iters_per_epoch = len(dataset) // env.world_size // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size}; "
                        f"lower --batch-size or add images")
    log(f"=> {len(dataset)} images, {iters_per_epoch} iterations/epoch, {env.world_size} process(es), "
        f"batch {batch_size}/process on {env.device}")

    # ---- model
    norm_layer = None
    if not env.distributed and args.bn_splits > 1:
        if batch_size % args.bn_splits != 0:
            raise UserError(f"--batch-size {batch_size} is not divisible by --bn-splits {args.bn_splits}; "
                            f"change one of them")
        norm_layer = functools.partial(SplitBatchNorm, num_splits=args.bn_splits)
    model = MoCo(functools.partial(build_backbone, args.arch, small_images=args.small_images, norm_layer=norm_layer),
                 args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, args.symmetric)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    moco = model.module if env.distributed else model

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=env.device.type == "cuda")
    scaler = make_scaler(args, env.device)

    # ---- resume
    start_epoch, start_iter = 0, 0
    resume_path = resolve_resume(args.resume, args.output_dir)
    if resume_path:
        ckpt = load_checkpoint(resume_path, expected_method="moco")
        check_arch(ckpt, args.arch, resume_path)
        start_epoch, start_iter = restore_training_state(ckpt, model, optimizer, scaler)
        log(f"=> resumed from {resume_path} at epoch {start_epoch}" + (f", iteration {start_iter}" if start_iter else ""))

    metrics = MetricsLog(args.output_dir)
    knn = KnnMonitor(args, env) if args.knn_every else None
    lr_fn = functools.partial(lr_at, base_lr=args.lr, epochs=args.epochs, schedule=args.schedule,
                              cos=args.cos, warmup_epochs=args.warmup_epochs)

    # SIGUSR1/SIGTERM (SLURM preemption) -> mid-epoch checkpoint, requeue; --save-every-iters
    preemption = PreemptionHandler(model, optimizer, scaler, args, env, method="moco", iters_per_epoch=iters_per_epoch)

    # ---- epochs
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter * batch_size)
        stats, _ = train_one_epoch(model, loader, optimizer, scaler, epoch, iters_per_epoch, start_iter,
                                   lr_fn, args, env, after_step=preemption.after_step(epoch))
        start_iter = 0
        stats["skipped_images"] = int(dataset.skipped.item())
        if knn is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            stats.update(knn.evaluate(moco.encoder_q))
        record = {"epoch": epoch, "lr": lr_fn(epoch + 1 - 1e-9), **stats}
        log(f"=> epoch {epoch} done: " + "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        metrics.write(record)
        if is_main_process():
            save_checkpoint(training_state(model, optimizer, scaler, args, method="moco", epoch=epoch + 1, metrics=record),
                            args.output_dir, epoch_file=(epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs)
    cleanup()


@report_user_errors
def main(argv=None) -> None:
    args = finalize_args(get_args_parser().parse_args(argv))
    launch(main_worker, args)


if __name__ == "__main__":
    main()
