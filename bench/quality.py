#!/usr/bin/env python
"""Representation quality on Fashion-MNIST: MoCo v2, SimCLR and (with --methods ... inpaint)
the context encoder (--methods also takes moco_v3, byol, simsiam and dino), pretrained on the
train images without labels, then a linear probe and kNN on the test set with 100 %, 10 % and
1 % of the train labels, against a random-init backbone and a ResNet trained from scratch
(main_lincls.py --finetune --pretrained none) on the same labels. Every training run is
the product's own script, called through its main(argv).

    python bench/quality.py ../shared/data/fashion-mnist --quick          # 2 CPU cores (docs/performance.md)
    python bench/quality.py ../shared/data/fashion-mnist --device cuda    # the full budget, for a GPU
    # the small-data table (docs/moco.md): 2k and 10k pools, each method's `--recipe small` budget
    # (MoCo 200k, SimCLR 100k images seen), 3 seeds; --reuse goes on after a stop
    python bench/quality.py ../shared/data/fashion-mnist --quick --pools 2000 10000 --seeds 0 1 2 \
        --pretrain-budget recipe --reuse
    # from scratch vs --init (continued pretraining from a checkpoint of other data), equal budget
    # (docs/moco-v3.md: the commands); MoCo v3 with a ResNet-18 or a tiny ViT: --methods moco_v3 -a vit_tiny

The linear probe is multinomial logistic regression (L-BFGS, fixed L2; lincls/logreg.py,
main_lincls.py --probe logreg) on the frozen backbone's standardised features of the
un-augmented images, the same for every backbone:
deterministic, cheap, and blind to the scale of the features (a random-init ResNet's
features are orders of magnitude larger than a pretrained one's, which makes one SGD lr
unfair to one of them). `--lincls-probe` also runs main_lincls.py's probe (SGD on augmented
images, the reference protocol; on by default in the full mode).

--quick pretrains on a 10k-image pool and probes on a class-balanced 2k/2k subset (written
as IDX files in torchvision's layout under OUTPUT/data*, so the scripts read them like the
real set), with small budgets; the full mode uses all 60k/10k images. Prints a table and
writes OUTPUT/quality.json.

--dataset folder reads a real labelled ImageFolder as it is (DATA/train, DATA/val): the
benchmarks ../shared/data/cahn-hilliard and ../shared/data/ising (64 px grayscale textures) are
run this way, with the README's command, as for the inspection set:

    python bench/quality.py ../shared/data/cahn-hilliard --dataset folder --quick --seeds 0 1 2 \
        --pretrain-budget recipe --methods simclr --no-supervised

`--methods distill --teacher CKPT` distils that teacher into `-a` on the pool (main_distill.py
`--recipe small`) and adds the teacher's own probes as a row, at its own architecture; every
backbone's feature-extraction images/s goes under the table (what it costs where it is used):

    python bench/quality.py ../shared/data/fashion-mnist --quick --pools 2000 --seeds 0 1 2 \
        --pretrain-budget 30000 --methods simclr distill --teacher runs/teacher/checkpoint_last.pth.tar \
        -a mobilenet_v3_small --no-supervised

Every table also has the hand-made baseline of ../shared/data/README.md: logistic regression on
four statistics of each image (grayscale mean, std, mean absolute gradient in x and y), which a
pretrained backbone has to beat to be worth its cost ("statistics" row).

--dataset inspection is the second benchmark, unlike Fashion-MNIST (tools/inspection_data.py:
grayscale 256 px PNGs sharing one grid structure, the class a small local defect, 2:1): DATA is
the folder the set is written to (once, seeded by --data-seed) and read from as an ImageFolder,
and every pretraining run is the README's command, `--recipe small` with nothing else chosen
for it (--pretrain-flags adds flags, for sweeps); each backbone is probed at the crop size its
run used (random init at the first run's).

    python bench/quality.py runs/inspection_data --dataset inspection --quick --seeds 0 1 2 \
        --pretrain-budget recipe --no-supervised
"""
import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Dict, List, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools.inspection_data import write_inspection_set  # noqa: E402
from bench.util import format_table, machine_info, mnist_subset, resolve_device, write_json  # noqa: E402
from common.augment import transforms as augment  # noqa: E402
from common.ckpt.pretrained import load_backbone, load_pretrained  # noqa: E402
from common.data.datasets import build_dataset, resolve_channels  # noqa: E402
from common.data.subsets import stratified_subset  # noqa: E402
from common.data.transformed import TransformedDataset  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402
from common.eval.features import extract_features  # noqa: E402
from common.eval.knn import fit_whitening, knn_accuracy, whiten  # noqa: E402
from common.nets.models import build_backbone, without_head  # noqa: E402
from common.train.recipes import SMALL_DATA_BUDGET, epochs_for_budget  # noqa: E402
from common.eval.logreg import PROBE_WD, logistic_regression_accuracy  # noqa: E402
from moco.small_data import fitted_queue  # noqa: E402

# main_knn.py --whiten: the principal axes the whitened kNN column keeps (docs/small-data.md, "kNN and
# the nuisance")
KNN_WHITEN = 64

