"""The run state around the pretraining scripts' epoch loop: resume, the lr schedule, and
`PretrainRun`, which keeps a run's metrics log, kNN monitor, learning and collapse watches,
stop request and checkpoints. The recipe itself (augmentation, model, optimizer, the epoch
loop, and --export-at-end's export after it: export/ is a job folder, above common/) is in the
scripts; the step loop is common/train/step.py, which this module calls into only through the
scripts."""
import argparse
import functools
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from common.augment import transforms as augment
from common.ckpt.io import (
    check_free_space,
    checkpoint_bytes,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from common.ckpt.resume import check_arch, resolve_resume
from common.ckpt.retention import checkpoint_disk_plan, epoch_file_due, prune_epoch_checkpoints
from common.dist.collectives import DistEnv, is_main_process
from common.eval.monitor import KnnMonitor
from common.eval.payoff import Payoff
from common.log.progress import MetricsLog, log
from common.train.data import PretrainData
from common.train.preempt import StopRequest
from common.train.schedule import lr_at
from common.train.step import EpochResult
from common.watch.collapse import CollapseWatch, LearningWatch
from common.watch.view_check import view_check, view_check_message

# exit status of a run stopped by --stop-if-not-learning (2 is a usage error, 75 a requeue)
NOT_LEARNING_EXIT = 3


STUCK_EPOCHS_TO_STOP = 2  # one noisy epoch near chance does not stop a run


def resume_training(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scaler,
                    method: str) -> Tuple[int, int]:
    """`--resume PATH|auto`: restore everything and return (epoch, iteration) to continue at;
    (0, 0) for a fresh start."""
    path = resolve_resume(args.resume, args.output_dir)
    if not path:
        if args.resume == "auto":
            log(f"=> --resume auto: no checkpoint in {args.output_dir} yet, starting a new run")
        return 0, 0
    ckpt = load_checkpoint(path, expected_method=method)
    check_arch(ckpt, args.arch, path)
    start_epoch, start_iter = restore_training_state(ckpt, model, optimizer, scaler)
    log(f"=> resumed from {path} at epoch {start_epoch}" + (f", iteration {start_iter}" if start_iter else ""))
    return start_epoch, start_iter


def lr_schedule(args: argparse.Namespace, lr: float) -> Callable[[float], float]:
    """lr at a fractional epoch: `--warmup-epochs` linear warmup to `lr`, then cosine
    (`--cos`) or the step `--schedule`."""
    return functools.partial(lr_at, base_lr=lr, epochs=args.epochs, schedule=args.schedule, cos=args.cos,
                             warmup_epochs=args.warmup_epochs)


class PretrainRun:
    """What a pretraining run keeps besides model and optimizer: the resume point (it
    restores a --resume checkpoint when built), the
    metrics log, the kNN monitor, the stop request (SLURM preemption) and the checkpoints.
    The scripts' epoch loop calls `end_epoch` after each epoch and `save_and_requeue` when
    the step loop stopped for preemption; the step loop calls `save_due`/`save_mid_epoch`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, args: argparse.Namespace,
                 env: DistEnv, method: str, data: PretrainData, lr_fn: Callable[[float], float],
                 collapse_hint: str = "lower --lr", learning: Optional[LearningWatch] = None):
        self.model, self.optimizer, self.scaler, self.args, self.env = model, optimizer, scaler, args, env
        self.method, self.data, self.lr_fn = method, data, lr_fn
        # --resume: restores model, optimizer, scaler and RNG; start_iter iterations of
        # start_epoch are already done (a mid-epoch checkpoint)
        self.start_epoch, self.start_iter = resume_training(args, model, optimizer, scaler, method)
        if is_main_process():
            size = checkpoint_bytes(model, optimizer)
            check_free_space(args.output_dir, size)
            log(checkpoint_disk_plan(args, size, self.start_epoch))
        self.metrics = MetricsLog(args.output_dir, tensorboard=args.tensorboard)
        # a kill between an epoch's metrics line and its checkpoint would repeat that line
        self.metrics.drop_epochs_from(self.start_epoch)
        self.knn = KnnMonitor(args, env) if args.knn_every else None
        self.payoff = Payoff(args, env) if args.payoff else None
        self.untrained: Dict[str, float] = {}  # before_training's, for the first metrics line
        self.stop = StopRequest(env)
        # (a resumed run starts watching afresh: a collapse across the resume point goes unnoticed)
        self.collapse = CollapseWatch(collapse_hint)
        self.learning = learning  # contrastive methods: is the accuracy leaving chance?
        # (state, path) of the checkpoint of the run's last epoch, on the main process once it
        # is written: what the scripts' --export-at-end exports after the epoch loop
        self.final_checkpoint: Optional[Tuple[Dict, str]] = None

    def before_training(self, backbone: nn.Module) -> None:
        """What the run starts from, to compare the trained network with: --knn-every's kNN
        of the untrained `backbone` on a fresh run (BatchNorm statistics from the train
        images, as the trained network's will be), printed and kept in the first epoch's
        metrics as knn_top1_untrained; and the payoff probe's baselines (common/eval/payoff.py)."""
        fresh = not (self.start_epoch or self.start_iter)
        if self.payoff is not None:
            self.payoff.start(backbone, resumed=not fresh)
        if self.knn is None or not fresh:
            return
        before = self.knn.evaluate_untrained(backbone)
        if before:
            self.untrained = {f"{k}_untrained": v for k, v in before.items()}
            log(f"=> kNN before training: top-1 {before['knn_top1']:.1f} (the initial weights, BatchNorm statistics "
                f"from the train images)")

    def check_views(self, recipe: augment.Recipe) -> None:
        """A fresh run's view check (common/watch/view_check.py): do two views of an image still
        look alike? Printed before the first step, with what to try when they do not."""
        if self.start_epoch or self.start_iter or not is_main_process() or len(self.data.dataset) < 2:
            return  # (one image has no other to compare its views with)
        result = view_check(self.data.dataset.base, recipe, self.args.arch, self.args.small_images, self.env.device)
        log(view_check_message(result, self.learning.hint if self.learning is not None else "milder augmentations"))

    def save_due(self, done: int) -> bool:
        """--save-every-iters: a mid-epoch checkpoint after `done` iterations (the epoch's last
        is followed by the epoch-end checkpoint anyway)."""
        every = self.args.save_every_iters
        return bool(every) and done % every == 0 and done != self.data.iters_per_epoch

    def save_mid_epoch(self, epoch: int, iteration: int) -> None:
        """checkpoint_last.pth.tar at (epoch, iteration): resume continues this epoch there."""
        if is_main_process():
            state = training_state(self.model, self.optimizer, self.scaler, self.args, method=self.method,
                                   epoch=epoch, iteration=iteration)
            path = save_checkpoint(state, self.args.output_dir, epoch_file=False)
            log(f"=> saved mid-epoch checkpoint {path} (epoch {epoch}, iteration {iteration})")

    def save_and_requeue(self, epoch: int, iteration: int) -> int:
        """Preemption: the mid-epoch checkpoint, `scontrol requeue`; returns the exit code."""
        self.save_mid_epoch(epoch, iteration)
        return self.stop.requeue()

    def end_epoch(self, epoch: int, result: EpochResult, backbone: nn.Module) -> Dict[str, float]:
        """kNN monitor on `backbone` (every --knn-every epochs and the last), one line in
        metrics.jsonl and the log, and the epoch's checkpoint. Returns the metrics record."""
        stats = dict(result.stats)
        if self.start_iter:  # the averages cover only the iterations after the resume
            stats["resumed_at_iteration"] = self.start_iter
        self.start_iter = 0
        stats["skipped_images"] = int(self.data.dataset.skipped.item())
        a = self.args
        if self.knn is not None and ((epoch + 1) % a.knn_every == 0 or epoch + 1 == a.epochs):
            stats.update(self.knn.evaluate(backbone))
        stopping = epoch + 1 == a.stop_at_epoch < a.epochs
        if self.payoff is not None and (epoch + 1 == a.epochs or stopping
                                        or (a.knn_every and (epoch + 1) % a.knn_every == 0)):
            stats.update(self.payoff.measure(backbone, epoch))
        record = {"epoch": epoch, "lr": self.lr_fn(epoch + 1 - 1e-9), **stats, **self.untrained}
        self.untrained = {}
        collapsed = self.collapse.update(epoch, stats["acc1"]) if "acc1" in stats else None
        record["collapsed"] = collapsed is not None
        stuck = self.learning.update(epoch, stats["acc1"]) if self.learning is not None and "acc1" in stats else None
        if self.learning is not None:
            record["not_learning"] = stuck is not None
        log(f"=> epoch {epoch} done: " + "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                   if k not in ("epoch", "collapsed", "not_learning"))
            + "".join(f"  WARNING: {w}" for w in (collapsed, stuck) if w))
        self.metrics.write(record)
        if is_main_process():
            # the size the payoff probe chose for source-scale views: the probes' default (follow_checkpoint)
            chosen = {"eval_size": self.payoff.eval_size} if self.payoff is not None and self.payoff.eval_size else {}
            state = training_state(self.model, self.optimizer, self.scaler, a, method=self.method, epoch=epoch + 1,
                                   metrics=record, **chosen)
            path = save_checkpoint(state, a.output_dir, epoch_file=epoch_file_due(a, epoch + 1))
            prune_epoch_checkpoints(a.output_dir, a.keep_checkpoints, a.keep_epochs)
            if epoch + 1 == a.epochs:  # exported after the loop, so a failed export loses no training
                self.final_checkpoint = (state, path)
        if stopping:
            log(f"=> --stop-at-epoch {a.stop_at_epoch}: stopping after epoch {epoch} of {a.epochs}; --resume auto "
                f"continues the same schedule")
            raise SystemExit(0)
        if stuck and a.stop_if_not_learning and self.learning.stuck_epochs >= STUCK_EPOCHS_TO_STOP:
            log(f"=> --stop-if-not-learning: stopping after epoch {epoch}; the checkpoint is kept (--resume auto "
                f"continues it, e.g. with --epochs of a new recipe)")
            raise SystemExit(NOT_LEARNING_EXIT)
        return record
