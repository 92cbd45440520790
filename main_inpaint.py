#!/usr/bin/env python
"""Context-encoder (inpainting) pretraining (Pathak et al., 2016): random patches are blanked
out of each image and an encoder (a backbone of any family with a spatial feature map: ResNet,
ConvNeXt, EfficientNet, MobileNet, DenseNet, RegNet, Swin, ViT's patch grid, ...) + a
transposed-convolution decoder paints them back.
The encoder then initialises a classifier (main_lincls.py --pretrained) or a kNN
(main_knn.py), with no conversion.

    python main_inpaint.py --dataset synthetic -a resnet18 --epochs 5 -b 64
    python main_inpaint.py /data/natural_images -a resnet50 --crop-size 128 --patches 16 --patch-size 16 \\
        -b 128 --lr 1e-3 --epochs 100 --save-freq 10          # the Natural Images tutorial's recipe
    python main_inpaint.py /data/tiles -a resnet18 --in-channels auto   # 16-bit or multi-band images

RGB images are painted back as pixels in [0, 1] (--loss bce by default). With --in-channels other
than 3 the decoder paints back every channel of the image normalised with the run's measured
statistics (--loss mse by default; bce, which needs [0, 1], is refused) and the reconstruction
grids show the gray channel or the --show-bands triple (common/data/display.py).
"""
import argparse
import functools
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid, save_image

from common.augment.gpu import ViewsToDevice
from common.ckpt.checkpoints import Checkpoints
from common.ckpt.init_weights import init_backbone
from common.ckpt.resume import check_same_flags, resumed_args
from common.cli import ArgumentParser, add_pretrain_args, add_training_args, switch
from common.data.channels import channels_of
from common.data.display import check_bands, to_display
from common.distributed.collectives import is_main_process
from common.distributed.launch import script_main, start_worker
from common.distributed.placement import place_model
from common.errors import UserError
from common.log.progress import log
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import pretrain_data
from common.train.run import PretrainRun, lr_schedule
from common.train.pretrain_args import finalize_pretrain_args
from common.train.step import train_one_epoch
from export.backbone import export_at_end
from inpaint.masking import InpaintingPair
from inpaint.model import LOSSES, ContextEncoder, bce_refusal

GRID_IMAGES = 8  # images in the per-epoch reconstruction grid


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Context-encoder (inpainting) pretraining")
    add_training_args(parser, lr=1e-3, epochs=100, batch_size=128, schedule=(), weight_decay=0.0, name="inpaint")
    g = parser.add_argument_group("inpainting")
    g.add_argument("--patches", default=16, type=int, metavar="N", help="squares blanked out of each image")
    g.add_argument("--patch-size", default=16, type=int, metavar="S", help="side of each square in pixels")
    g.add_argument("--loss", default=None, choices=LOSSES,
                   help="reconstruction loss: RGB on the sigmoid output (default bce, the tutorial's); --in-channels "
                        "other than 3 on the normalised channels (default mse; bce needs [0, 1] pixels)")
    g.add_argument("--masked-weight", default=1.0, type=float, metavar="W",
                   help="weight of the blanked-out pixels in the loss, the others weigh 1 (Pathak et al. "
                        "weight the hole more; 1: uniform, as the tutorial)")
    switch(g, "--flip", default=True, help="random horizontal flip of the images (--no-flip: none)")
    add_pretrain_args(parser)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    # the blanked squares and the loss define the task a resumed run must go on with (--loss: below, once
    # its default is known, which depends on the channels finalize_pretrain_args resolves)
    finalize_pretrain_args(args, "inpaint", model_flags=("--patches", "--patch-size", "--masked-weight"))
    full_depth = channels_of(args).full_depth
    if args.loss is None:
        args.loss = "mse" if full_depth else "bce"
        if full_depth:
            log(f"=> --loss mse on the normalised channels (--in-channels {args.in_channels}: bce needs pixels in "
                f"[0, 1]; --loss l1 is the other choice)")
    resume_path, saved = resumed_args(args.resume, args.output_dir, "inpaint")
    if resume_path:
        check_same_flags(saved, args, ("--loss",), resume_path)
    if full_depth and args.loss == "bce":
        raise UserError(bce_refusal(args.in_channels))
    if full_depth:
        check_bands(args.show_bands, args.in_channels)  # the reconstruction grids' triple
    if args.patches < 1:
        raise UserError(f"--patches {args.patches} blanks nothing out, so there is nothing to paint back; "
                        f"use 1 or more (the tutorial uses 16)")
    if not 1 <= args.patch_size <= args.crop_size:
        raise UserError(f"--patch-size {args.patch_size} does not fit in the {args.crop_size} px crop; use a "
                        f"side between 1 and {args.crop_size} (e.g. --patch-size {max(1, args.crop_size // 8)})")
    if args.masked_weight <= 0:
        raise UserError(f"--masked-weight {args.masked_weight} must be positive (1: every pixel weighs the same)")
    return args


