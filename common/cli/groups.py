"""The flag groups every script shares, each adder one named `--help` section (names and
defaults follow facebookresearch/moco): data, network, optimization, run, distributed;
add_training_args and add_eval_args put a training script's and an evaluation script's
together. The checks turn an impossible value into one sentence before any work starts."""
import argparse
import math
import os
from typing import Optional, Sequence

from common.ckpt.retention import check_retention_flags
from common.cli.parser import NO_HELPS, ArgumentAdder, Helps, switch
from common.data.channels import parse_in_channels
from common.data.display import parse_bands
from common.data.datasets import DATASETS, SMALL_CROP_MAX
from common.errors import UserError
from common.log.tensorboard import check_tensorboard_flag

DEFAULT_WORKERS = 8  # facebookresearch/moco's -j, where the machine has the cores for it
# -a of a script that loads a backbone: follow_checkpoint fills it from --pretrained
ARCH_HELP = "torchvision architecture (default: the --pretrained checkpoint's, else resnet50)"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a SLURM or container cpuset, not the
    machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "data" group: DIR, -j and --dataset with its options."""
    g = parser.add_argument_group("data")
    g.add_argument("data", metavar="DIR", nargs="?", default="",
                   help="path to dataset (not needed for --dataset synthetic)")
    g.add_argument("-j", "--workers", default=None, type=int, metavar="N",
                   help=f"data loading workers in total over this node's processes (default: the CPU cores this "
                        f"process may use, at most {DEFAULT_WORKERS})")
    g.add_argument("--dataset", default="imagefolder", choices=DATASETS,
                   help="where images come from (default: imagefolder, DATA/train + DATA/val "
                        "or a folder of class folders)")
    g.add_argument("--shuffle-buffer", default=1000, type=int, metavar="N",
                   help="--dataset shards: each rank mixes the samples it reads in a seeded buffer of N "
                        "(0: the shards' own order, the most sequential reads)")
    g.add_argument("--in-channels", default=None, type=parse_in_channels, metavar="N|auto",
                   help="channels the network sees: 3 reads 8-bit RGB (JPEG, PNG); 1 (grayscale) or the number of "
                        "bands reads images at full depth (16-bit PNG/TIFF, multi-band TIFF, .npy), normalised with "
                        "statistics measured on the training images; auto reads the first images (default: the "
                        "--pretrained checkpoint's, else 3)")
    g.add_argument("--channel-norm", default=None, choices=("set", "image"),
                   help="images read at full depth (--in-channels other than 3): set normalises each channel with the "
                        "mean and std measured on the training images; image standardises each image by its own, "
                        "for an offset or exposure that varies from image to image (default: the --pretrained "
                        "checkpoint's, else set)")
    # the measured statistics of --in-channels other than 3 (common/data/datasets.py resolve_channels)
    parser.set_defaults(channel_mean=None, channel_std=None)
    g.add_argument("--show-bands", default=None, type=parse_bands, metavar="R,G,B",
                   help="images of more than 3 channels: the three shown as red, green and blue in grids, thumbnails "
                        "and reports, counted from 0 (default: 0,1,2); one channel is shown as gray")
    switch(g, "--download", help="let torchvision download cifar10/cifar100/stl10/mnist/fashion-mnist into DATA")
    switch(g, "--strict-data", help="stop on an unreadable image instead of skipping it with a warning")
    g.add_argument("--synthetic-size", default=2000, type=int,
                   help="number of generated training images for --dataset synthetic (val: a quarter)")
    g.add_argument("--synthetic-classes", default=8, type=int,
                   help="number of classes (foreground hues) for --dataset synthetic (2 to 12)")
    g.add_argument("--synthetic-image-size", default=32, type=int,
                   help="side of generated images for --dataset synthetic")
    return g


def add_pretrained_arg(parser: ArgumentAdder, required: bool) -> None:
    parser.add_argument("--pretrained", required=required, default=None, type=str, metavar="PATH|none|imagenet",
                        help="pretraining checkpoint (ours: MoCo, SimCLR, lincls; or facebookresearch/moco's), "
                             "'none' for a random-init backbone, 'imagenet' for torchvision's cached weights")


def add_network_args(parser: argparse.ArgumentParser, helps: Helps = NO_HELPS, compile: bool = True,
                     pretrained: Optional[bool] = None) -> argparse._ArgumentGroup:
    """The "network" group: -a, --crop-size, --small-images, precision and (`compile`)
    torch.compile; `pretrained` True/False: a required/optional --pretrained, whose
    checkpoint then decides -a, the crop and the stem unless given (follow_checkpoint)."""
    g = parser.add_argument_group("network")
    follows = pretrained is not None
    if follows:
        add_pretrained_arg(g, required=pretrained)
    g.add_argument("-a", "--arch", metavar="ARCH", default=None if follows else "resnet50",
                   help=helps.get("arch", ARCH_HELP if follows else
                                  "torchvision classification model of any family: resnet50, convnext_tiny, "
                                  "efficientnet_b0, mobilenet_v3_small, swin_t, vit_b_16, ... or vit_tiny, "
                                  "convnext_micro (a small ViT, ConvNeXt for CPUs) (default: resnet50)"))
    g.add_argument("--crop-size", default=None, type=int,
                   help=helps.get("crop_size", "training crop size (default: 224; 32 for CIFAR/MNIST/synthetic, "
                                               "96 for STL-10)"))
    small = (f"CIFAR stem (3x3 conv1, no max-pool) (default: as the checkpoint was pretrained, else on for crops "
             f"<= {SMALL_CROP_MAX} px)" if follows else
             f"CIFAR stem (3x3 conv1, no max-pool); on by default for crops <= {SMALL_CROP_MAX} px")
    switch(g, "--small-images", default=None, help=helps.get("small_images", small))
    switch(g, "--amp", help=helps.get("amp", "mixed precision (bf16 autocast; fp16 + GradScaler with --amp-dtype "
                                             "fp16)"))
    g.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"), help="autocast dtype for --amp")
    switch(g, "--channels-last", help="NHWC memory format (faster convolutions on GPUs)")
    if compile:
        switch(g, "--compile", help="torch.compile the networks (PyTorch 2; the first steps are slow while it "
                                    "compiles)")
        g.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend for --compile (e.g. aot_eager to debug without a compiler)")
    return g


def add_batch_size_arg(parser: ArgumentAdder, batch_size: int, helps: Helps = NO_HELPS) -> None:
    parser.add_argument("-b", "--batch-size", default=batch_size, type=int, metavar="N",
                        help=helps.get("batch_size",
                                       f"global batch size over all processes and nodes (default: {batch_size})"))


def add_optimization_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int,
                          schedule: Sequence[int], weight_decay: float,
                          helps: Helps = NO_HELPS) -> argparse._ArgumentGroup:
    """The "optimization" group: --epochs, -b, --lr and its schedule, --momentum, --wd. A
    script whose --lr is multiplied by batch/256 says so in helps["lr"]; the default help
    says it is absolute."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", default=epochs, type=int, metavar="N", help="number of total epochs to run")
    add_batch_size_arg(g, batch_size, helps)
    g.add_argument("--lr", "--learning-rate", default=lr, type=float, metavar="LR", dest="lr",
                   help=helps.get("lr", f"initial learning rate, absolute: used as given whatever -b (default: "
                                        f"{lr})"))
    g.add_argument("--schedule", default=list(schedule), nargs="*", type=int,
                   help="epochs at which lr drops by 10x (ignored with --cos)")
    # SimCLR and MoCo v3 default it on (set_defaults): --no-cos is then how their step --schedule applies
    switch(g, "--cos", help="cosine lr schedule; --no-cos: the step --schedule")
    g.add_argument("--warmup-epochs", default=0.0, type=float, help="linear lr warmup epochs (default: 0)")
    g.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", default=weight_decay, type=float, metavar="W",
                   dest="weight_decay", help=helps.get("weight_decay", f"weight decay (default: {weight_decay})"))
    return g