# moco_k 0: fit the pool, the largest multiple of the batch up to a tenth of it (at most 4096;
# main_moco.py warns above a tenth: each image would meet its own older keys as negatives).
# budgets: --quick fits 2 CPU cores with the ImageNet stem at 32 px; full is the CIFAR-demo-sized
# recipe for one GPU. crop_min 0.3: the papers' 0.08/0.2 crops cut most of a 28 px silhouette
# away; moco_k 4096 needs a pool several times larger, or the queue holds stale keys of the
# query's own image as negatives; MoCo T 0.5 at the quick budget, where 0.2 (the long-schedule
# value) left its probes below random init's (docs/small-data.md: why these values)
PRESETS = {
    "quick": dict(pretrain_images=10000, train_images=2000, test_images=2000, pretrain_epochs=8, batch_size=64,
                  probe_epochs=5, sup_epochs=5, small_images=False, workers=0, moco_k=0, probe_lr=2.0,
                  crop_min=0.3, lincls_probe=False, moco_t=0.5),
    "full": dict(pretrain_images=0, train_images=0, test_images=0, pretrain_epochs=200, batch_size=256,
                 probe_epochs=100, sup_epochs=100, small_images=True, workers=8, moco_k=4096, probe_lr=30.0,
                 crop_min=0.3, lincls_probe=True, moco_t=0.2),
}


def budget_arg(text: str) -> Union[int, str]:
    """--pretrain-budget: a number of images or 'recipe'."""
    if text == "recipe":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of images nor 'recipe'")


# every method's pretraining script (pretrain_methods) and --recipe small budget's key in SMALL_DATA_BUDGET:
# SimSiam is main_byol.py --simsiam, whose recipe uses BYOL's budget; MoCo v3 has no --recipe small: MoCo's
METHODS = ("moco", "moco_v3", "simclr", "inpaint", "byol", "simsiam", "dino", "distill")
BUDGET_OF = {"simsiam": "byol", "moco_v3": "moco"}


