"""Stopping a run whose loss went NaN/inf before a checkpoint can save its weights
(pretraining and the classifier)."""
import argparse
import os

import torch

from common.distributed.collectives import all_reduce_max
from common.errors import UserError


class LossGuard:
    """Stops a run whose loss went NaN/inf before a checkpoint can save its weights. The
    first bad iteration is recorded on the device (no host sync per step); `check()`
    reads it where the loop syncs anyway (progress lines, the epoch's end, before a
    mid-epoch checkpoint), agreed by all ranks so they stop together."""

    def __init__(self, device: torch.device, epoch: int, args: argparse.Namespace):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.epoch, self.args = epoch, args

    def update(self, loss: torch.Tensor, it: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), it, self.first_bad)

    def check(self) -> None:
        first = all_reduce_max(self.first_bad.clone())
        if int(first) < 0:
            return
        a = self.args
        fix = f"lower --lr (it is {a.lr})"
        if a.amp and a.amp_dtype == "fp16":
            fix += " or use --amp-dtype bf16 (fp16 overflows where bf16 does not)"
        last = os.path.join(a.output_dir, "checkpoint_last.pth.tar")
        kept = (f"{last} is the last good checkpoint (--resume auto continues from it)" if os.path.isfile(last)
                else "no checkpoint was written")
        raise UserError(f"the loss became NaN/inf at epoch {self.epoch}, iteration {int(first) + 1}; the run stopped "
                        f"before saving these weights and {kept}; {fix}")
