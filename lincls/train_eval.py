"""The classifier's step loop: its optimizer and loss, one training epoch, the evaluation
of the whole val split after it, and the warning sign of a probe whose lr is too high."""
import argparse
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed.collectives import DistEnv
from common.distributed.world import per_worker
from common.eval.features import extract_features
from common.eval.label_tree import LabelTree
from common.eval.metrics import classification_report
from common.log.progress import MeterBank, MetricsLog, Progress, log
from common.nets.backbones import block_modules
from common.nets.precision import Precision
from common.train.schedule import set_lr
from common.watch.loss_guard import LossGuard
from lincls.balance import class_weights
from lincls.data import TrainingData
from lincls.hierarchy import HierarchicalLoss, hierarchical_report


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, iters_per_epoch: int, lr_fn,
                    args: argparse.Namespace, env: DistEnv, metrics: MetricsLog,
                    tree: Optional[LabelTree] = None, first_epoch: bool = False) -> Dict[str, float]:
    """One epoch of SGD on the head (and --trainable-layers, or everything with --finetune);
    returns the epoch's mean train loss and top-1 and the share of time spent waiting for data.
    `first_epoch`: the first this process trains, which prints the run's ETA early."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if args.finetune:
        model.train()
    else:
        # frozen: BN statistics must not move (eval mode); the head (and --trainable-layers) train
        model.eval()
        net.fc.train()
        for block in block_modules(net, args.trainable_layers):  # `body.features.7` for a wrapped family
            block.train()
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
        if first_epoch and (eta := progress.run_eta(it)):
            log(eta)
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


def build_optimizer(model: nn.Module, net: nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD on the head only (frozen backbone), or on everything that requires grad with the
    backbone's lr scaled by --backbone-lr-scale (--finetune, --trainable-layers)."""
    head_params = list(net.fc.parameters())
    if args.finetune or args.trainable_layers:
        backbone_params = [p for n, p in net.named_parameters() if not n.startswith("fc.") and p.requires_grad]
        groups = [{"params": backbone_params, "lr_scale": args.backbone_lr_scale}, {"params": head_params}]
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == len(head_params), "frozen mode: only the head may be trainable"
        groups = [{"params": head_params}]
    return torch.optim.SGD(groups, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def build_criterion(args: argparse.Namespace, num_classes: int, tree: Optional[LabelTree], train: TrainingData,
                    device: torch.device) -> Tuple[nn.Module, float]:
    """The loss (per-level for a hierarchy; --class-weights weighting --balance-level's
    classes) and the number of classes whose guessing loss, log C, the divergence warning
    compares with."""
    weight = class_weights(train.balance_targets, train.balance_classes).to(device) if args.class_weights else None
    if tree is None:
        criterion = nn.CrossEntropyLoss(weight=weight)
    else:
        criterion = HierarchicalLoss(tree, args.level_weights, args.balance_level - 1, weight).to(device)
    # sum_l w_l log C_l for a hierarchy
    chance_classes = num_classes if tree is None else math.prod(n ** w for n, w in zip(tree.sizes, args.level_weights))
    return criterion, chance_classes
