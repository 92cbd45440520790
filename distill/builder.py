"""Distillation of a frozen teacher into a student backbone (lightly-train's "distillation"
method, its distillationv1): the student's global feature goes through a small projection
head to the teacher's width and is matched to the teacher's global feature of the same
image (distill/loss.py: SEED's cross-entropy over a queue of teacher features, or cosine +
a variance term).

The student is a torchvision-style model whose `fc` is the projection head, as in SimCLR, so
a checkpoint's keys are `module.encoder.*` (the head under `module.encoder.fc.*`) plus SEED's
`module.queue` / `module.queue_ptr`: common.ckpt.pretrained.extract_backbone reads the
student's backbone as it reads a SimCLR one. The teacher (distill/teacher.py FrozenTeacher)
is held outside the module's state: no parameter of it is trained, saved, handed to the
optimizer or to DDP; a resume rebuilds it from --teacher."""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.distributed.collectives import concat_all_gather
from common.eval.metrics import retrieval_acc1
from common.nets.models import feature_dim
from common.nets.mlp import build_mlp
from common.watch.collapse import LearningWatch
from distill.loss import distill_loss
from distill.teacher import FrozenTeacher


class Distill(nn.Module):
    def __init__(self, base_encoder: Callable[..., nn.Module], teacher: FrozenTeacher,
                 proj_hidden_dim: Optional[int] = None, loss: str = "seed", queue_size: int = 65536,
                 t_student: float = 0.2, t_teacher: float = 0.05, var_weight: float = 1.0):
        """base_encoder() builds the student whose `fc` becomes the head: Linear + BN + ReLU +
        Linear to the teacher's width (moco-v3's MLP, no last BN; `proj_hidden_dim` None: the
        student's feature width). SEED (`loss` "seed") keeps a queue of `queue_size` teacher
        features, each normalised (random unit vectors at the start, as MoCo's queue)."""
        super().__init__()
        self.kind, self.t_student, self.t_teacher, self.var_weight = loss, t_student, t_teacher, var_weight
        self.encoder = base_encoder()
        width = feature_dim(self.encoder)
        self.encoder.fc = build_mlp(2, width, proj_hidden_dim or width, teacher.dim, last_bn=False)
        # not a submodule (plain attribute): outside state_dict, parameters(), .to() and DDP
        self.__dict__["teacher"] = teacher
        queue = F.normalize(torch.randn(queue_size if loss == "seed" else 0, teacher.dim), dim=1)
        self.register_buffer("queue", queue)  # queue: KxD teacher features
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def networks(self) -> Tuple[nn.Module, ...]:
        """What --compile compiles (the student); the teacher runs as it was loaded."""
        return (self.encoder,)

    @torch.no_grad()
    def _enqueue(self, t: torch.Tensor) -> None:
        """MoCo's ring buffer over every rank's teacher features (t: nxD, this rank's): the
        global batch's, gathered in rank order (rank 0's rows first), so every rank writes the
        same rows at the same place and all hold one queue, the one a single process on the
        whole batch holds. A global batch larger than the queue leaves its last K rows where
        writing them one by one would."""
        if not self.queue.shape[0]:
            return
        keys = F.normalize(concat_all_gather(t.float()), dim=1)
        k, n = self.queue.shape[0], keys.shape[0]
        ptr = int(self.queue_ptr)
        first = max(0, n - k)  # rows before it would be overwritten within this batch
        idx = (torch.arange(first, n, device=keys.device) + ptr) % k
        self.queue[idx] = keys[first:]
        self.queue_ptr[0] = (ptr + n) % k

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x1, x2: NxCxHxW (C: --in-channels), two augmented views of N images; `index`: N
        dataset indices when the teacher's features are cached (--cache-teacher: of the
        un-augmented images). Returns the loss averaged over both views and {"acc1": % of
        students whose own teacher feature is the batch's nearest}."""
        n = x1.shape[0]
        s = self.encoder(torch.cat([x1, x2]))  # s: 2NxD student projections, both views in one pass
        with torch.no_grad():
            if index is not None:
                t = self.teacher.cached(index).repeat(2, 1)  # t: 2NxD, one feature per image for both views
            else:
                t = self.teacher(torch.cat([x1, x2]))  # t: 2NxD, each view's own (the student's crop)
        loss = distill_loss(self.kind, s, t, self.queue.clone().detach(), self.t_student, self.t_teacher,
                            self.var_weight)
        acc1 = retrieval_acc1(s[:n], t[:n])  # first views: chance 100/N
        self._enqueue(t[:n])  # one entry per image
        return loss, {"acc1": acc1}


class DistillLearningWatch(LearningWatch):
    """The shared not-learning check (common/watch/collapse.py LearningWatch: same statistic,
    level and epochs judged) with distillation's sentence: `acc1` here is not a contrastive
    accuracy between two views but the % of students whose own image's teacher feature is the
    batch's nearest (retrieval_acc1 of the first views)."""

    def update(self, epoch: int, acc1: float) -> Optional[str]:
        if super().update(epoch, acc1) is None:
            return None
        return (f"only {acc1:.2f}% of students have their own image's teacher feature as the batch's nearest, against "
                f"{self.chance:.2f}% by chance: the run is not learning (the student does not tell these images apart "
                f"the way the teacher does); try {self.hint}")
