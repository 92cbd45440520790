"""DINO's loss (Caron et al., 2021; facebookresearch/dino's DINOLoss): the student's softmax at
temperature 0.1 is pulled to the teacher's centred, sharpened softmax, over every (teacher
global crop, student crop) pair of an image except a crop with itself. The centre is an EMA
of the teacher's mean output over the global batch; the teacher's temperature warms up
linearly per epoch."""
from typing import Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                          epochs: int) -> np.ndarray:
    """The teacher temperature of each epoch: linear from `warmup_teacher_temp` to
    `teacher_temp` over `warmup_epochs` epochs (both ends included, as np.linspace), then
    `teacher_temp`."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(max(epochs - warmup_epochs, 0)) * teacher_temp))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of `p` (N x K probabilities)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, n_crops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, epochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        # a buffer: saved in the checkpoint, so a resumed run centres as the uninterrupted one
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                                   epochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """student_output: (n_crops*B) x out_dim, crop-major (crop 0 of every image, then crop 1 ...);
        teacher_output: (2*B) x out_dim, the two global crops. Returns the loss (the mean over
        the pairs of the batch-mean cross-entropy) and {"teacher_entropy": the teacher's
        per-image entropy, "batch_entropy": that of its batch mean, "kl": the student's mean KL
        from the teacher} (nats; common/watch/entropy.py judges them). Updates the centre."""
        student_out = (student_output / self.student_temp).chunk(self.n_crops)  # n_crops x (B x out_dim)
        temp = self.teacher_temp(epoch)
        teacher_p = F.softmax((teacher_output - self.center) / temp, dim=-1).detach()  # (2B) x out_dim
        teacher_out = teacher_p.chunk(2)  # 2 x (B x out_dim)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:  # a global crop is not its own target
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_output)
        with torch.no_grad():
            h = entropy(teacher_p)
            # every teacher crop is the target of as many pairs: the mean cross-entropy less its entropy
            stats = {"teacher_entropy": h, "batch_entropy": entropy(teacher_p.mean(0, keepdim=True)),
                     "kl": (total / terms).detach() - h}
        return total / terms, stats

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher's outputs over every process's batch."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)  # 1 x out_dim
        count = len(teacher_output)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)