def pretrain_epochs(args: argparse.Namespace, method: str, pool: int) -> int:
    """Epochs of `method` on a pool of `pool` images under --pretrain-budget."""
    if not args.pretrain_budget:
        return args.pretrain_epochs
    recipe_budget = SMALL_DATA_BUDGET[BUDGET_OF.get(method, method)]
    budget = recipe_budget if args.pretrain_budget == "recipe" else args.pretrain_budget
    return epochs_for_budget(pool, budget)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fashion-MNIST quality benchmark: SSL probes vs random init and supervised")
    p.add_argument("data", metavar="DIR", help="folder holding FashionMNIST/raw/ (e.g. ../shared/data/fashion-mnist)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist", "inspection", "folder"),
                   help="folder: DATA is a labelled ImageFolder (train/, val/), read as it is")
    p.add_argument("--statistics", default=True, action=argparse.BooleanOptionalAction,
                   help="the hand-made baseline row: the probes on four statistics of each image")
    p.add_argument("--data-seed", default=0, type=int,
                   help="--dataset inspection: the generated set's seed (a new seed, new images)")
    p.add_argument("--inspection-images", default=1700, type=int, help="--dataset inspection: images in all")
    p.add_argument("--inspection-size", default=256, type=int, help="--dataset inspection: image side in px")
    p.add_argument("--pretrain-flags", default="",
                   help="--dataset inspection: more flags for every pretraining run, in one string "
                        "(e.g. \"--crop-size 64 --color-strength 0.5\")")
    p.add_argument("--supervised", default=True, action=argparse.BooleanOptionalAction,
                   help="also train the network from scratch on the labels (the supervised row)")
    p.add_argument("--quick", action="store_true", help="small budget for 2 CPU cores (see PRESETS)")
    p.add_argument("--methods", nargs="+", default=["moco", "simclr"], choices=METHODS)
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="the frozen teacher of the distill method (main_distill.py --teacher), and a 'teacher' row: "
                        "its own probes at its own architecture and crop (inference images/s of every backbone "
                        "go to quality.json beside it)")
    p.add_argument("--init", default=None, metavar="imagenet|PATH",
                   help="every pretraining run starts from these weights (the scripts' --init): continued "
                        "pretraining, to compare with the same budget from scratch (without it)")
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1, 0.01],
                   help="label fractions for the probes and the supervised baseline")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="repeat everything (subsets, pretraining, probes) with each seed and report mean and spread "
                        "(default: --seed alone)")
    p.add_argument("--pools", nargs="+", type=int, default=None,
                   help="unlabelled pool sizes to pretrain on, one evaluation each (default: --pretrain-images)")
    p.add_argument("--pretrain-budget", type=budget_arg, default=0,
                   help="images seen in pretraining (epochs = budget / pool, at least 1), so every pool gets the "
                        "same compute; 'recipe': each method's --recipe small budget (common/train/recipes.py); "
                        "0: --pretrain-epochs for every pool and method")
    p.add_argument("--reuse", action="store_true",
                   help="keep the training runs OUTPUT_DIR already holds finished (a pretraining run's "
                        "checkpoint of the last epoch, a supervised run's results.json) and only probe them again: "
                        "an interrupted benchmark goes on, and seeds run separately merge into one table")
    p.add_argument("--output-dir", default="runs/bench_quality")
    p.add_argument("--json", default=None, help="result file (default: OUTPUT_DIR/quality.json)")
    # None: the preset's value
    for name, typ in (("pretrain_images", int), ("train_images", int), ("test_images", int),
                      ("pretrain_epochs", int), ("batch_size", int), ("probe_epochs", int), ("sup_epochs", int),
                      ("workers", int), ("moco_k", int), ("moco_t", float), ("probe_lr", float),
                      ("crop_min", float)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"(preset: quick {PRESETS['quick'][name]}, full {PRESETS['full'][name]}; 0 images = all)")
    p.add_argument("--lincls-probe", default=None, action=argparse.BooleanOptionalAction,
                   help="also run main_lincls.py's SGD probe on augmented images, --probe-epochs at --probe-lr "
                        "x batch/256 (preset: off for --quick, on for full)")
    p.add_argument("--small-images", default=None, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem (preset: off for --quick, it is ~10x slower on a CPU; on for full)")
    p.add_argument("--amp", action="store_true", help="pass --amp to every run (GPU)")
    p.add_argument("--channels-last", action="store_true", help="pass --channels-last to every run (GPU)")
    p.add_argument("--in-channels", default=None, metavar="N|auto",
                   help="pass --in-channels to every run and probe (e.g. 1: Fashion-MNIST as one gray channel, not "
                        "today's 3-channel copy)")
    return p


def finalize(args: argparse.Namespace) -> argparse.Namespace:
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.device = resolve_device(args.device)
    if any(not 0 < f <= 1 for f in args.fractions):
        raise UserError(f"--fractions must be in (0, 1], got {args.fractions}")
    if "distill" in args.methods and not args.teacher:
        raise UserError("--methods distill needs the teacher to distil: pass --teacher CKPT (a checkpoint this "
                        "project reads)")
    if args.teacher and not os.path.isfile(args.teacher):
        raise UserError(f"--teacher {args.teacher!r} is not a file; pass the teacher's checkpoint (its probes are "
                        f"the table's 'teacher' row)")
    args.json = args.json or os.path.join(args.output_dir, "quality.json")
    args.seeds = args.seeds or [args.seed]
    args.pools = args.pools or [args.pretrain_images]
    return args


FOLDERS = ("inspection", "folder")  # read as ImageFolders, pretrained with the README's command


def script_dataset(args: argparse.Namespace) -> str:
    """The scripts' --dataset: the generated inspection set and real folders are ImageFolders."""
    return "imagefolder" if args.dataset in FOLDERS else args.dataset


def image_statistics(dataset) -> Tuple[torch.Tensor, torch.Tensor]:
    """The hand-made baseline (../shared/data/README.md): per image, at its own resolution in
    grayscale 0-1, the mean, the std and the mean absolute gradient in x and in y (N x 4), and
    the labels (N,)."""
    rows, labels = [], []
    for i in range(len(dataset)):
        img, label = dataset[i]
        g = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
        rows.append([g.mean(), g.std(), (g[:, 1:] - g[:, :-1]).abs().mean(), (g[1:] - g[:-1]).abs().mean()])
        labels.append(label)
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(labels)


def inspection_root(args: argparse.Namespace) -> str:
    """DATA holding the generated inspection set (written on first use; a marker file says
    which seed and size wrote it, so another --data-seed never reads stale files)."""
    import json
    tag = {"images": args.inspection_images, "size": args.inspection_size, "seed": args.data_seed}
    root = os.path.join(args.data, f"inspection_{args.inspection_images}_{args.inspection_size}px_seed{args.data_seed}")
    marker = os.path.join(root, "written.json")
    if not os.path.isfile(marker):
        print(f"=> writing the inspection set to {root} ...", flush=True)
        write_inspection_set(root, args.inspection_images, args.inspection_size, args.data_seed)
        with open(marker, "w") as f:
            json.dump(tag, f)
    return root


def run_crop(ckpt_path: str, default: int) -> int:
    """The crop size a pretraining run used (its checkpoint's args), for probing it at that size."""
    if ckpt_path == "none" or not os.path.isfile(ckpt_path):
        return default
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["args"]["crop_size"])


def common_flags(args: argparse.Namespace, root: str) -> List[str]:
    flags = [root, "--dataset", script_dataset(args), "-a", args.arch, "-j", str(args.workers), "--seed", str(args.seed),
             "--small-images" if args.small_images else "--no-small-images"]
    if args.device == "cpu":
        flags.append("--cpu")
    if args.amp:
        flags.append("--amp")
    if args.channels_last:
        flags.append("--channels-last")
    if args.in_channels:
        flags += ["--in-channels", args.in_channels]
    return flags


