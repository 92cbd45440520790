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
import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common.ckpt.io import load_model_state, prepare_output_dir, save_checkpoint, training_state
from common.ckpt.pretrained import follow_checkpoint
from common.ckpt.resume import resolve_resume, resumed_args, run_seed
from common.ckpt.retention import epoch_file_due, prune_epoch_checkpoints
from common.cli import (ArgumentParser, add_hierarchy_args, add_label_subset_args, add_training_args,
                        check_training_flags, switch)
from common.distributed.collectives import DistEnv, is_main_process
from common.distributed.launch import script_main, start_worker
from common.distributed.world import expected_world_size, is_first_process, per_worker
from common.errors import UserError
from common.eval.label_tree import LabelTree
from common.eval.inputs import check_label_subset_args, eval_splits, eval_view
from common.log.progress import log
from common.nets.precision import Precision
from lincls.data import TrainingData, check_classes, log_training_data, training_data
from lincls.train_eval import build_criterion, build_optimizer, evaluate, train_one_epoch
from lincls.epochs import ProbeEpochs, resume_probe
from lincls.heads import backbone_state, parse_trainable_layers, place_classifier
from lincls.hierarchy import CLASSIFIER_FLAGS, check_hierarchy_flags
from lincls.logreg import fit_logreg_head
from lincls.reports import jsonable, level_lines, summary_line, summary_record, write_report_files, write_results
from lincls.resume import probe_checkpoint
from lincls.sanity import sanity_check

