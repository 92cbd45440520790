"""main_lincls.py's bookkeeping around its epoch loop: resuming the probe's best so far, the
lr schedule, the checkpoint disk plan, and after each epoch the best val top-1, the val lines,
the divergence warning, the metrics line and the report files; at the end the final lines and
results.json. The checkpoint write itself is in the script."""
import argparse
import functools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from common.ckpt.io import check_free_space, checkpoint_bytes, restore_training_state
from common.ckpt.retention import checkpoint_disk_plan
from common.distributed.collectives import is_main_process
from common.eval.label_tree import LabelTree
from common.log.progress import MetricsLog, log
from common.train.schedule import lr_at
from lincls.train_eval import diverging
from lincls.reports import level_lines, summary_line, summary_record, write_report_files, write_results


def resume_probe(ckpt: Optional[Dict], path: Optional[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler) -> Tuple[int, float, int]:
    """Restore model, optimizer, scaler and RNG from a lincls checkpoint; returns the epoch to
    continue at and the best val top-1 so far with its epoch ((0, 0.0, -1) without one: a
    fresh probe)."""
    if ckpt is None:
        return 0, 0.0, -1
    start_epoch, _ = restore_training_state(ckpt, model, optimizer, scaler)
    best_acc1, best_epoch = float(ckpt.get("best_acc1", 0.0)), int(ckpt.get("best_epoch", -1))
    log(f"=> resumed from {path} at epoch {start_epoch} (best acc1 so far {best_acc1:.2f})")
    return start_epoch, best_acc1, best_epoch


class ProbeEpochs:
    """The probe's run state besides model and optimizer: the lr schedule (`lr_fn`: lr at a
    fractional epoch, --warmup-epochs then cosine or the step --schedule), the metrics log
    (lines a kill left after the last checkpoint dropped), the best val top-1 and its epoch,
    and the divergence warning (once a run)."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
                 start_epoch: int, best_acc1: float, best_epoch: int, chance_classes: int):
        if is_main_process():
            size = checkpoint_bytes(model, optimizer)
            check_free_space(args.output_dir, 2 * size)  # last + model_best
            log(checkpoint_disk_plan(args, size, start_epoch, other_files=("model_best",)))
        self.metrics = MetricsLog(args.output_dir, tensorboard=args.tensorboard)
        self.metrics.drop_epochs_from(start_epoch)  # lines a kill left after the last checkpoint
        self.lr_fn = functools.partial(lr_at, base_lr=args.lr, epochs=args.epochs, schedule=args.schedule,
                                       cos=args.cos, warmup_epochs=args.warmup_epochs)
        self.args, self.chance_classes = args, chance_classes
        self.best_acc1, self.best_epoch = best_acc1, best_epoch
        self.lowest_val_loss, self.warned = float("inf"), False

    def end_epoch(self, epoch: int, stats: Dict[str, float], report: Dict) -> Tuple[Dict[str, float], bool]:
        """After epoch `epoch`'s evaluation `report`: the best so far, the val lines, the
        divergence warning, the metrics line, and (main process) the report CSVs, `_best`
        ones when this epoch is the best. Returns the metrics record and whether it is."""
        args = self.args
        is_best = report["acc1"] > self.best_acc1 or self.best_epoch < 0
        if is_best:
            self.best_acc1, self.best_epoch = report["acc1"], epoch
        best_acc1 = self.best_acc1
        record = {"epoch": epoch, "lr": self.lr_fn(epoch + 1 - 1e-9), **stats, **summary_record(report),
                  "best_acc1": best_acc1}
        for line in level_lines(report):
            log(f"=> epoch {epoch} val {line}")
        log(f"=> epoch {epoch} val: {summary_line(report)}  (best acc1 {best_acc1:.2f} at epoch {self.best_epoch})")
        if not self.warned and diverging(report["val_loss"], self.lowest_val_loss, report["acc1"], best_acc1,
                                         self.chance_classes):
            self.warned = True
            log(f"=> warning: the probe is diverging (val_loss {report['val_loss']:.4g}; guessing gives "
                f"{math.log(self.chance_classes):.2f}; top-1 {report['acc1']:.1f}, best {best_acc1:.1f}): --lr "
                f"{args.lr} is too high for these features; add --head-bn (features standardised, e.g. --head-bn "
                f"--lr 0.1) or lower --lr")
        self.lowest_val_loss = min(self.lowest_val_loss, report["val_loss"])
        self.metrics.write(record)
        if is_main_process():
            write_report_files(report, args.output_dir)
            if is_best:
                write_report_files(report, args.output_dir, "_best")
        return record, is_best

    def checkpoint_keys(self) -> Dict[str, object]:
        """What a lincls checkpoint stores besides the training state: the best val top-1 so far
        and its epoch (resume_probe reads them back)."""
        return {"best_acc1": self.best_acc1, "best_epoch": self.best_epoch}

    def finish(self, report: Dict, num_train: int, num_classes: int, tree: Optional[LabelTree]) -> None:
        """The final evaluation's lines and results.json."""
        for line in level_lines(report):
            log(f"=> final {line}")
        log(f"=> final ({self.args.epochs} epochs, {num_train} training images): {summary_line(report)}  "
            f"best acc1 {self.best_acc1:.2f} (epoch {self.best_epoch})")
        write_results(self.args, num_train, num_classes, self.best_acc1, self.best_epoch, report, tree)