def shown(image: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor,
          bands: Optional[Sequence[int]]) -> torch.Tensor:
    """Full depth: N x C x H x W images, masked inputs and reconstructions (stored values) as
    3N x 3 x H x W RGB in [0, 1], gray or the --show-bands triple (to_display). The three of
    one image are stretched together, so they compare: a reconstruction is not brightened on
    its own."""
    rows = ([], [], [])
    for parts in zip(image.cpu(), masked.cpu(), recon.cpu()):
        side = parts[0].shape[-1]
        rgb = pil_to_tensor(to_display(torch.cat(parts, dim=2), bands)).float() / 255
        for row, part in zip(rows, rgb.split(side, dim=2)):
            row.append(part)
    return torch.stack(rows[0] + rows[1] + rows[2])


@torch.no_grad()
def reconstruction_grid(model: ContextEncoder, dataset, device: torch.device, path: str,
                        bands: Optional[Sequence[int]] = None) -> np.ndarray:
    """Rows of `GRID_IMAGES`: originals, masked inputs, reconstructions (the same images and
    patches every epoch), as a PNG; returns the grid as H x W x 3 uint8 (for TensorBoard).
    Full-depth images are shown as gray or their `bands` triple (--show-bands)."""
    samples = [dataset[(i, 10_007 + i)][0] for i in range(min(GRID_IMAGES, len(dataset)))]
    masked, image = (torch.stack([s[j] for s in samples]).to(device) for j in (0, 1))
    was_training = model.training
    model.eval()
    recon = model.painted(model.reconstruct(masked).float())
    model.train(was_training)
    tiles = shown(image, masked, recon, bands) if model.full_depth else torch.cat([image, masked, recon]).cpu()
    grid = make_grid(tiles, nrow=len(samples), padding=2, pad_value=1.0)
    save_image(grid, path)
    return grid.permute(1, 2, 0).mul(255).round().byte().numpy()


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args, preemptible=True)

    # ---- data: each image resized to crop x crop; the input has --patches squares blanked out
    # (drawn from the per-sample seed: new every epoch, the same after a resume)
    pair = InpaintingPair(args.crop_size, args.patches, args.patch_size, flip=args.flip, channels=channels_of(args))
    data = pretrain_data(args, env, pair, batch_size, workers, args.crop_size,
                         ViewsToDevice(env.device, args.channels_last))

    # ---- model: encoder up to its last feature map (common/nets/feature_maps.py) + decoder of
    # 2x transposed convolutions
    model = ContextEncoder(functools.partial(build_backbone, args.arch, small_images=args.small_images,
                                             in_channels=args.in_channels, crop_size=args.crop_size),
                           args.loss, args.masked_weight, channels_of(args))
    init_backbone(args, model.encoder)  # --init: continued pretraining from weights you have
    model = place_model(model, env, args, networks=model.networks())
    inpaint = model.module if env.distributed else model

    optimizer = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
    scaler = Precision.from_args(args).scaler(env.device)

    # ---- resume (--resume PATH|auto): model, optimizer, scaler and RNG from the checkpoint; a mid-epoch
    # checkpoint continues its epoch at start_iter
    checkpoints = Checkpoints(model, optimizer, scaler, args, "inpaint")
    start_epoch, start_iter = checkpoints.resume()

    # ---- the run's monitors: metrics log, kNN monitor, payoff probe, collapse and learning watches, stop
    run = PretrainRun(args, env, data, lr_schedule(args, args.lr), (start_epoch, start_iter), checkpoints)
    grids = os.path.join(args.output_dir, "reconstructions")
    if is_main_process():
        os.makedirs(grids, exist_ok=True)

    run.before_training(inpaint.encoder)  # the untrained network's kNN and payoff probe, to compare with

    # ---- epochs: train (the step loop: common/train/step.py), reconstruction grid, then kNN
    # monitor, metrics line, checkpoint
    last = None  # (state, path) of the last epoch's checkpoint, on the main process
    for epoch in range(start_epoch, args.epochs):
        result = train_one_epoch(model, data, optimizer, scaler, run.lr_fn, epoch, args, env, run)
        if result.stopped:  # SIGUSR1/SIGTERM (SLURM preemption): every rank stopped after this iteration
            checkpoints.save_mid_epoch(epoch, result.iterations)
            raise SystemExit(run.stop.requeue())  # scontrol requeue, exit 75
        if is_main_process():
            grid = reconstruction_grid(inpaint, data.dataset, env.device, os.path.join(grids, f"epoch_{epoch:04d}.png"),
                                       args.show_bands)
            run.metrics.tensorboard.image("reconstructions", grid, epoch)
        record = run.end_epoch(epoch, result, backbone=inpaint.encoder)  # kNN, payoff, watches, metrics line
        last = checkpoints.save_epoch(epoch, record, **run.checkpoint_keys())  # + retention
        run.stop_if_asked(epoch)  # --stop-at-epoch, --stop-if-not-learning
    if args.export_at_end and last:  # main process, once the last epoch's checkpoint is written
        export_at_end(*last, args.output_dir)  # its backbone, as export_backbone.py writes it


main = script_main(get_args_parser, finalize_args, main_worker)


if __name__ == "__main__":
    main()