# (lr, weight decay) when not given: the reference linear probe; fine-tuning the whole
# network needs a far smaller step (its backbone lr is further scaled by --backbone-lr-scale)
LINEAR_PROBE_DEFAULTS = (30.0, 0.0)
MLP_PROBE_DEFAULTS = (0.1, 0.0)
FINETUNE_DEFAULTS = (0.1, 1e-4)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Linear probe / fine-tuning of a pretrained backbone")
    add_training_args(parser, lr=LINEAR_PROBE_DEFAULTS[0], epochs=100, batch_size=256, schedule=(60, 80),
                      weight_decay=LINEAR_PROBE_DEFAULTS[1], name="lincls", helps={
                          "crop_size": "crop size (default: the --pretrained run's crop, else 224; 32 for "
                                       "CIFAR/MNIST/synthetic, 96 for STL-10)",
                          "lr": "initial learning rate, absolute: used as given whatever -b (default: 30 linear "
                                "probe, 0.1 --head mlp, 0.1 --finetune)",
                          "weight_decay": "weight decay (default: 0 probe, 1e-4 --finetune)",
                          "save_freq": "also keep checkpoint_NNNN.pth.tar every N epochs (default 0: only "
                                       "checkpoint_last.pth.tar and model_best.pth.tar)"},
                      pretrained=False)  # --pretrained: required unless --evaluate (finalize_args)
    # None = "not given": the default depends on --head and --finetune (finalize_args)
    parser.set_defaults(lr=None, weight_decay=None, save_freq=0)
    g = parser.add_argument_group("classifier")
    g.add_argument("--head", default="linear", choices=("linear", "mlp"),
                   help="classifier on the features: linear, or mlp = Linear-ReLU-Dropout-Linear")
    g.add_argument("--probe", default="sgd", choices=("sgd", "logreg"),
                   help="how a frozen linear head is trained: sgd (the reference protocol: augmented images, "
                        "--lr/--epochs), or logreg (logistic regression on the features of the un-augmented "
                        "images, L-BFGS to convergence with a fixed L2: nothing to tune, the recommended probe "
                        "for small label sets, where lr 30 diverges)")
    switch(g, "--head-bn",
           help="BatchNorm without affine parameters before the head (as MAE's linear probe): the features are "
                "standardised, so one lr suits backbones whose feature scales differ")
    g.add_argument("--mlp-hidden-dim", default=0, type=int, help="hidden width of --head mlp (default: feature width)")
    g.add_argument("--dropout", default=0.5, type=float, help="dropout of --head mlp")
    switch(g, "--finetune", help="train the whole network end to end instead of a frozen backbone")
    g.add_argument("--trainable-layers", default="", metavar="NAMES",
                   help="fine-tune only these backbone blocks (comma-separated; ResNet: conv1,bn1,layer1..layer4, e.g. "
                        "layer3,layer4; other families: docs/backbones.md, and a wrong name lists the "
                        "network's) plus the head; the rest stays frozen and in eval mode")
    g.add_argument("--backbone-lr-scale", default=0.1, type=float,
                   help="with --finetune or --trainable-layers: the backbone's lr is --lr times this")
    switch(g, "-e", "--evaluate",
           help="only evaluate the classifier given by --resume (e.g. model_best.pth.tar) on the val split")
    g = add_label_subset_args(parser, "the probe trains")
    switch(g, "--balanced-sampling", help="oversample small classes (WeightedRandomSampler, weight 1/class size)")
    switch(g, "--class-weights", help="weight the loss by N / (C * class size) for imbalanced data")
    add_hierarchy_args(parser, CLASSIFIER_FLAGS)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject impossible combinations before any worker starts."""
    check_training_flags(args)
    args.output_dir = args.output_dir or os.path.join("runs", "lincls")
    prepare_output_dir(args.output_dir, new_run=not (args.resume or args.evaluate), overwrite=args.overwrite,
                       lock=is_first_process(args))
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
    follow_checkpoint(args)  # -a, the crop and the stem of the pretraining run unless given
    args.trainable_layers = parse_trainable_layers(args.trainable_layers, args.finetune)
    tuned = args.finetune or bool(args.trainable_layers)
    lr, wd = FINETUNE_DEFAULTS if tuned else MLP_PROBE_DEFAULTS if args.head == "mlp" else LINEAR_PROBE_DEFAULTS
    args.lr = lr if args.lr is None else args.lr
    args.weight_decay = wd if args.weight_decay is None else args.weight_decay
    check_label_subset_args(args)
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    check_hierarchy_flags(args)
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


def main_worker(local_rank, args: argparse.Namespace) -> None:
    """The SGD probe (or fine-tuning): train the head for --epochs, evaluating the val split
    after each epoch; --evaluate and --probe logreg branch off once their inputs exist."""
    env, batch_size, workers = start_worker(local_rank, args)

    # ---- data: labelled train and val, same classes (two at least). With --hierarchy-depth the
    # classes are the deepest level's paths and the tree maps them up
    splits = eval_splits(args, needs="main_lincls.py", partly_labelled_train=True)
    classes, tree = splits.classes, splits.tree
    check_classes(classes)
    val_dataset = eval_view(splits.val, args)

    # a checkpoint to continue (--resume) or to evaluate: read now, it fixes the head to build
    resume_path, ckpt = probe_checkpoint(args, classes)

    # ---- model
    model, net, reference = place_classifier(args, env, len(classes), tree)
    if args.evaluate:
        return evaluate_checkpoint(model, ckpt, resume_path, val_dataset, classes, args, env, workers, tree)
    train = training_data(splits.train, args, env, batch_size, workers, tree)
    log_training_data(train, len(val_dataset), batch_size, args, tree)
    if args.probe == "logreg":
        return logreg_probe(model, net, reference, train, val_dataset, classes, args, env, workers, tree)

    # ---- optimizer: the head only (frozen), or everything with a slower backbone (finetune)
    optimizer = build_optimizer(model, net, args)
    scaler = Precision.from_args(args).scaler(env.device)
    criterion, chance_classes = build_criterion(args, len(classes), tree, train, env.device)

    # ---- resume: model, optimizer, scaler, RNG and the best val top-1 so far (a fresh probe: epoch 0)
    start_epoch, best_acc1, best_epoch = resume_probe(ckpt, resume_path, model, optimizer, scaler)
    if ckpt is not None and args.pretrained == "none":
        reference = backbone_state(net)  # the random init lives in the checkpoint
    del ckpt
    # the lr schedule, disk plan, metrics log, best so far and divergence warning (lincls/epochs.py)
    run = ProbeEpochs(args, model, optimizer, start_epoch, best_acc1, best_epoch, chance_classes)

    # ---- epochs: train, evaluate, checkpoint (best by val top-1)
    report = None
    for epoch in range(start_epoch, args.epochs):
        train.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, train.loader, criterion, optimizer, scaler, epoch, len(train.loader),
                                run.lr_fn, args, env, run.metrics, tree, first_epoch=epoch == start_epoch)
        report = evaluate(model, val_dataset, classes, args, env, workers, tree)
        record, is_best = run.end_epoch(epoch, stats, report)  # val lines, metrics line, report CSVs
        if is_main_process():
            save_checkpoint(training_state(model, optimizer, scaler, args, method="lincls", epoch=epoch + 1,
                                           metrics=record, **run.checkpoint_keys(), classes=classes),
                            args.output_dir, epoch_file=epoch_file_due(args, epoch + 1), is_best=is_best)
            prune_epoch_checkpoints(args.output_dir, args.keep_checkpoints, args.keep_epochs)

    if not args.finetune:
        sanity_check(net, reference, args.trainable_layers)
    if report is None:  # resumed a finished run: report its final state
        report = evaluate(model, val_dataset, classes, args, env, workers, tree)
    run.finish(report, len(train.dataset), len(classes), tree)  # final lines, results.json


def evaluate_checkpoint(model: nn.Module, ckpt: Dict, resume_path: str, val_dataset: Dataset, classes: List[str],
                        args: argparse.Namespace, env: DistEnv, workers: int, tree: Optional[LabelTree]) -> None:
    """--evaluate: the --resume classifier on the val split, into OUTPUT_DIR/evaluation.json
    and the *_eval.csv reports; nothing is trained."""
    load_model_state(model, ckpt["state_dict"])
    report = evaluate(model, val_dataset, classes, args, env, workers, tree)
    for line in level_lines(report):
        log(f"=> evaluation {line}")
    log(f"=> evaluation of {resume_path} on {report['num_samples']} val images: {summary_line(report)}")
    if is_main_process():
        write_report_files(report, args.output_dir, "_eval")
        with open(os.path.join(args.output_dir, "evaluation.json"), "w") as f:
            json.dump({"checkpoint": resume_path, **jsonable(report)}, f, indent=1)


def logreg_probe(model: nn.Module, net: nn.Module, reference: Dict[str, torch.Tensor], train: TrainingData,
                 val_dataset: Dataset, classes: List[str], args: argparse.Namespace, env: DistEnv, workers: int,
                 tree: Optional[LabelTree]) -> None:
    """--probe logreg: logistic regression on the frozen features of the un-augmented training
    images, fitted once (no lr, no epochs), written into the linear head, evaluated and saved
    as the run's one checkpoint."""
    fit_logreg_head(net, train.images, args, env, workers)
    report = evaluate(model, val_dataset, classes, args, env, workers, tree)
    log(f"=> logistic-regression probe on {len(train.images)} training images, val: {summary_line(report)}")
    if is_main_process():
        write_report_files(report, args.output_dir)
        write_report_files(report, args.output_dir, "_best")
        optimizer = torch.optim.SGD(net.fc.parameters(), 0.0)  # for the checkpoint's layout only
        save_checkpoint(training_state(model, optimizer, Precision.from_args(args).scaler(env.device), args,
                                       method="lincls", epoch=args.epochs, metrics=summary_record(report),
                                       best_acc1=report["acc1"], best_epoch=0, classes=classes),
                        args.output_dir, epoch_file=False, is_best=True)
    sanity_check(net, reference)
    write_results(args, len(train.images), len(classes), report["acc1"], 0, report, tree)


main = script_main(get_args_parser, finalize_args, main_worker)


if __name__ == "__main__":
    main()
