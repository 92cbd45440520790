"""Flags the scripts share, in groups (names and defaults follow facebookresearch/moco):
every flag of a training script, the subset of them a script that trains nothing takes, and
the checks that turn an impossible value into one sentence before any work starts."""
import argparse
import math
import os
import sys
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Protocol, Sequence, Tuple

from common.ckpt.retention import add_retention_args, check_retention_flags
from common.data.datasets import SMALL_CROP_MAX, add_data_args
from common.dist.world import add_dist_args
from common.errors import UserError
from common.log.tensorboard import check_tensorboard_flag


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each default shown once: argparse's value where the help text does not
    already say it, nothing for computed defaults (None: the help says how they are chosen)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' help format, which also records the flags the command
    line gave (`args.given_flags`, their dests): a preset such as --recipe small must keep
    a typed value even when it equals the default, and only argparse knows which were typed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, List[str]]:
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extras = super().parse_known_args(argv, namespace)
        # argparse fills a default only where the namespace lacks the attribute, so a
        # namespace pre-filled with a marker keeps the marker exactly for the flags not typed
        unset = object()
        dests = [d for d in vars(super().parse_known_args([])[0]) if d != "given_flags"]
        probe, _ = super().parse_known_args(argv, argparse.Namespace(**{d: unset for d in dests}))
        parsed.given_flags = sorted(d for d in dests if getattr(probe, d) is not unset)
        return parsed, extras


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the command line set `dest` (see ArgumentParser)."""
    return dest in args.given_flags


class ArgumentAdder(Protocol):
    """A parser or one of its argument groups: where a shared flag may be added."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


# Help texts a script words its own way, by dest (e.g. {"lr": "base learning rate: ..."}): the
# flag keeps its one definition here, and a script never edits argparse's actions
Helps = Mapping[str, str]
NO_HELPS: Helps = MappingProxyType({})


DEFAULT_WORKERS = 8  # facebookresearch/moco's -j, where the machine has the cores for it


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a SLURM or container cpuset, not the
    machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_input_args(parser: argparse.ArgumentParser, helps: Helps = NO_HELPS) -> None:
    """DIR, -a and -j."""
    parser.add_argument("data", metavar="DIR", nargs="?", default="",
                        help="path to dataset (not needed for --dataset synthetic)")
    parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet50",
                        help=helps.get("arch", "torchvision classification model of any family: resnet50, "
                                               "convnext_tiny, efficientnet_b0, mobilenet_v3_small, swin_t, vit_b_16, "
                                               "... or vit_tiny, convnext_micro (a small ViT, ConvNeXt for CPUs) (default: resnet50)"))
    parser.add_argument("-j", "--workers", default=None, type=int, metavar="N",
                        help=f"data loading workers in total over this node's processes (default: the CPU cores this "
                             f"process may use, at most {DEFAULT_WORKERS})")


def add_batch_size_arg(parser: argparse.ArgumentParser, batch_size: int, helps: Helps = NO_HELPS) -> None:
    parser.add_argument("-b", "--batch-size", default=batch_size, type=int, metavar="N",
                        help=helps.get("batch_size",
                                       f"global batch size over all processes and nodes (default: {batch_size})"))


def add_print_freq_arg(parser: argparse.ArgumentParser, helps: Helps = NO_HELPS) -> None:
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N",
                        help=helps.get("print_freq", "print every N iterations"))


def add_run_args(parser: argparse.ArgumentParser, name: str, helps: Helps = NO_HELPS) -> None:
    """--seed and --output-dir (default ./runs/NAME)."""
    parser.add_argument("--seed", default=None, type=int,
                        help=helps.get("seed", "seed for initialisation, data order and augmentation"))
    parser.add_argument("--output-dir", default=None, type=str,
                        help=helps.get("output_dir", f"folder for checkpoints and logs (default: ./runs/{name})"))