def add_tensorboard_arg(parser: ArgumentAdder) -> None:
    switch(parser, "--tensorboard", help="also write TensorBoard event files to OUTPUT_DIR/tensorboard (needs the "
                                         "tensorboard package; metrics.jsonl is written either way)")


def add_run_args(parser: argparse.ArgumentParser, name: str, helps: Helps = NO_HELPS) -> argparse._ArgumentGroup:
    """The "run" group: --output-dir (default ./runs/NAME), --seed, -p and --tensorboard;
    add_training_args adds resume and the checkpoints' flags to it."""
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None, type=str,
                   help=helps.get("output_dir", f"folder for checkpoints and logs (default: ./runs/{name})"))
    g.add_argument("--seed", default=None, type=int,
                   help=helps.get("seed", "seed for initialisation, data order and augmentation"))
    g.add_argument("-p", "--print-freq", default=10, type=int, metavar="N",
                   help=helps.get("print_freq", "print every N iterations"))
    add_tensorboard_arg(g)
    return g


def add_checkpoint_args(g: ArgumentAdder, helps: Helps = NO_HELPS) -> None:
    """--resume, --overwrite, --save-freq, --keep-checkpoints and --keep-epochs."""
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="checkpoint to resume from, or 'auto' for the output folder's last one")
    switch(g, "--overwrite", help="start a new run in an --output-dir that already holds one, deleting its "
                                  "checkpoints and metrics (without it such a folder is refused unless you --resume)")
    g.add_argument("--save-freq", default=1, type=int,
                   help=helps.get("save_freq", "write checkpoint_NNNN.pth.tar every N epochs and at the end (0: "
                                               "never; checkpoint_last is always written)"))
    g.add_argument("--keep-checkpoints", default=5, type=int, metavar="N",
                   help="keep the N most recent checkpoint_NNNN.pth.tar (older ones are deleted as new ones "
                        "are written; checkpoint_last and --keep-epochs are always kept; 0 keeps every one)")
    g.add_argument("--keep-epochs", default=[], nargs="*", type=int, metavar="E",
                   help="also write and always keep checkpoint_E.pth.tar for these epochs (E epochs done, "
                        "e.g. --keep-epochs 100 200)")


