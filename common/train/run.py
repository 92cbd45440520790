"""What a pretraining run keeps besides model, optimizer and checkpoints: the lr schedule,
and `PretrainRun`, the run's monitors: its metrics log, kNN monitor, payoff probe, learning
and collapse watches, and the stop requests (SLURM preemption, --stop-at-epoch,
--stop-if-not-learning). The recipe itself (augmentation, model, optimizer, resume and the
checkpoint writes of common/ckpt/checkpoints.py, the epoch loop, and --export-at-end's
export after it) is in the scripts; the step loop is common/train/step.py, which this module
calls into only through the scripts."""
import argparse
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch.nn as nn

from common.augment import transforms as augment
from common.ckpt.checkpoints import Checkpoints
from common.distributed.collectives import DistEnv, is_main_process
from common.eval.monitor import KnnMonitor
from common.eval.payoff import Payoff
from common.log.progress import MetricsLog, log
from common.train.data import PretrainData
from common.train.preempt import StopRequest
from common.train.schedule import lr_at
from common.train.step import EpochResult
from common.watch.collapse import CollapseWatch, LearningWatch, StdWatch
from common.data.channels import channels_of
from common.watch.view_check import view_check, view_check_message

# exit status of a run stopped by --stop-if-not-learning (2 is a usage error, 75 a requeue)
NOT_LEARNING_EXIT = 3


STUCK_EPOCHS_TO_STOP = 2  # one noisy epoch near chance does not stop a run


def lr_schedule(args: argparse.Namespace, lr: float) -> Callable[[float], float]:
    """lr at a fractional epoch: `--warmup-epochs` linear warmup to `lr`, then cosine
    (`--cos`) or the step `--schedule`."""
    return functools.partial(lr_at, base_lr=lr, epochs=args.epochs, schedule=args.schedule, cos=args.cos,
                             warmup_epochs=args.warmup_epochs)