def run_script(module, argv: List[str], log_path: str) -> float:
    """module.main(argv) in this process with its output in log_path; returns seconds.
    A failing run raises with the log's location (its last lines are the reason)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            print(f"$ {module.__name__}.py {' '.join(argv)}", flush=True)
            module.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    if code not in (0, None):
        with open(log_path) as f:
            tail = f.read()[-600:].strip().splitlines()[-1:]
        raise UserError(f"{module.__name__}.py failed ({tail[0] if tail else 'no output'}); see {log_path}")
    return time.time() - t0


def pretrain_argv(method: str, args: argparse.Namespace, root: str, out: str, epochs: int) -> List[str]:
    """The scripts' `--recipe small` (key momentum 0.99, lr 0.06 MoCo; SGD lr 0.1, T 0.2
    SimCLR, where LARS' trust ratio with lr 0.3 x B/256 barely moves the weights), with this
    benchmark's batch, epochs, crop-min, MoCo T and queue given explicitly (kept by the
    recipe); SimCLR at batches of 1024 and more keeps its LARS defaults. BYOL and SimSiam:
    main_byol.py's `--recipe small`, the same way; DINO: its branch spells out what main_dino.py's
    `--recipe small` was made from, with this benchmark's crop-min."""
    # --save-freq past the end: only the last epoch's file (one per epoch fills a disk on long runs)
    argv = common_flags(args, root) + ["-b", str(args.batch_size), "--epochs", str(epochs),
                                       "--output-dir", out, "-p", "20", "--save-freq", "1000000"]
    argv += ["--init", args.init] if args.init else []
    # (evaluate() sets args.moco_k per pool on a copy of args)
    if args.dataset in FOLDERS:  # the README's command: the recipe chooses, nothing else given
        if method in ("inpaint", "moco_v3"):
            raise UserError(f"--dataset {args.dataset} benchmarks the --recipe small runs, which {method} has not; "
                            f"drop {method} from --methods")
        argv = common_flags(args, root) + ["--epochs", str(epochs), "--output-dir", out, "-p", "20",
                                           "--save-freq", "1000000", "--recipe", "small"]
        return (argv + (["--simsiam"] if method == "simsiam" else []) + teacher_flags(method, args)
                + args.pretrain_flags.split())
    if method == "inpaint":  # the tutorial's Adam lr 1e-3 and BCE; 4 patches of 8 px on 32 px images (a quarter)
        return argv + ["--lr", "1e-3", "--patches", "4", "--patch-size", "8"]
    if method == "dino":
        # main_dino.py's --recipe small came from this: the README's ResNet row (--out-dim 4096, 2 local crops;
        # DINO's SGD lr 0.03 x B/256),
        # and what the recipe gives the other methods here: grayscale views, the warmup a tenth of the epochs,
        # the global crops' smallest area --crop-min (DINO refuses the flag itself; its local crops end where the
        # global ones start, as in both of DINO's recipes); teacher momentum 0.99 (MoCo's small-data key
        # momentum): at 0.996 a run of a few hundred steps leaves the evaluated teacher ~40 % random init. Untuned
        return argv + ["--out-dim", "4096", "--local-crops-number", "2", "--gray-images",
                       "--warmup-epochs", str(min(10.0, epochs / 10)), "--momentum-teacher", "0.99",
                       "--global-crops-scale", str(args.crop_min), "1", "--local-crops-scale", "0.05",
                       str(args.crop_min)]
    argv += ["--crop-min", str(args.crop_min)]
    if method == "moco_v3":  # AdamW for both families at small batches (LARS needs a far larger lr there); untuned
        return argv + ["--optimizer", "adamw", "--lr", "0.02", "--wd", "0.01", "--moco-t", "0.2",
                       "--warmup-epochs", str(min(10.0, epochs / 10)), "--moco-mlp-dim", "1024"]
    if method == "moco":
        return argv + ["--recipe", "small", "--moco-t", str(args.moco_t), "--moco-k", str(args.moco_k),
                       "--bn-splits", "8" if args.batch_size >= 256 else "2"]
    if method == "distill":  # main_distill.py's --recipe small (SimCLR's: SGD lr 0.1, batch 64), SEED's loss
        return argv + ["--recipe", "small"] + teacher_flags(method, args)
    if method in ("byol", "simsiam"):  # main_byol.py's --recipe small (SGD lr 0.05 x B/256, wd 1e-4)
        return argv + ["--recipe", "small"] + (["--simsiam"] if method == "simsiam" else [])
    if args.batch_size < 1024:
        return argv + ["--recipe", "small"]
    return argv + ["--temperature", "0.2", "--warmup-epochs", str(min(10.0, epochs / 10))]


def teacher_flags(method: str, args: argparse.Namespace) -> List[str]:
    """The distill run's teacher."""
    return ["--teacher", args.teacher] if method == "distill" else []


def checkpoint_arch(path: str) -> str:
    """The architecture a checkpoint of this project was trained with."""
    return str(torch.load(path, map_location="cpu", weights_only=True)["arch"])


