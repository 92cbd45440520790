"""The distillation losses: the student's projection s against the frozen teacher's global
feature t of the same image, both L2-normalised here. Neither can be won by a constant
student output (docs/distill.md: measured against each other; tests/test_distill.py).

SEED (Fang et al., 2021, "SEED: Self-supervised Distillation for Visual Representation";
lightly-train's distillationv1): each image's similarities to its own teacher feature and a
queue of K teacher features of earlier batches, softmax-ed with a sharp teacher temperature
(the target) and a softer student one; the loss is the cross-entropy between the two. A
constant s gives every image one distribution, while the teacher's differ per image.

cosine: 1 - cos(s, t), plus a variance term (VICReg's hinge, Bardes et al., 2022) that asks
every output dimension of s to vary over the batch at least as much as t's does: a constant
s pays the teacher's whole spread."""
import torch
import torch.nn.functional as F

from common.distributed.collectives import all_gather_with_grad, concat_all_gather

LOSSES = ("seed", "cosine")


def seed_loss(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, t_student: float,
              t_teacher: float) -> torch.Tensor:
    """s: NxD student projection; t: NxD teacher feature (no gradient); queue: KxD normalised
    teacher features of earlier batches. The teacher's own feature is the first entry of the
    bank, as in SEED, so the target puts most of its mass there when the queue is far."""
    s, t = F.normalize(s.float(), dim=1), F.normalize(t.float(), dim=1)
    queue = queue.float()
    # logits: Nx(1+K): column 0 the image's own teacher feature, then the queue
    s_logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / t_student
    t_logits = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1) / t_teacher
    target = F.softmax(t_logits, dim=1)  # Nx(1+K), no gradient (t has none)
    return -(target * F.log_softmax(s_logits, dim=1)).sum(1).mean()


def cosine_variance_loss(s: torch.Tensor, t: torch.Tensor, var_weight: float) -> torch.Tensor:
    """s, t: NxD. mean(1 - cos(s_i, t_i)) + var_weight * mean_d relu(std_d(t^) - std_d(s^)),
    std over the batch of the normalised vectors (^). Under DDP the std is the global batch's
    (every rank's rows gathered, s with its gradient, as VICReg does): a std of each rank's
    rows alone is not the whole batch's, and DDP's average of the rank losses' gradients is
    then one process's on the whole batch (tests/test_distill.py, 2 gloo workers)."""
    s, t = F.normalize(s.float(), dim=1), F.normalize(t.float(), dim=1)
    cos = (s * t).sum(1)  # N
    s_all, t_all = all_gather_with_grad(s), concat_all_gather(t)  # themselves in one process
    spread = F.relu(t_all.std(dim=0) - s_all.std(dim=0)).mean() if s_all.shape[0] > 1 else s.new_zeros(())
    return (1 - cos).mean() + var_weight * spread


def distill_loss(kind: str, s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, t_student: float,
                 t_teacher: float, var_weight: float) -> torch.Tensor:
    """The `kind` loss (LOSSES) of s against t (NxD each)."""
    if kind == "seed":
        return seed_loss(s, t, queue, t_student, t_teacher)
    return cosine_variance_loss(s, t, var_weight)
