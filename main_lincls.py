#!/usr/bin/env python
"""Linear probe (frozen backbone) or fine-tuning of a pretrained checkpoint, with a
full evaluation every epoch.

    python main_lincls.py --dataset synthetic -a resnet18 --pretrained runs/moco/checkpoint_last.pth.tar --epochs 10 -b 64
    python main_lincls.py /data/imagenet -a resnet50 --lr 30.0 -b 256 --schedule 60 80 \\
        --pretrained moco_v2_800ep_pretrain.pth.tar --multiprocessing-distributed

Defaults follow facebookresearch/moco's main_lincls.py (SGD lr 30, momentum 0.9, no
weight decay, lr /10 at epochs 60 and 80 of 100, batch 256). The backbone stays in
eval mode, so its BatchNorm statistics do not move, and only the head is in the
optimizer; after training every backbone tensor is checked against the checkpoint.
"""
import argparse
import functools
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.augment import transforms as augment
from common.ckpt.io import (
    check_free_space,
    checkpoint_bytes,
    load_checkpoint,
    load_model_state,
    prepare_output_dir,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from common.cli import ArgumentParser, add_training_args, check_training_flags
from common.data.datasets import build_dataset, default_crop_size
from common.dist.collectives import DistEnv, is_main_process
from common.errors import UserError
from common.eval.features import extract_features
from common.dist.world import expected_world_size, per_worker
from common.dist.launch import script_main, start_worker
from common.data.loader import make_loader
from common.log.progress import MeterBank, MetricsLog, Progress, log
from common.watch.loss_guard import LossGuard
from common.eval.metrics import classification_report, save_confusion_csv, save_per_class_csv
from common.nets.models import build_backbone, feature_dim, without_head
from common.dist.placement import place_model
from common.train.precision import Precision
from common.ckpt.pretrained import extract_backbone, follow_checkpoint, load_backbone, load_pretrained
from common.ckpt.resume import check_arch, check_same_flags, resolve_resume, resumed_args, run_seed
from common.train.schedule import lr_at, set_lr
from common.data.subsets import SubsetDataset, class_counts, load_subset, save_subset, stratified_subset
from common.data.transformed import TransformedDataset
from lincls.balance import BalancedSampler, class_weights
from lincls.hierarchy import (
    HierarchicalLoss,
    LabelTree,
    LevelHeads,
    add_hierarchy_args,
    check_hierarchy_flags,
    hierarchical_dataset,
    hierarchical_report,
)
from lincls.logreg import fit_logistic_regression

# (lr, weight decay) when not given: the reference linear probe; fine-tuning the whole
# network needs a far smaller step (its backbone lr is further scaled by --backbone-lr-scale)
LINEAR_PROBE_DEFAULTS = (30.0, 0.0)
MLP_PROBE_DEFAULTS = (0.1, 0.0)
FINETUNE_DEFAULTS = (0.1, 1e-4)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Linear probe / fine-tuning of a pretrained backbone")
    add_training_args(parser, lr=LINEAR_PROBE_DEFAULTS[0], epochs=100, batch_size=256, schedule=(60, 80),
                      weight_decay=LINEAR_PROBE_DEFAULTS[1], name="lincls")
    # None = "not given": the default depends on --head and --finetune (finalize_args)
    parser.set_defaults(lr=None, weight_decay=None, save_freq=0, arch=None)
    for action in parser._actions:
        if action.dest == "arch":
            action.help = "torchvision architecture (default: the --pretrained checkpoint's, else resnet50)"
        elif action.dest == "lr":
            action.help = "initial learning rate (default: 30 linear probe, 0.1 --head mlp, 0.1 --finetune)"
        elif action.dest == "weight_decay":
            action.help = "weight decay (default: 0 probe, 1e-4 --finetune)"
        elif action.dest == "save_freq":
            action.help = ("also keep checkpoint_NNNN.pth.tar every N epochs (default 0: only "
                           "checkpoint_last.pth.tar and model_best.pth.tar)")
    g = parser.add_argument_group("lincls")
    g.add_argument("--pretrained", default=None, type=str, metavar="PATH|none|imagenet",
                   help="pretraining checkpoint (ours: MoCo, SimCLR, lincls; or facebookresearch/moco's), "
                        "'none' for a random-init backbone, 'imagenet' for torchvision's cached weights")
    g.add_argument("--head", default="linear", choices=("linear", "mlp"),
                   help="classifier on the features: linear, or mlp = Linear-ReLU-Dropout-Linear")
    g.add_argument("--probe", default="sgd", choices=("sgd", "logreg"),
                   help="how a frozen linear head is trained: sgd (the reference protocol: augmented images, "
                        "--lr/--epochs), or logreg (logistic regression on the features of the un-augmented "
                        "images, L-BFGS to convergence with a fixed L2: nothing to tune, the recommended probe "
                        "for small label sets, where lr 30 diverges)")
    g.add_argument("--head-bn", action="store_true",
                   help="BatchNorm without affine parameters before the head (as MAE's linear probe): the "
                        "features are standardised, so one lr suits backbones whose feature scales differ")
    g.add_argument("--mlp-hidden-dim", default=0, type=int, help="hidden width of --head mlp (default: feature width)")
    g.add_argument("--dropout", default=0.5, type=float, help="dropout of --head mlp")
    g.add_argument("--finetune", action="store_true",
                   help="train the whole network end to end instead of a frozen backbone")
    g.add_argument("--trainable-layers", default="", metavar="NAMES",
                   help="fine-tune only these backbone blocks (comma-separated, of conv1,bn1,layer1..layer4, e.g. "
                        "layer3,layer4) plus the head; the rest stays frozen and in eval mode")
    g.add_argument("--backbone-lr-scale", default=0.1, type=float,
                   help="with --finetune or --trainable-layers: the backbone's lr is --lr times this")
    g.add_argument("--label-fraction", default=1.0, type=float,
                   help="train on a class-stratified fraction of the labels (e.g. 0.01, 0.1); the subset is "
                        "saved to OUTPUT_DIR/label_subset.json")
    g.add_argument("--subset-seed", default=0, type=int,
                   help="seed of the --label-fraction draw (fixed by default, so every run gets the same subset)")
    g.add_argument("--label-subset", default=None, type=str, metavar="JSON",
                   help="reuse a label_subset.json from an earlier run instead of drawing one")
    g.add_argument("--balanced-sampling", action="store_true",
                   help="oversample small classes (WeightedRandomSampler, weight 1/class size)")
    g.add_argument("--class-weights", action="store_true",
                   help="weight the loss by N / (C * class size) for imbalanced data")
    g.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate the classifier given by --resume (e.g. model_best.pth.tar) on the val split")
    add_hierarchy_args(parser, classifier=True)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    check_training_flags(args)
    args.output_dir = args.output_dir or os.path.join("runs", "lincls")
    prepare_output_dir(args.output_dir, new_run=not (args.resume or args.evaluate), overwrite=args.overwrite)
    if args.evaluate:
        path = resolve_resume(args.resume or "auto", args.output_dir)
        if not path:
            raise UserError("--evaluate needs a trained classifier; pass --resume model_best.pth.tar "
                            "(or checkpoint_last.pth.tar) from a main_lincls.py run")
        # evaluate the classifier as it was trained, whatever the flags say
        saved = resumed_args(path, args.output_dir, "lincls")[1]
        for key in ("arch", "head", "head_bn", "mlp_hidden_dim", "dropout", "small_images", "hierarchy_depth"):
            if key in saved:
                setattr(args, key, saved[key])
    elif args.pretrained is None:
        raise UserError("--pretrained is required; pass a pretraining checkpoint, 'none' for a random-init "
                        "baseline or 'imagenet' for torchvision's cached weights")
    # resuming replays the original run's seed (data order, augmentations)
    args.seed = run_seed(args.seed, resumed_args(args.resume, args.output_dir, "lincls")[1])
    args.crop_size = args.crop_size or default_crop_size(args)
    follow_checkpoint(args)  # -a and the stem of the pretraining run unless given
    args.trainable_layers = parse_trainable_layers(args.trainable_layers, args.finetune)
    tuned = args.finetune or bool(args.trainable_layers)
    lr, wd = FINETUNE_DEFAULTS if tuned else MLP_PROBE_DEFAULTS if args.head == "mlp" else LINEAR_PROBE_DEFAULTS
    args.lr = lr if args.lr is None else args.lr
    args.weight_decay = wd if args.weight_decay is None else args.weight_decay
    if not 0.0 < args.label_fraction <= 1.0:
        raise UserError(f"--label-fraction must be in (0, 1], got {args.label_fraction}; e.g. 0.01 for 1% of the labels")
    if args.label_subset and args.label_fraction != 1.0:
        raise UserError("--label-subset and --label-fraction both choose the training images; pass only one")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    check_hierarchy_flags(args, classifier=True)
    if args.probe == "logreg":
        clash = [flag for flag, on in (("--finetune", args.finetune), ("--trainable-layers", args.trainable_layers),
                                       ("--head mlp", args.head == "mlp"), ("--head-bn", args.head_bn),
                                       ("--hierarchy-depth", args.hierarchy_depth),
                                       ("--balanced-sampling", args.balanced_sampling)) if on]
        if clash:
            raise UserError(f"--probe logreg fits one linear head on frozen features in one go; drop {clash[0]} "
                            f"(or use --probe sgd)")
    per_worker(args.batch_size, expected_world_size(args))
    return args


# ---------------------------------------------------------------- model

def build_head(in_dim: int, num_classes: Union[int, Sequence[int]], kind: str, hidden_dim: int = 0,
               dropout: float = 0.5, bn: bool = False) -> nn.Module:
    """A fresh classifier head. Weights ~ N(0, 0.01), biases 0, as facebookresearch/moco
    initialises its linear probe; bn puts a parameter-free BatchNorm1d in front (MAE).
    A list of class counts builds one head per level of a hierarchy (LevelHeads)."""
    if not isinstance(num_classes, int):
        head = LevelHeads([build_head(in_dim, n, kind, hidden_dim, dropout) for n in num_classes])
    elif kind == "linear":
        head = nn.Linear(in_dim, num_classes)
    else:
        hidden = hidden_dim or in_dim
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.normal_(mean=0.0, std=0.01)
            m.bias.data.zero_()
    if bn:
        # part of the head: it learns its running statistics while the backbone stays frozen
        head = nn.Sequential(nn.BatchNorm1d(in_dim, affine=False, eps=1e-6), head)
    return head


def backbone_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every backbone tensor (parameters and BN buffers), head excluded, as CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def build_classifier(args: argparse.Namespace, num_classes: Union[int, Sequence[int]]
                     ) -> Tuple[nn.Module, Dict[str, torch.Tensor], str]:
    """The backbone (pretrained weights loaded through common.ckpt.io, which knows
    every layout) with a new head (one per level for a list of class counts). Returns
    (model, the checkpoint's backbone tensors for the sanity check (empty for random
    init), description of where the weights came from)."""
    outputs = num_classes if isinstance(num_classes, int) else sum(num_classes)
    model = build_backbone(args.arch, num_classes=outputs, small_images=args.small_images)
    source = "random init"
    reference: Dict[str, torch.Tensor] = {}
    ckpt = None if args.evaluate else load_pretrained(args.pretrained, args.arch)
    if ckpt is not None:
        where = args.pretrained if args.pretrained != "imagenet" else "torchvision ImageNet weights"
        layout = load_backbone(model, ckpt, where)
        source = f"{where} ({ckpt.get('method') or 'reference'} checkpoint, layout {layout})"
        reference = {k: v.clone() for k, v in extract_backbone(ckpt["state_dict"])[0].items()}
    model.fc = build_head(feature_dim(model), num_classes, args.head, args.mlp_hidden_dim, args.dropout,
                          args.head_bn)
    return model, reference, source


BLOCKS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def parse_trainable_layers(value: str, finetune: bool) -> List[str]:
    """--trainable-layers 'layer3,layer4' -> ['layer3', 'layer4'], checked."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        raise UserError(f"--trainable-layers names {unknown[0]!r}, which is not a backbone block; pick from "
                        f"{','.join(BLOCKS)} (e.g. --trainable-layers layer3,layer4)")
    if names and finetune:
        raise UserError("--finetune trains every block and --trainable-layers only some; pass one of them")
    return names


def is_trainable(name: str, trainable_layers: Sequence[str]) -> bool:
    """The head always; a backbone tensor when its block is in --trainable-layers."""
    return name.startswith("fc.") or name.split(".")[0] in trainable_layers


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, except that NaN equals NaN at the same place: an untouched NaN weight is
    unchanged, and torch.equal(NaN, NaN) is False."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or not a.is_floating_point():
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def sanity_check(model: nn.Module, reference: Dict[str, torch.Tensor], trainable_layers: Sequence[str] = ()) -> None:
    """A frozen backbone (or its frozen blocks, with --trainable-layers) must leave every
    tensor (weights and BN statistics) exactly as loaded: otherwise the reported accuracy is
    not a probe of the pretrained features. A difference is a bug, so it fails loudly."""
    current = {k: v for k, v in backbone_state(model).items() if not is_trainable(k, trainable_layers)}
    reference = {k: v for k, v in reference.items() if not is_trainable(k, trainable_layers)}
    changed = [k for k in reference if k not in current or not same_tensor(current[k], reference[k].to(current[k].dtype))]
    if changed or set(current) != set(reference):
        raise RuntimeError(f"sanity check failed: the frozen backbone changed during training "
                           f"({len(changed)} tensors differ, e.g. {changed[:5]}; "
                           f"keys only in the model: {sorted(set(current) - set(reference))[:5]})")
    which = f"frozen ({', '.join(b for b in BLOCKS if b not in trainable_layers)})" if trainable_layers else "backbone"
    log(f"=> sanity check passed: all {len(reference)} {which} tensors equal the loaded ones")


def check_compatible(ckpt: Dict, args: argparse.Namespace, classes: List[str], path: str) -> None:
    """A lincls checkpoint can only continue (or be evaluated) as the same kind of model."""
    check_arch(ckpt, args.arch, path)
    saved = ckpt.get("args", {})
    checked = ["--head", "--head-bn", "--small-images", "--mlp-hidden-dim", "--hierarchy-depth"]
    if not args.evaluate:  # continuing on other training images would silently mix two experiments
        checked += ["--label-fraction", "--subset-seed", "--label-subset"]
    check_same_flags(saved, args, checked, path)
    if not args.evaluate and saved.get("finetune", args.finetune) != args.finetune:
        raise UserError(f"{path!r} was trained {'with' if saved['finetune'] else 'without'} --finetune; "
                        f"resume it the same way (or use another --output-dir for a new run)")
    if not args.evaluate and saved.get("trainable_layers", []) != args.trainable_layers:
        raise UserError(f"{path!r} was trained with --trainable-layers {','.join(saved['trainable_layers']) or '(none)'}"
                        f"; resume it with the same (or use another --output-dir for a new run)")
    saved_classes = ckpt.get("classes")
    if saved_classes is not None and list(saved_classes) != list(classes):
        raise UserError(f"{path!r} classifies {len(saved_classes)} classes {list(saved_classes)[:3]}... but this "
                        f"dataset has {len(classes)} {list(classes)[:3]}...; use it on the dataset it was trained on")


# ---------------------------------------------------------------- data

def labelled(dataset, split: str):
    if dataset is None:
        raise UserError(f"main_lincls.py needs a labelled {split} split; give DATA/train and DATA/val class folders "
                        f"(or train.csv and val.csv with --dataset csv)")
    unlabelled = sum(1 for t in dataset.targets if t < 0)
    if not getattr(dataset, "classes", None) or unlabelled:
        raise UserError(f"{unlabelled or len(dataset)} {split} images have no label; main_lincls.py needs every "
                        f"image in a class folder (or a label in the csv)")
    return dataset


def training_subset(train, args: argparse.Namespace):
    """--label-subset / --label-fraction: the same images every time, saved next to the run."""
    if args.label_subset:
        indices = load_subset(args.label_subset, train)
    elif args.label_fraction < 1.0:
        indices = stratified_subset(train.targets, args.label_fraction, args.subset_seed, train.classes)
    else:
        return train, None
    subset = SubsetDataset(train, indices)
    missing = [train.classes[c] for c, n in enumerate(class_counts(subset.targets, len(train.classes))) if n == 0]
    if missing:
        raise UserError(f"the label subset has no image of class(es) {missing[:5]}; draw another with --label-fraction")
    path = os.path.join(args.output_dir, "label_subset.json")
    if is_main_process():
        save_subset(path, indices, train, args.label_fraction if not args.label_subset else -1.0, args.subset_seed)
    return subset, path


# ---------------------------------------------------------------- train / evaluate

def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, iters_per_epoch: int, lr_fn,
                    args: argparse.Namespace, env: DistEnv, metrics: MetricsLog,
                    tree: Optional[LabelTree] = None) -> Dict[str, float]:
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if args.finetune:
        model.train()
    else:
        # frozen: BN statistics must not move (eval mode); the head (and --trainable-layers) train
        model.eval()
        net.fc.train()
        for name in args.trainable_layers:
            getattr(net, name).train()
    meters = MeterBank(env.device)
    progress = Progress(epoch, args.epochs, iters_per_epoch)
    images_seen = 0
    guard = LossGuard(env.device, epoch, args)
    precision = Precision.from_args(args)
    for it, (images, target) in enumerate(progress.timed(loader)):
        lr = lr_fn(epoch + it / iters_per_epoch)
        set_lr(optimizer, lr)
        images, target = precision.images(images, env.device), target.to(env.device, non_blocking=True)
        with precision.autocast(env.device):
            output = model(images)
            loss = criterion(output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        n = images.shape[0]
        deepest = output if tree is None else tree.split(output)[-1]  # a hierarchy's target is its deepest class
        acc1 = (deepest.argmax(dim=1) == target).float().mean() * 100.0  # a device tensor: no host sync
        meters.update(n, loss=loss, acc1=acc1)
        guard.update(loss, it)
        images_seen += n * env.world_size
        if (it + 1) % args.print_freq == 0 or it + 1 == iters_per_epoch:
            guard.check()
            log(progress.line(it, images_seen, meters.latest(), meters.averages(across_ranks=False), lr))
            metrics.step(epoch * iters_per_epoch + it + 1,
                         {**meters.latest(), "lr": lr, "data_wait": progress.data_wait_share()})
    guard.check()
    return {**{f"train_{k}": v for k, v in meters.averages().items()}, "data_wait": progress.data_wait_share()}


def diverging(val_loss: float, lowest_val_loss: float, acc1: float, best_acc1: float, num_classes: int) -> bool:
    """A probe whose val loss blew up: non-finite, over 10x the loss of guessing (10 log C),
    or 10x its lowest while top-1 fell 5 points below its best. The reference lr 30 does
    this on small datasets, and a random-init or unnormalised backbone at any large lr."""
    if not math.isfinite(val_loss):
        return True
    huge = val_loss > 10 * max(math.log(num_classes), 1.0)
    jumped = math.isfinite(lowest_val_loss) and val_loss > 10 * lowest_val_loss and acc1 < best_acc1 - 5
    return huge or jumped


def evaluate(model: nn.Module, val_dataset, class_names: List[str], args: argparse.Namespace, env: DistEnv,
             workers: int, tree: Optional[LabelTree] = None) -> Dict:
    """Logits of the whole val split (each rank its share, gathered in dataset order), then
    every metric of common.eval.metrics: top-1/top-5, per-class and macro P/R/F1, confusion; for
    a hierarchy those of every level, plus consistency and whole-path top-1 (lincls.hierarchy)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    bs = per_worker(args.batch_size, env.world_size)
    logits, labels = extract_features(net, val_dataset, bs, env.device, workers=workers,
                                      precision=Precision.from_args(args), normalize=False)
    if tree is not None:
        return hierarchical_report(logits, labels, tree, args.consistent or "independent", args.level_weights)
    report = classification_report(logits, labels, class_names)
    report["val_loss"] = F.cross_entropy(logits.float(), labels.long()).item()
    return report


def write_report_files(report: Dict, output_dir: str, suffix: str = "") -> None:
    if "levels" in report:  # a hierarchy: the files of every level, e.g. per_class_level2.csv
        for level in report["levels"]:
            write_report_files(level, output_dir, f"_level{level['level']}{suffix}")
        return
    save_confusion_csv(report["confusion"], report["class_names"], os.path.join(output_dir, f"confusion_matrix{suffix}.csv"))
    save_per_class_csv(report["per_class"], os.path.join(output_dir, f"per_class{suffix}.csv"))


SUMMARY_KEYS = ("acc1", "acc5", "macro_precision", "macro_recall", "macro_f1", "val_loss")
PATH_KEYS = ("path_acc1", "consistency_rate", "independent_path_acc1", "independent_consistency_rate", "val_loss")


def summary_line(report: Dict) -> str:
    if "levels" in report:
        return f"{report['decoding']} decoding: " + "  ".join(f"{k} {report[k]:.2f}" for k in PATH_KEYS)
    return "  ".join(f"{k} {report[k]:.2f}" if k != "acc5" else f"acc5(top-{report['top5_k']}) {report[k]:.2f}"
                     for k in SUMMARY_KEYS)


def level_lines(report: Dict) -> List[str]:
    """One line per level of a hierarchy's report (none for flat labels)."""
    return [f"level {r['level']} ({r['name']}): {summary_line(r)}" for r in report.get("levels", [])]


def summary_record(report: Dict) -> Dict[str, float]:
    """The report's numbers for metrics.jsonl; a hierarchy's per level as level<L>_<key>."""
    if "levels" not in report:
        return {k: report[k] for k in SUMMARY_KEYS}
    return {"acc1": report["acc1"], **{k: report[k] for k in PATH_KEYS},
            **{f"level{r['level']}_{k}": r[k] for r in report["levels"] for k in SUMMARY_KEYS}}


def jsonable(report: Dict) -> Dict:
    if "levels" in report:
        return {**report, "levels": [jsonable(r) for r in report["levels"]]}
    out = {k: v for k, v in report.items() if k not in ("confusion",)}
    out["confusion"] = report["confusion"].tolist()
    return out


# ---------------------------------------------------------------- main

def fit_logreg_head(net: nn.Module, train_data, args: argparse.Namespace, env: DistEnv, workers: int) -> None:
    """--probe logreg: the frozen backbone's features of the un-augmented training images
    (the eval transform), multinomial logistic regression on them (lincls/logreg.py; with
    --class-weights, weighted per class), written into net.fc. Every rank fits the same
    model on the same gathered features."""
    # an unreadable image is left out (a stand-in would be fitted twice, once under its label)
    plain = TransformedDataset(train_data, augment.eval_transform(args.crop_size), args.strict_data,
                               decode_side=augment.eval_decode_side(args.crop_size), skip_unreadable=True)
    with without_head(net):
        x, y = extract_features(net, plain, per_worker(args.batch_size, env.world_size), env.device, workers=workers,
                                precision=Precision.from_args(args), normalize=False, print_freq=50,
                                desc="probe features")
    num_classes = net.fc.out_features
    weight = class_weights(train_data.targets, num_classes) if args.class_weights else None
    w, b = fit_logistic_regression(x.float(), y, num_classes, class_weight=weight)
    with torch.no_grad():
        net.fc.weight.copy_(w.T.to(net.fc.weight.dtype))
        net.fc.bias.copy_(b.to(net.fc.bias.dtype))


def main_worker(local_rank, args: argparse.Namespace) -> None:
    env, batch_size, workers = start_worker(local_rank, args)

    # ---- data: labelled train (optionally a label subset) and val, same classes. With
    # --hierarchy-depth the classes are the deepest level's paths and the tree maps them up
    tree = None
    if args.hierarchy_depth:
        train_base = labelled(hierarchical_dataset(args, "train"), "train")
        tree = train_base.tree
        val_base = labelled(hierarchical_dataset(args, "val", tree), "val")
    else:
        train_base = labelled(build_dataset(args, "train"), "train")
        val_base = labelled(build_dataset(args, "val"), "val")
    classes = list(train_base.classes)
    if list(val_base.classes) != classes:
        raise UserError(f"val classes {list(val_base.classes)[:5]} differ from train classes {classes[:5]}; "
                        f"the val split must have the same classes as the train split")
    num_classes = len(classes)
    if num_classes < 2:  # one class: every prediction is right, 100 % top-1 and F1 that mean nothing
        raise UserError(f"the dataset has only one class ({classes[0]!r}); a classifier needs at least two classes: "
                        f"add another class folder to train/ and val/ (or another label to the csv files)")
    # an unreadable val image is left out, so no image is counted twice (once under another's label)
    val_dataset = TransformedDataset(val_base, augment.eval_transform(args.crop_size), args.strict_data,
                                     decode_side=augment.eval_decode_side(args.crop_size), skip_unreadable=True)

    # a checkpoint to continue (--resume) or to evaluate: read now, it fixes the head to build
    resume_path = resolve_resume(args.resume or ("auto" if args.evaluate else ""), args.output_dir)
    ckpt = load_checkpoint(resume_path, expected_method="lincls") if resume_path else None
    if ckpt is not None:
        check_compatible(ckpt, args, classes, resume_path)

    # ---- model
    model, reference, source = build_classifier(args, num_classes if tree is None else tree.sizes)
    if not args.finetune:
        # only the head (and --trainable-layers) learns; the rest gets no gradients at all
        for name, p in model.named_parameters():
            p.requires_grad = is_trainable(name, args.trainable_layers)
    model = place_model(model, env, args, networks=(model,))
    net = model.module if env.distributed else model
    if not reference:
        # random init: the reference is the init as DDP broadcast it from rank 0 (each rank drew its own)
        reference = backbone_state(net)
    mode = ("fine-tuning everything" if args.finetune else f"fine-tuning {', '.join(args.trainable_layers)}, the rest "
            f"frozen" if args.trainable_layers else "frozen backbone")
    heads = (f"{args.head} head, {num_classes} classes" if tree is None else
             f"one {args.head} head per level, " + ", ".join(f"{n} {name} classes" for n, name in
                                                             zip(tree.sizes, tree.level_names)))
    log(f"=> {args.arch} from {source}; {mode}, {heads}, {env.world_size} process(es) on {env.device}")

    if args.evaluate:
        load_model_state(model, ckpt["state_dict"])
        report = evaluate(model, val_dataset, classes, args, env, workers, tree)
        for line in level_lines(report):
            log(f"=> evaluation {line}")
        log(f"=> evaluation of {resume_path} on {report['num_samples']} val images: {summary_line(report)}")
        if is_main_process():
            write_report_files(report, args.output_dir, "_eval")
            with open(os.path.join(args.output_dir, "evaluation.json"), "w") as f:
                json.dump({"checkpoint": resume_path, **jsonable(report)}, f, indent=1)
        return

    train_data, subset_path = training_subset(train_base, args)
    counts = class_counts(train_data.targets, num_classes)
    train_dataset = TransformedDataset(train_data, augment.train_classifier(args.crop_size), args.strict_data,
                                       decode_side=augment.train_classifier_decode_side(args.crop_size))
    # --balanced-sampling and --class-weights balance the classes of one level (--balance-level)
    balance_targets, balance_classes = train_data.targets, num_classes
    if tree is not None:
        balance_targets = tree.level_targets(train_data.targets, args.balance_level - 1).tolist()
        balance_classes = tree.sizes[args.balance_level - 1]
    sampler = None
    if args.balanced_sampling:
        sampler = BalancedSampler(balance_targets, balance_classes, env.world_size, env.rank, seed=env.seed)
    loader, sampler = make_loader(train_dataset, batch_size, env, workers, env.seed, drop_last=False, sampler=sampler)
    iters_per_epoch = len(loader)
    log(f"=> {len(train_dataset)} training images" + (f" (label fraction {args.label_fraction}, subset saved to "
                                                       f"{subset_path})" if subset_path else "")
        + f", {len(val_dataset)} val images, {iters_per_epoch} iterations/epoch, batch {batch_size}/process; "
        f"images per class {min(counts)}..{max(counts)}")
    if tree is not None:
        for level, (name, n) in enumerate(zip(tree.level_names, tree.sizes)):
            c = class_counts(tree.level_targets(train_data.targets, level).tolist(), n)
            log(f"=> level {level + 1} ({name}): {n} classes, images per class {min(c)}..{max(c)}"
                + (" (balanced by --balanced-sampling/--class-weights)" if level + 1 == args.balance_level
                   and (args.balanced_sampling or args.class_weights) else ""))

    if args.probe == "logreg":
        # ---- logistic regression on the frozen features of the un-augmented training images,
        # fitted once (no lr, no epochs), written into the linear head
        fit_logreg_head(net, train_data, args, env, workers)
        report = evaluate(model, val_dataset, classes, args, env, workers, tree)
        log(f"=> logistic-regression probe on {len(train_data)} training images, val: {summary_line(report)}")
        if is_main_process():
            write_report_files(report, args.output_dir)
            write_report_files(report, args.output_dir, "_best")
            optimizer = torch.optim.SGD(net.fc.parameters(), 0.0)  # for the checkpoint's layout only
            save_checkpoint(training_state(model, optimizer, Precision.from_args(args).scaler(env.device), args,
                                           method="lincls", epoch=args.epochs, metrics=summary_record(report),
                                           best_acc1=report["acc1"], best_epoch=0, classes=classes),
                            args.output_dir, epoch_file=False, is_best=True)
        sanity_check(net, reference)
        write_results(args, len(train_data), num_classes, report["acc1"], 0, report, tree)
        return

    # ---- optimizer: the head only (frozen), or everything with a slower backbone (finetune)
    head_params = list(net.fc.parameters())
    if args.finetune or args.trainable_layers:
        backbone_params = [p for n, p in net.named_parameters() if not n.startswith("fc.") and p.requires_grad]
        groups = [{"params": backbone_params, "lr_scale": args.backbone_lr_scale}, {"params": head_params}]
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == len(head_params), "frozen mode: only the head may be trainable"
        groups = [{"params": head_params}]
    optimizer = torch.optim.SGD(groups, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = Precision.from_args(args).scaler(env.device)
    weight = class_weights(balance_targets, balance_classes).to(env.device) if args.class_weights else None
    if tree is None:
        criterion = nn.CrossEntropyLoss(weight=weight)
    else:
        criterion = HierarchicalLoss(tree, args.level_weights, args.balance_level - 1, weight).to(env.device)
    # the val loss of guessing, for the divergence warning: sum_l w_l log C_l for a hierarchy
    chance_classes = num_classes if tree is None else math.prod(n ** w for n, w in zip(tree.sizes, args.level_weights))

    start_epoch, best_acc1, best_epoch = 0, 0.0, -1
    if ckpt is not None:
        start_epoch, _ = restore_training_state(ckpt, model, optimizer, scaler)
        best_acc1, best_epoch = float(ckpt.get("best_acc1", 0.0)), int(ckpt.get("best_epoch", -1))
        log(f"=> resumed from {resume_path} at epoch {start_epoch} (best acc1 so far {best_acc1:.2f})")
        if args.pretrained == "none":
            reference = backbone_state(net)  # the random init lives in the checkpoint
        del ckpt

    if is_main_process():
        check_free_space(args.output_dir, 2 * checkpoint_bytes(model, optimizer))  # last + model_best
    metrics = MetricsLog(args.output_dir, tensorboard=args.tensorboard)
    metrics.drop_epochs_from(start_epoch)  # lines a kill left after the last checkpoint
    lr_fn = functools.partial(lr_at, base_lr=args.lr, epochs=args.epochs, schedule=args.schedule,
                              cos=args.cos, warmup_epochs=args.warmup_epochs)

    # ---- epochs: train, evaluate, checkpoint (best by val top-1)
    report, lowest_val_loss, warned = None, float("inf"), False
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, criterion, optimizer, scaler, epoch, iters_per_epoch, lr_fn, args, env,
                                metrics, tree)
        report = evaluate(model, val_dataset, classes, args, env, workers, tree)
        is_best = report["acc1"] > best_acc1 or best_epoch < 0
        if is_best:
            best_acc1, best_epoch = report["acc1"], epoch
        record = {"epoch": epoch, "lr": lr_fn(epoch + 1 - 1e-9), **stats, **summary_record(report),
                  "best_acc1": best_acc1}
        for line in level_lines(report):
            log(f"=> epoch {epoch} val {line}")
        log(f"=> epoch {epoch} val: {summary_line(report)}  (best acc1 {best_acc1:.2f} at epoch {best_epoch})")
        if not warned and diverging(report["val_loss"], lowest_val_loss, report["acc1"], best_acc1, chance_classes):
            warned = True
            log(f"=> warning: the probe is diverging (val_loss {report['val_loss']:.4g}; guessing gives "
                f"{math.log(chance_classes):.2f}; top-1 {report['acc1']:.1f}, best {best_acc1:.1f}): --lr {args.lr} is too "
                f"high for these features; add --head-bn (features standardised, e.g. --head-bn --lr 0.1) or lower --lr")
        lowest_val_loss = min(lowest_val_loss, report["val_loss"])
        metrics.write(record)
        if is_main_process():
            write_report_files(report, args.output_dir)
            if is_best:
                write_report_files(report, args.output_dir, "_best")
            keep = args.save_freq > 0 and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs)
            save_checkpoint(training_state(model, optimizer, scaler, args, method="lincls", epoch=epoch + 1,
                                           metrics=record, best_acc1=best_acc1, best_epoch=best_epoch,
                                           classes=classes),
                            args.output_dir, epoch_file=keep, is_best=is_best)

    if not args.finetune:
        sanity_check(net, reference, args.trainable_layers)
    if report is None:  # resumed a finished run: report its final state
        report = evaluate(model, val_dataset, classes, args, env, workers, tree)
    for line in level_lines(report):
        log(f"=> final {line}")
    log(f"=> final ({args.epochs} epochs, {len(train_dataset)} training images): {summary_line(report)}  "
        f"best acc1 {best_acc1:.2f} (epoch {best_epoch})")
    write_results(args, len(train_dataset), num_classes, best_acc1, best_epoch, report, tree)


def write_results(args: argparse.Namespace, num_train: int, num_classes: int, best_acc1: float, best_epoch: int,
                  report: Dict, tree: Optional[LabelTree]) -> None:
    """results.json (rank 0): the run's setup, best and final metrics."""
    if not is_main_process():
        return
    results = {"arch": args.arch, "pretrained": args.pretrained, "probe": args.probe, "head": args.head,
               "finetune": args.finetune, "trainable_layers": args.trainable_layers,
               "label_fraction": args.label_fraction, "epochs": args.epochs if args.probe == "sgd" else 0,
               "num_train_images": num_train, "num_classes": num_classes,
               "best_acc1": best_acc1, "best_epoch": best_epoch, "final": jsonable(report)}
    if tree is not None:  # best_acc1 is then the whole-path top-1; final.levels has every level's metrics
        results["hierarchy"] = {"level_names": tree.level_names, "classes": tree.classes,
                                "level_weights": args.level_weights, "balance_level": args.balance_level,
                                "balanced_sampling": args.balanced_sampling, "class_weights": args.class_weights}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"=> metrics in {os.path.join(args.output_dir, 'results.json')}")


main = script_main(get_args_parser, finalize_args, main_worker)


if __name__ == "__main__":
    main()