def probe_batch(n_labelled: int, batch_size: int) -> int:
    """At least ~5 steps an epoch however few labels there are."""
    return max(2, min(batch_size, n_labelled // 5))


def lincls_argv(args: argparse.Namespace, root: str, out: str, pretrained: str, fraction: float, n_labelled: int,
                supervised: bool, crop: int = 32) -> List[str]:
    b = probe_batch(n_labelled, args.batch_size)
    argv = common_flags(args, root) + ["--pretrained", pretrained, "--label-fraction", str(fraction), "-b", str(b),
                                       "--cos", "--output-dir", out, "-p", "1000", "--crop-size", str(crop)]
    if supervised:
        # from scratch: the whole network at one lr (no slower backbone), SGD + wd, cosine
        return argv + ["--finetune", "--backbone-lr-scale", "1", "--lr", "0.1", "--wd", "5e-4",
                       "--epochs", str(args.sup_epochs)]
    # the reference linear probe (SGD, no wd, lr 30 at batch 256), lr scaled linearly to the batch.
    # --quick uses 2.0 at 256: after a few hundred pretraining steps the frozen features are
    # large (BN running statistics barely moved) and lr 30 diverges in a 5-epoch probe
    return argv + ["--lr", f"{args.probe_lr * b / 256:.4g}", "--epochs", str(args.probe_epochs)]


def embed(args: argparse.Namespace, data_args: argparse.Namespace, ckpt_path: str, device: torch.device,
          crop: int = 32, arch: str = ""):
    """Raw fp32 backbone features (and labels) of the train and test images, un-augmented
    (eval transform at `crop` px); ckpt_path 'none' is the random-init backbone (seeded by --seed).
    `arch`: the backbone's, when it is not --arch (the teacher's)."""
    arch = arch or args.arch
    ckpt = load_pretrained(ckpt_path, arch) if ckpt_path != "none" else None
    # --in-channels: the checkpoint's channels and statistics, else (random init) measured on train
    data_args = argparse.Namespace(**{**vars(data_args), "in_channels": args.in_channels, "seed": args.seed,
                                      "channel_mean": None, "channel_std": None, "channel_norm": None})
    channels = resolve_channels(data_args, "train", (ckpt or {}).get("args"))
    torch.manual_seed(args.seed)
    model = build_backbone(arch, small_images=args.small_images, in_channels=channels.count)
    if ckpt is not None:
        load_backbone(model, ckpt, ckpt_path)
    model.to(device)
    tf = augment.eval_transform(crop, channels)
    with without_head(model):
        return [extract_features(model, TransformedDataset(build_dataset(data_args, split), tf), 256, device,
                                 workers=args.workers, normalize=False) for split in ("train", "val")]


def probe_at_fractions(args: argparse.Namespace, features, train_targets, num_classes: int,
                       fractions: List[float]) -> Dict[str, Dict[str, float]]:
    """Linear probe and kNN top-1 (k=20, T=0.07, on L2-normalised features, raw and PCA-whitened
    as main_knn.py --whiten KNN_WHITEN) on the test set, with the stratified label subsets
    main_lincls.py draws (same seed, so the same images). The whitening is fitted on every
    train image's features, labels unused: the unlabelled pool a user has."""
    (tr_f, tr_l), (te_f, te_l) = features
    mean, projection = fit_whitening(tr_f, KNN_WHITEN)
    white_tr, white_te = whiten(tr_f, mean, projection), whiten(te_f, mean, projection)
    out: Dict[str, Dict[str, float]] = {"linear": {}, "knn": {}, "knn_white": {}}
    for f in fractions:
        idx = torch.arange(len(tr_l)) if f >= 1.0 else torch.tensor(stratified_subset(train_targets, f, 0))
        idx = idx.to(tr_f.device)
        out["linear"][str(f)] = logistic_regression_accuracy(tr_f[idx], tr_l[idx], te_f, te_l, num_classes)
        for kind, (a, b) in (("knn", (tr_f, te_f)), ("knn_white", (white_tr, white_te))):
            acc = knn_accuracy(F.normalize(a[idx].float(), dim=1), tr_l[idx], F.normalize(b.float(), dim=1), te_l,
                               num_classes, k=20, temperature=0.07)
            out[kind][str(f)] = acc["knn_top1"]
    return out


def read_acc(out: str) -> float:
    """The last epoch's test top-1 of a main_lincls.py run (not the best epoch: picking the
    best on the test set would flatter every row)."""
    import json
    with open(os.path.join(out, "results.json")) as f:
        return float(json.load(f)["final"]["acc1"])


def training_seconds(out: str, images_per_epoch: int) -> float:
    """A finished run's training time from its metrics.jsonl (each epoch's images / images/s;
    start-up not included)."""
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return sum(images_per_epoch / json.loads(line)["images_per_sec"] for line in f if line.strip())


@dataclasses.dataclass
class Data:
    """One seed's data (prepare_data): where the labelled set and the unlabelled pool are, as
    the scripts read them, and their sizes."""
    root: str  # the labelled set (train: probes and supervised; val: the test set)
    pool_root: str  # the unlabelled pool the methods pretrain on (its train split)
    data_args: argparse.Namespace  # build_dataset's view of `root`
    train: object  # the labelled train split
    n_pool: int
    n_test: int
    labelled: Dict[float, int]  # images per label fraction

    @property
    def n_classes(self) -> int:
        return len(self.train.classes)


def prepare_data(args: argparse.Namespace) -> Data:
    """The data step: the inspection set written on first use; for Fashion-MNIST/MNIST the
    class-balanced subsets and the pool drawn with args.seed (IDX files under OUTPUT)."""
    root = pool_root = inspection_root(args) if args.dataset == "inspection" else args.data
    if args.dataset in FOLDERS:
        pass  # every train image is the pool and the labelled set; val/ is the test set
    elif args.train_images or args.test_images:
        # class-balanced subsets as IDX files: the product scripts read them like the real set
        root = mnist_subset(args.data, os.path.join(args.output_dir, "data"), args.train_images, args.test_images,
                            args.dataset, seed=args.seed)
    if args.pretrain_images and args.dataset not in FOLDERS:  # the unlabelled pool (its test split is unused)
        pool_root = mnist_subset(args.data, os.path.join(args.output_dir, "data_pool"), args.pretrain_images, 10,
                                 args.dataset, seed=args.seed + 1)
    data_args = argparse.Namespace(in_channels=None, dataset=script_dataset(args), data=root, download=False)
    train = build_dataset(data_args, "train")
    pool_args = argparse.Namespace(in_channels=None, dataset=script_dataset(args), data=pool_root, download=False)
    n_pool = len(build_dataset(pool_args, "train"))
    labelled = {f: (len(train) if f >= 1 else len(stratified_subset(train.targets, f, 0))) for f in args.fractions}
    return Data(root, pool_root, data_args, train, n_pool, len(build_dataset(data_args, "val")), labelled)


def pretrain_methods(args: argparse.Namespace, data: Data, epochs: Dict[str, int]
                     ) -> Tuple[Dict[str, str], Dict[str, float]]:
    """Each method's pretraining, its script's main(argv) on the pool (--reuse: a finished run
    is kept): ({method: its last checkpoint}, {"pretrain_<method>": seconds})."""
    import main_byol
    import main_dino
    import main_distill
    import main_inpaint
    import main_moco
    import main_moco_v3
    import main_simclr

    scripts = {"moco": main_moco, "moco_v3": main_moco_v3, "simclr": main_simclr, "inpaint": main_inpaint,
               "byol": main_byol, "simsiam": main_byol, "dino": main_dino,
               "distill": main_distill}
    backbones: Dict[str, str] = {}
    seconds: Dict[str, float] = {}
    for method in args.methods:
        out = os.path.join(args.output_dir, method)
        backbones[method] = os.path.join(out, "checkpoint_last.pth.tar")
        if args.reuse and os.path.isfile(os.path.join(out, f"checkpoint_{epochs[method]:04d}.pth.tar")):
            print(f"=> {method}: reusing the finished run in {out}", flush=True)
            seconds[f"pretrain_{method}"] = training_seconds(out, data.n_pool)
            continue
        print(f"=> pretraining {method} ({epochs[method]} epochs, batch {args.batch_size}) ...", flush=True)
        # --overwrite: an unfinished earlier run in `out` is replaced, not resumed
        seconds[f"pretrain_{method}"] = run_script(scripts[method], pretrain_argv(method, args, data.pool_root, out,
                                                                                  epochs[method]) + ["--overwrite"],
                                                   os.path.join(out, "log.txt"))
    return backbones, seconds


def probe_backbones(args: argparse.Namespace, data: Data, backbones: Dict[str, str], crops: Dict[str, int],
                    device: torch.device, archs: Dict[str, str]
                    ) -> Tuple[Dict[str, Dict], Dict[str, float], Dict[str, float]]:
    """The probes of every backbone at its crop and architecture (--arch unless `archs` names
    another): linear and kNN at each label fraction, and (--lincls-probe) main_lincls.py's SGD
    probe: ({name: row}, {"probe_<name>": seconds}, {name: images/s of the feature extraction,
    train and test images, one process: what the backbone costs where it is used})."""
    import main_lincls

    runs: Dict[str, Dict] = {}
    seconds: Dict[str, float] = {}
    inference: Dict[str, float] = {}
    for name, ckpt in backbones.items():
        print(f"=> {name}: linear probe and kNN at {crops[name]} px ...", flush=True)
        t0 = time.time()
        features = embed(args, data.data_args, ckpt, device, crops[name], archs.get(name, ""))
        inference[name] = (len(features[0][1]) + len(features[1][1])) / (time.time() - t0)
        runs[name] = probe_at_fractions(args, features, data.train.targets, data.n_classes, args.fractions)
        if args.lincls_probe:
            runs[name]["lincls"] = {}
            for f in args.fractions:
                out = os.path.join(args.output_dir, f"probe_{name}_{f:g}")
                run_script(main_lincls, lincls_argv(args, data.root, out, ckpt, f, data.labelled[f], False,
                                                    crops[name]) + ["--overwrite"],
                           os.path.join(out, "log.txt"))
                runs[name]["lincls"][str(f)] = read_acc(out)
        seconds[f"probe_{name}"] = time.time() - t0
    return runs, seconds, inference


def probe_statistics(args: argparse.Namespace, data: Data) -> Dict[str, Dict[str, float]]:
    """The hand-made baseline's row: the probes on four statistics of each image."""
    print("=> statistics: the probes on four statistics of each image ...", flush=True)
    return probe_at_fractions(args, [image_statistics(build_dataset(data.data_args, split))
                                     for split in ("train", "val")], data.train.targets, data.n_classes,
                              args.fractions)


def supervised_baseline(args: argparse.Namespace, data: Data, crop: int, device: torch.device
                        ) -> Dict[str, Dict[str, float]]:
    """The network trained from scratch on each fraction's labels (main_lincls.py --finetune
    --pretrained none; --reuse keeps a finished run): its own classifier's top-1 as 'linear',
    kNN of its features with the labels it was trained on."""
    import main_lincls

    print("=> supervised from scratch on the same labels ...", flush=True)
    row: Dict[str, Dict[str, float]] = {"linear": {}, "knn": {}, "knn_white": {}}
    for f in args.fractions:
        out = os.path.join(args.output_dir, f"supervised_{f:g}")
        if not (args.reuse and os.path.isfile(os.path.join(out, "results.json"))):
            run_script(main_lincls, lincls_argv(args, data.root, out, "none", f, data.labelled[f], True, crop)
                       + ["--overwrite"],
                       os.path.join(out, "log.txt"))
        row["linear"][str(f)] = read_acc(out)
        sup = probe_at_fractions(args, embed(args, data.data_args, os.path.join(out, "checkpoint_last.pth.tar"),
                                             device, crop), data.train.targets, data.n_classes, [f])
        row["knn"].update(sup["knn"])
        row["knn_white"].update(sup["knn_white"])
    if args.lincls_probe:
        row["lincls"] = dict(row["linear"])
    return row


def evaluate(args: argparse.Namespace, pool_images: int, seed: int, output_dir: str) -> Dict:
    """The whole protocol once: subsets drawn with `seed`, the methods pretrained on a pool
    of `pool_images` unlabelled images (0: all), probes, random init, supervised."""
    args = argparse.Namespace(**vars(args))
    args.seed, args.output_dir, args.pretrain_images = seed, output_dir, pool_images
    device = torch.device(args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.time()
    data = prepare_data(args)
    epochs = {m: pretrain_epochs(args, m, data.n_pool) for m in args.methods}
    args.moco_k = args.moco_k or fitted_queue(data.n_pool, args.batch_size)
    print(f"=> {args.dataset}, seed {seed}: pretraining on {data.n_pool} train images without labels "
          f"({', '.join(f'{m} {e} epochs' for m, e in epochs.items())}); probes on {len(data.train)} train / "
          f"{data.n_test} test images, label fractions "
          + ", ".join(f"{f:g} ({n} images)" for f, n in data.labelled.items()), flush=True)
    backbones, seconds = pretrain_methods(args, data, epochs)
    backbones["random_init"] = "none"
    archs = {}
    if args.teacher:  # the teacher's own probes: what distillation is measured against
        backbones["teacher"] = args.teacher
        archs["teacher"] = checkpoint_arch(args.teacher)
    # each run probed at its own crop (the recipe may choose it); random init at the first run's
    crops = {name: run_crop(ckpt, 32) for name, ckpt in backbones.items()}
    crops["random_init"] = next(iter(crops.values()))
    runs, probe_seconds, inference = probe_backbones(args, data, backbones, crops, device, archs)
    seconds.update(probe_seconds)
    if args.statistics:
        t0 = time.time()
        runs["statistics"] = probe_statistics(args, data)
        seconds["probe_statistics"] = time.time() - t0
    t0 = time.time()
    if args.supervised:
        runs["supervised"] = supervised_baseline(args, data, crops["random_init"], device)
    seconds["supervised"] = time.time() - t0
    seconds["total"] = time.time() - t_start
    return {"runs": runs, "seconds": seconds, "inference_images_per_sec": inference, "pool": data.n_pool,
            "train": len(data.train), "test": data.n_test,
            "labelled": data.labelled, "epochs": epochs, "moco_k": args.moco_k, "crops": crops,
            "recipes": {m: pretrain_argv(m, args, "DATA", f"OUT/{m}", epochs[m]) for m in args.methods}}


def mean_and_spread(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def seed_dir(args: argparse.Namespace, pool: int, seed: int) -> str:
    """One evaluation's folder: OUTPUT_DIR itself for one pool and one seed."""
    if len(args.pools) == 1 and len(args.seeds) == 1:
        return args.output_dir
    return os.path.join(args.output_dir, f"pool{pool}_seed{seed}")


def pool_summary(args: argparse.Namespace, per_seed: Dict[int, Dict]) -> Dict:
    """One pool's evaluations over the seeds: every cell's mean and spread, the seeds' own
    records, and the sizes and recipes (the first seed's)."""
    first = per_seed[args.seeds[0]]
    means: Dict[str, Dict[str, Dict[str, float]]] = {}
    spread: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, row in first["runs"].items():
        means[name], spread[name] = {}, {}
        for kind, cells in row.items():
            means[name][kind], spread[name][kind] = {}, {}
            for f in cells:
                m, sd = mean_and_spread([r["runs"][name][kind][f] for r in per_seed.values()])
                means[name][kind][f], spread[name][kind][f] = m, sd
    inference = {name: mean_and_spread([r["inference_images_per_sec"][name] for r in per_seed.values()])[0]
                 for name in first["inference_images_per_sec"]}
    return {"results": means, "spread": spread, "per_seed": {str(k): v for k, v in per_seed.items()},
            "inference_images_per_sec": inference,
            "epochs": first["epochs"], "moco_k": first["moco_k"], "train": first["train"], "test": first["test"],
            "labelled": first["labelled"], "recipes": first["recipes"]}


LABEL = {"linear": "linear", "knn": "kNN", "knn_white": "kNN whitened", "lincls": "lincls"}


def probe_kinds(args: argparse.Namespace) -> List[str]:
    """The table's probe columns (each at every label fraction)."""
    return ["linear", "knn", "knn_white"] + (["lincls"] if args.lincls_probe else [])


def table_notes(args: argparse.Namespace) -> str:
    """What the columns and rows mean, printed under the tables and kept in the record."""
    return ("linear: logistic regression on the frozen, standardised features (L-BFGS, L2 "
            f"{PROBE_WD:g}); kNN: k=20, T=0.07 on L2-normalised features; kNN whitened: the same on their first "
            f"{KNN_WHITEN} principal axes at unit variance (fitted on all train images, labels unused: "
            f"main_knn.py --whiten {KNN_WHITEN}); lincls: main_lincls.py's SGD probe; "
            "supervised: the network trained from scratch on those labels; its 'linear' column is its own "
            "classifier's top-1, its kNN uses its features; statistics: the same probes on four statistics of "
            "each image (grayscale mean, std, mean absolute gradient in x and y)" + (
                f"; mean +- sample standard deviation over seeds {args.seeds}" if len(args.seeds) > 1 else ""))


def pool_table(args: argparse.Namespace, pool: str, rec: Dict, kinds: List[str]) -> str:
    """One pool's table under its title: a row per backbone, a column per probe and fraction."""
    means, spread = rec["results"], rec["spread"]
    fr = [str(f) for f in args.fractions]

    def cell(name: str, k: str, f: str) -> str:
        if k not in means[name]:  # (the statistics have no SGD probe)
            return "-"
        return f"{means[name][k][f]:.1f}" + (f" +- {spread[name][k][f]:.1f}" if len(args.seeds) > 1 else "")

    header = ["backbone"] + [f"{LABEL[k]} {float(f) * 100:g}%" for k in kinds for f in fr]
    table = format_table(header, [[name] + [cell(name, k, f) for k in kinds for f in fr] for name in means])
    per_run = {m: torch.tensor([r["seconds"][f"pretrain_{m}"] for r in rec["per_seed"].values()]) for m in args.methods}
    minutes = ", ".join(f"{m} {per_run[m].mean() / 60:.1f}" for m in args.methods)
    title = (f"{args.dataset} test top-1 (%), pretrained on {pool} images ("
             + ", ".join(f"{m} {e} epochs" for m, e in rec["epochs"].items()) + ", MoCo K "
             f"{rec['moco_k']}; {minutes} min per run), probed on {rec['train']} train / {rec['test']} test "
             f"images, {args.arch}, {'quick' if args.quick else 'full'} budget, {len(args.seeds)} seed(s)"
             + (f", --init {args.init}" if args.init else ", from scratch"))
    speed = "feature extraction, images/s: " + ", ".join(f"{name} {v:.0f}"
                                                         for name, v in rec["inference_images_per_sec"].items())
    return f"{title}\n{table}\n{speed}"


def targets_met(args: argparse.Namespace, by_pool: Dict[str, Dict], kinds: List[str]) -> Dict[str, bool]:
    """Per pool, fraction, method and probe: does the method beat random init (and the
    statistics; the supervised network by its linear column) by more than the seed spread?"""
    checks: Dict[str, bool] = {}
    for pool, rec in by_pool.items():
        means, spread = rec["results"], rec["spread"]
        suffix = "" if len(by_pool) == 1 else f"_pool{pool}"
        for f in [str(f) for f in args.fractions]:
            for m in args.methods:
                for k in kinds:
                    # beating random init by more than the seed spread of either (with one seed: at all)
                    margin = max(spread[m][k][f], spread["random_init"][k][f])
                    checks[f"{m}_{k}_beats_random_{f}{suffix}"] = means[m][k][f] - means["random_init"][k][f] > margin
                    if args.statistics and k in means["statistics"]:
                        margin = max(spread[m][k][f], spread["statistics"][k][f])
                        checks[f"{m}_{k}_beats_statistics_{f}{suffix}"] = \
                            means[m][k][f] - means["statistics"][k][f] > margin
                if args.supervised:
                    checks[f"{m}_linear_beats_supervised_{f}{suffix}"] = \
                        means[m]["linear"][f] > means["supervised"]["linear"][f]
    return checks


def quality_record(args: argparse.Namespace, by_pool: Dict[str, Dict], tables: List[str], checks: Dict[str, bool],
                   notes: str, seconds_total: float, device: torch.device) -> Dict:
    """OUTPUT_DIR/quality.json: the first pool's results at the top, every pool under by_pool."""
    first = next(iter(by_pool.values()))
    return {"benchmark": "quality", "dataset": args.dataset, "data_root": os.path.abspath(args.data),
            "mode": "quick" if args.quick else "full", "pretrain_images": int(next(iter(by_pool))),
            "train_images": first["train"], "test_images": first["test"],
            "labelled_images": {str(f): n for f, n in first["labelled"].items()},
            "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "recipes": first["recipes"], "results": first["results"], "spread": first["spread"],
            "by_pool": by_pool, "seconds": first["per_seed"][str(args.seeds[0])]["seconds"],
            "seconds_total": seconds_total, "targets_met": checks, "notes": notes,
            "machine": machine_info(device), "table": "\n\n".join(tables)}


@report_user_errors
def main(argv=None) -> Dict:
    args = finalize(get_args_parser().parse_args(argv))
    device = torch.device(args.device)
    t_start = time.time()
    by_pool: Dict[str, Dict] = {}
    for pool in args.pools:  # each seed's whole protocol (evaluate), then the pool's means and spreads
        per_seed = {seed: evaluate(args, pool, seed, seed_dir(args, pool, seed)) for seed in args.seeds}
        by_pool[str(per_seed[args.seeds[0]]["pool"])] = pool_summary(args, per_seed)
    seconds_total = time.time() - t_start
    kinds, notes = probe_kinds(args), table_notes(args)
    tables = [pool_table(args, pool, rec, kinds) for pool, rec in by_pool.items()]
    checks = targets_met(args, by_pool, kinds)
    print("\n" + "\n\n".join(tables) + f"\n({notes}; {seconds_total / 60:.1f} min in all on {device})", flush=True)
    record = quality_record(args, by_pool, tables, checks, notes, seconds_total, device)
    write_json(args.json, record)
    print(f"=> {args.json}", flush=True)
    return record


if __name__ == "__main__":
    main()