def add_dist_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "distributed" group: facebookresearch/moco's flags, plus --nproc-per-node for CPU runs."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--world-size", default=1, type=int,
                   help="number of nodes (with --multiprocessing-distributed) or processes")
    g.add_argument("--rank", default=0, type=int, help="node rank for distributed training")
    g.add_argument("--dist-url", default="tcp://127.0.0.1:23456", type=str,
                   help="url used to set up distributed training")
    g.add_argument("--dist-backend", default=None, type=str,
                   help="distributed backend (default: nccl on GPU, gloo on CPU)")
    switch(g, "--multiprocessing-distributed",
           help="spawn one worker per GPU (or --nproc-per-node CPU workers) on this node")
    g.add_argument("--nproc-per-node", default=None, type=int,
                   help="workers per node for --multiprocessing-distributed "
                        "(default: number of GPUs, or 1 without GPUs)")
    g.add_argument("--gpu", default=None, type=int, help="GPU id to use for a single-process run")
    switch(g, "--cpu", help="run on the CPU even when a GPU is present")
    return g


def add_training_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int,
                      schedule: Sequence[int], weight_decay: float, name: str, helps: Helps = NO_HELPS,
                      pretrained: Optional[bool] = None) -> None:
    """Every shared flag of a training script, in the groups data, network, optimization, run
    and distributed; `helps` rewords some for this script (see Helps); `pretrained`: see
    add_network_args."""
    add_data_args(parser)
    add_network_args(parser, helps, pretrained=pretrained)
    add_optimization_args(parser, lr=lr, epochs=epochs, batch_size=batch_size, schedule=schedule,
                          weight_decay=weight_decay, helps=helps)
    add_checkpoint_args(add_run_args(parser, name, helps), helps)
    add_dist_args(parser)


def add_eval_args(parser: argparse.ArgumentParser, *, batch_size: int, name: str, helps: Helps = NO_HELPS) -> None:
    """The shared flags of a script that trains nothing (main_knn.py, main_curate.py):
    add_training_args' without the optimisation, checkpoint and compile ones, and a required
    --pretrained; checked by check_common_flags. The script's own groups come after these."""
    add_data_args(parser)
    add_network_args(parser, helps, compile=False, pretrained=True)
    add_batch_size_arg(add_run_args(parser, name, helps), batch_size, helps)
    add_dist_args(parser)


def check_common_flags(args: argparse.Namespace) -> None:
    """-b, --crop-size and -j, shared by every script (main_knn.py included)."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1; it is the global batch over all "
                        f"processes, e.g. 256")
    if args.crop_size is not None and args.crop_size < 1:
        raise UserError(f"--crop-size {args.crop_size} must be a positive number of pixels, e.g. 224 (32 for "
                        f"CIFAR-sized images)")
    cores = available_cores()
    if args.workers is None:  # more workers than cores only take turns (and torch warns once per loader)
        args.workers = min(DEFAULT_WORKERS, cores)
    elif args.workers < 0:
        raise UserError(f"-j/--workers {args.workers} must be 0 (load in the main process) or more")
    elif args.workers > cores:
        print(f"=> -j {args.workers} is more than the {cores} CPU cores this process may use: the loader workers "
              f"will take turns on them (torch's DataLoader warns the same)", flush=True)
    check_tensorboard_flag(args.tensorboard)


def check_training_flags(args: argparse.Namespace) -> None:
    """check_common_flags plus the optimisation flags of the training scripts."""
    check_common_flags(args)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr >= 0):
        raise UserError(f"--lr {args.lr} must be a finite number >= 0, e.g. 0.03")
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs} trains nothing; pass 1 or more")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--wd {args.weight_decay} must be a finite number >= 0, e.g. 1e-4")
    if not 0 <= args.momentum < 1:
        raise UserError(f"--momentum {args.momentum} must be in [0, 1), e.g. 0.9")
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs {args.warmup_epochs} must be 0 or more")
    if args.print_freq < 1:
        raise UserError(f"-p/--print-freq {args.print_freq} must be at least 1")
    if args.save_freq < 0:
        raise UserError(f"--save-freq {args.save_freq} is negative; pass N >= 1, or 0 for checkpoint_last only")
    check_retention_flags(args)