class PretrainRun:
    """A pretraining run's monitors, built after the script's resume (`start`: the (epoch,
    iteration) its Checkpoints.resume returned): the metrics log, the kNN monitor, the payoff
    probe, the collapse and learning watches, and the stop request (SLURM preemption). The
    scripts' epoch loop calls `end_epoch` after each epoch, writes the epoch's checkpoint with
    `checkpoint_keys`, then calls `stop_if_asked`; the step loop calls `save_due` and
    `save_mid_epoch`, which writes through the script's `checkpoints`."""

    def __init__(self, args: argparse.Namespace, env: DistEnv, data: PretrainData, lr_fn: Callable[[float], float],
                 start: Tuple[int, int], checkpoints: Checkpoints, collapse_hint: str = "lower --lr",
                 learning: Optional[Union[LearningWatch, StdWatch]] = None):
        self.args, self.env, self.data, self.lr_fn, self.checkpoints = args, env, data, lr_fn, checkpoints
        # start_iter iterations of start_epoch are already done (a mid-epoch checkpoint)
        self.start_epoch, self.start_iter = start
        self.metrics = MetricsLog(args.output_dir, tensorboard=args.tensorboard)
        # a kill between an epoch's metrics line and its checkpoint would repeat that line
        self.metrics.drop_epochs_from(self.start_epoch)
        self.knn = KnnMonitor(args, env) if args.knn_every else None
        self.payoff = Payoff(args, env) if args.payoff else None
        self.untrained: Dict[str, float] = {}  # before_training's, for the first metrics line
        self.stop = StopRequest(env)
        # (a resumed run starts watching afresh: a collapse across the resume point goes unnoticed)
        self.collapse = CollapseWatch(collapse_hint)
        # contrastive methods: is the accuracy leaving chance? BYOL/SimSiam: is the output spread?
        self.learning = learning
        self.stuck: Optional[str] = None  # the learning watch's warning of the last epoch
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

    def check_views(self, recipe: augment.Views) -> None:
        """A fresh run's view check (common/watch/view_check.py): do two views of an image still
        look alike? Printed before the first step, with what to try when they do not."""
        if self.start_epoch or self.start_iter or not is_main_process() or len(self.data.dataset) < 2:
            return  # (one image has no other to compare its views with)
        recipe = augment.views_for(recipe, channels_of(self.args))[0]
        result = view_check(self.data.dataset.base, recipe, self.args.arch, self.args.small_images, self.env.device)
        log(view_check_message(result, self.learning.hint if self.learning is not None else "milder augmentations"))

    def log_step(self, step: int, values: Dict[str, float]) -> None:
        """A progress line's values (`step`: iterations since the run began): metrics.jsonl, and
        the learning watch's per-line judgement (StdWatch: a collapse is told at once)."""
        self.metrics.step(step, values)
        watched = self._watched(values)
        if watched is not None:
            warning = self.learning.step(*watched)
            if warning:
                log(f"WARNING: {warning}")

    def _watched(self, values: Dict[str, float]) -> Optional[List[float]]:
        """The learning watch's statistics (its `stats`, in order) from `values`; None without
        a watch or when one is missing."""
        if self.learning is None or any(k not in values for k in self.learning.stats):
            return None
        return [values[k] for k in self.learning.stats]

    def save_due(self, done: int) -> bool:
        """--save-every-iters: a mid-epoch checkpoint after `done` iterations (the epoch's last
        is followed by the epoch-end checkpoint anyway)."""
        every = self.args.save_every_iters
        return bool(every) and done % every == 0 and done != self.data.iters_per_epoch

    def save_mid_epoch(self, epoch: int, iteration: int) -> None:
        """checkpoint_last.pth.tar at (epoch, iteration): resume continues this epoch there."""
        self.checkpoints.save_mid_epoch(epoch, iteration)

    def end_epoch(self, epoch: int, result: EpochResult, backbone: nn.Module) -> Dict[str, float]:
        """kNN monitor on `backbone` (every --knn-every epochs and the last), the payoff probe,
        the watches, and one line in metrics.jsonl and the log. Returns the metrics record,
        which the script stores in the epoch's checkpoint."""
        stats = dict(result.stats)
        if self.start_iter:  # the averages cover only the iterations after the resume
            stats["resumed_at_iteration"] = self.start_iter
        self.start_iter = 0
        stats["skipped_images"] = int(self.data.dataset.skipped.item())
        a = self.args
        if self.knn is not None and ((epoch + 1) % a.knn_every == 0 or epoch + 1 == a.epochs):
            stats.update(self.knn.evaluate(backbone))
        if self.payoff is not None and (epoch + 1 == a.epochs or self._stopping_at(epoch)
                                        or (a.knn_every and (epoch + 1) % a.knn_every == 0)):
            stats.update(self.payoff.measure(backbone, epoch))
        record = {"epoch": epoch, "lr": self.lr_fn(epoch + 1 - 1e-9), **stats, **self.untrained}
        self.untrained = {}
        collapsed = self.collapse.update(epoch, stats["acc1"]) if "acc1" in stats else None
        record["collapsed"] = collapsed is not None
        watched = self._watched(stats)
        stuck = self.learning.update(epoch, *watched) if watched is not None else None
        if self.learning is not None:
            record["not_learning"] = stuck is not None
        self.stuck = stuck
        log(f"=> epoch {epoch} done: " + "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                   if k not in ("epoch", "collapsed", "not_learning"))
            + "".join(f"  WARNING: {w}" for w in (collapsed, stuck) if w))
        self.metrics.write(record)
        return record

    def checkpoint_keys(self) -> Dict[str, Any]:
        """The run's own keys for the epoch's checkpoint: `eval_size`, the size the payoff probe
        chose for source-scale views (the probes' default: follow_checkpoint), when it chose one."""
        return {"eval_size": self.payoff.eval_size} if self.payoff is not None and self.payoff.eval_size else {}

    def _stopping_at(self, epoch: int) -> bool:
        return epoch + 1 == self.args.stop_at_epoch < self.args.epochs

    def stop_if_asked(self, epoch: int) -> None:
        """After the epoch's checkpoint: --stop-at-epoch (exit 0) and --stop-if-not-learning
        (exit NOT_LEARNING_EXIT) end the run here; --resume auto continues it."""
        a = self.args
        if self._stopping_at(epoch):
            log(f"=> --stop-at-epoch {a.stop_at_epoch}: stopping after epoch {epoch} of {a.epochs}; --resume auto "
                f"continues the same schedule")
            raise SystemExit(0)
        if self.stuck and a.stop_if_not_learning and self.learning.stuck_epochs >= STUCK_EPOCHS_TO_STOP:
            log(f"=> --stop-if-not-learning: stopping after epoch {epoch}; the checkpoint is kept (--resume auto "
                f"continues it, e.g. with --epochs of a new recipe)")
            raise SystemExit(NOT_LEARNING_EXIT)
