"""How many checkpoints a run keeps, and the disk they need.

Every epoch checkpoint is a full copy of the model and optimizer (checkpoint_NNNN is a hard
link to checkpoint_last when written, but checkpoint_last is replaced by a new file at the
next save, so each kept epoch holds its own bytes). A recipe that picks hundreds of epochs
with --save-freq 1 would otherwise fill the disk, so a run keeps checkpoint_last, the
--keep-checkpoints most recent checkpoint_NNNN and those --keep-epochs names; and says
before its first step what that needs."""
import argparse
import os
import re
import shutil
from typing import Iterable, List, Optional, Sequence, Set

from common.errors import UserError

EPOCH_FILE = re.compile(r"^checkpoint_(\d{4,})\.pth\.tar$")


def epoch_file_due(args: argparse.Namespace, epochs_done: int) -> bool:
    """Whether the checkpoint after `epochs_done` epochs is also written as checkpoint_NNNN:
    every --save-freq epochs and the run's last (--save-freq 0: neither), and --keep-epochs."""
    return ((args.save_freq > 0 and (epochs_done % args.save_freq == 0 or epochs_done == args.epochs))
            or epochs_done in args.keep_epochs)


def prune_epoch_checkpoints(output_dir: str, keep: int, protected: Iterable[int] = ()) -> List[str]:
    """Delete the checkpoint_NNNN.pth.tar in `output_dir` beyond the `keep` most recent
    (0: none deleted), never one whose epoch is in `protected`; returns the names deleted."""
    if keep <= 0:
        return []
    kept_always: Set[int] = set(protected)
    found = sorted((int(m.group(1)), n) for n in os.listdir(output_dir) if (m := EPOCH_FILE.match(n)))
    prunable = [(e, n) for e, n in found if e not in kept_always]
    removed = []
    for _, name in prunable[:max(len(prunable) - keep, 0)]:
        try:
            os.remove(os.path.join(output_dir, name))
            removed.append(name)
        except FileNotFoundError:  # another process of the same run removed it first
            pass
    return removed


def planned_epoch_files(args: argparse.Namespace, start_epoch: int = 0) -> List[int]:
    """The checkpoint_NNNN epochs a run from `start_epoch` to --epochs writes."""
    return [e for e in range(start_epoch + 1, args.epochs + 1) if epoch_file_due(args, e)]


def checkpoint_disk_plan(args: argparse.Namespace, checkpoint_size: int, start_epoch: int = 0,
                         free: Optional[int] = None, other_files: Sequence[str] = ()) -> str:
    """One line for the log before the first step: the checkpoints the run will keep and the
    disk they need at their peak (the kept epoch files, checkpoint_last, the one being
    written and the `other_files`, e.g. main_lincls' model_best), with a warning sentence
    after it when `free` (default: the output folder's free bytes) is less."""
    written = planned_epoch_files(args, start_epoch)
    protected = [e for e in written if e in args.keep_epochs]
    others = len(written) - len(protected)
    kept = len(protected) + (others if args.keep_checkpoints <= 0 else min(others, args.keep_checkpoints))
    needed = (kept + 2 + len(other_files)) * checkpoint_size
    if free is None:
        free = shutil.disk_usage(args.output_dir).free
    what = ", ".join(["checkpoint_last", *other_files])
    if kept == len(written) and written:
        what += f" and {len(written)} checkpoint_NNNN"
    elif written:
        what += (f" and {kept} of {len(written)} checkpoint_NNNN (the {args.keep_checkpoints} most recent: "
                 f"--keep-checkpoints{', and --keep-epochs' if protected else ''})")
    line = (f"=> checkpoints: {what} at about {_size(checkpoint_size)} each need up to {_size(needed)} in "
            f"{args.output_dir} ({_size(free)} free)")
    if needed > free:
        line += (f"\nwarning: the checkpoints need about {_size(needed)} but {args.output_dir} has {_size(free)} free; "
                 f"lower --keep-checkpoints, raise --save-freq, or pass another --output-dir")
    return line


def check_retention_flags(args: argparse.Namespace) -> None:
    if args.keep_checkpoints < 0:
        raise UserError(f"--keep-checkpoints {args.keep_checkpoints} is negative; pass N >= 1 to keep the N most "
                        f"recent checkpoint_NNNN files, or 0 to keep every one")
    bad = [e for e in args.keep_epochs if e < 1]
    if bad:
        raise UserError(f"--keep-epochs {bad[0]} is not an epoch count; pass epochs done, from 1 to --epochs")


def _size(n: float) -> str:
    if n < 2 ** 30:
        return f"{n / 2 ** 20:.0f} MiB"
    return f"{n / 2 ** 30:.1f} GiB"