def add_image_args(parser: argparse.ArgumentParser, helps: Helps = NO_HELPS) -> None:
    """--crop-size and --small-images (the network's stem)."""
    parser.add_argument("--crop-size", default=None, type=int,
                        help=helps.get("crop_size", "training crop size (default: 224; 32 for CIFAR/MNIST/synthetic, "
                                                    "96 for STL-10)"))
    parser.add_argument("--small-images", default=None, action=argparse.BooleanOptionalAction,
                        help=helps.get("small_images",
                                       f"CIFAR stem (3x3 conv1, no max-pool); on by default for crops <= {SMALL_CROP_MAX} px"))


def add_precision_args(parser: argparse.ArgumentParser, helps: Helps = NO_HELPS) -> None:
    """--amp, --amp-dtype and --channels-last (common/nets/precision.py reads them)."""
    parser.add_argument("--amp", action="store_true",
                        help=helps.get("amp", "mixed precision (bf16 autocast; fp16 + GradScaler with --amp-dtype fp16)"))
    parser.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"), help="autocast dtype for --amp")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)")


def add_training_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int,
                      schedule: Sequence[int], weight_decay: float, name: str, helps: Helps = NO_HELPS) -> None:
    """Every flag of a training script; `helps` rewords some for this script (see Helps)."""
    add_input_args(parser, helps)
    parser.add_argument("--epochs", default=epochs, type=int, metavar="N", help="number of total epochs to run")
    add_batch_size_arg(parser, batch_size, helps)
    parser.add_argument("--lr", "--learning-rate", default=lr, type=float, metavar="LR", dest="lr",
                        help=helps.get("lr", f"initial learning rate (default: {lr})"))
    parser.add_argument("--schedule", default=list(schedule), nargs="*", type=int,
                        help="epochs at which lr drops by 10x (ignored with --cos)")
    # one on/off flag for every script: SimCLR and MoCo v3 default it on (set_defaults), and
    # --no-cos is then how their step --schedule applies
    parser.add_argument("--cos", default=False, action=argparse.BooleanOptionalAction,
                        help="cosine lr schedule; --no-cos: the step --schedule")
    parser.add_argument("--warmup-epochs", default=0.0, type=float, help="linear lr warmup epochs (default: 0)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    parser.add_argument("--wd", "--weight-decay", default=weight_decay, type=float, metavar="W",
                        dest="weight_decay", help=helps.get("weight_decay", f"weight decay (default: {weight_decay})"))
    add_print_freq_arg(parser, helps)
    parser.add_argument("--resume", default="", type=str, metavar="PATH",
                        help="checkpoint to resume from, or 'auto' for the output folder's last one")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output-dir that already holds one, deleting its checkpoints "
                             "and metrics (without it such a folder is refused unless you --resume)")
    add_run_args(parser, name, helps)
    add_image_args(parser, helps)
    add_precision_args(parser, helps)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks (PyTorch 2; the first steps are slow while it compiles)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for --compile (e.g. aot_eager to debug without a compiler)")
    add_tensorboard_arg(parser)
    parser.add_argument("--save-freq", default=1, type=int,
                        help=helps.get("save_freq", "write checkpoint_NNNN.pth.tar every N epochs and at the end (0: "
                                                    "never; checkpoint_last is always written)"))
    add_retention_args(parser)
    add_data_args(parser)
    add_dist_args(parser)


def add_eval_args(parser: argparse.ArgumentParser, *, batch_size: int, name: str, helps: Helps = NO_HELPS) -> None:
    """The flags of a script that trains nothing (main_knn.py): add_training_args' without
    the optimisation, resume and compile ones, checked by check_common_flags. The script
    adds the data and distributed groups (add_data_args, add_dist_args) after its own."""
    add_input_args(parser, helps)
    add_batch_size_arg(parser, batch_size, helps)
    add_print_freq_arg(parser, helps)
    add_run_args(parser, name, helps)
    add_image_args(parser, helps)
    add_precision_args(parser, helps)
    add_tensorboard_arg(parser)


def add_tensorboard_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files to OUTPUT_DIR/tensorboard (needs the tensorboard "
                             "package; metrics.jsonl is written either way)")


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
