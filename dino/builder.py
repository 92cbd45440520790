"""DINO (Caron et al., 2021): a student (backbone + DINOHead) sees every crop, a teacher of the
same shape, an EMA of the student, sees the two global crops; the student's output of each
crop is pulled to the teacher's centred, sharpened output of the other global crops
(dino/loss.py). The teacher gets no gradient: only the script's per-step EMA moves it, after
the student's optimizer step, as in facebookresearch/dino.

Names follow facebookresearch/dino: `student` and `teacher` are each a MultiCropWrapper with
`backbone` (the torchvision backbone, its `fc` an Identity) and `head`, so their keys are
`backbone.*` and `head.*` (`checkpoint_layout` writes them as DINO's checkpoints hold them);
`loss.center` is the centre."""
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn as nn

from common.ckpt.vit_keys import torchvision_to_timm
from common.nets.ema import momentum_update
from common.nets.models import feature_dim
from dino.head import DINOHead
from dino.loss import DINOLoss


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops: the consecutive crops of one resolution pass the
    backbone together (the global crops in one batch, the local ones in another, as DINO), the
    head once over all of them."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """crops: each B x 3 x side x side. Returns (len(crops)*B) x out_dim, crop-major."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))  # ((end-start)*B) x width
            start = end
        return self.head(torch.cat(features))


class DINO(nn.Module):
    def __init__(self, base_encoder: Callable[[], nn.Module], out_dim: int, n_local_crops: int, *,
                 use_bn_in_head: bool = False, norm_last_layer: bool = True, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0, epochs: int = 100,
                 center_momentum: float = 0.9, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        """base_encoder() builds a backbone whose `fc` is the head (common.nets.models.build_backbone);
        it is called twice (student, teacher), and the teacher starts as the student's copy
        (DINO's teacher.load_state_dict(student.state_dict())). The teacher's head keeps its
        weight norms fixed as DINO's (`norm_last_layer` True) always does."""
        super().__init__()
        self.epoch = 0  # set by the script every step: the teacher temperature is per epoch
        self.m = 0.996  # the teacher's EMA momentum of the current step, set by the script
        nets = []
        for _ in range(2):
            backbone = base_encoder()
            width = feature_dim(backbone)
            backbone.fc = nn.Identity()
            nets.append(MultiCropWrapper(backbone, DINOHead(width, out_dim, use_bn_in_head, norm_last_layer,
                                                            hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)))
        self.student, self.teacher = nets
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = DINOLoss(out_dim, 2 + n_local_crops, warmup_teacher_temp, teacher_temp,
                             warmup_teacher_temp_epochs, epochs, center_momentum=center_momentum)

    def networks(self) -> Tuple[nn.Module, ...]:
        """What --compile compiles: the backbones and heads; the loss and the EMA stay outside."""
        return self.student.backbone, self.student.head, self.teacher.backbone, self.teacher.head

    def forward(self, *crops: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """crops: the 2 global crops (B x 3 x G x G), then the local ones (B x 3 x L x L)."""
        with torch.no_grad():
            teacher_output = self.teacher(crops[:2])  # (2B) x out_dim: only the global crops
        student_output = self.student(crops)  # (n_crops*B) x out_dim
        return self.loss(student_output, teacher_output, self.epoch)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """theta_t <- m * theta_t + (1 - m) * theta_s, parameters only; after the student's step."""
        momentum_update(self.teacher, self.student, self.m)


def dino_keys(wrapper: nn.Module, vit: bool) -> Dict[str, torch.Tensor]:
    """A MultiCropWrapper's state_dict as facebookresearch/dino's: `backbone.*` and `head.*`;
    a ViT backbone under timm's names (DINO's vision_transformer.py), not `body.` + torchvision's."""
    state = wrapper.state_dict()
    if vit:
        body = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
        state = {**{"backbone." + k: v for k, v in torchvision_to_timm(body).items()},
                 **{k: v for k, v in state.items() if not k.startswith("backbone.body.")}}
    return state


def checkpoint_layout(dino: DINO, distributed: bool, vit: bool) -> Dict[str, Dict[str, torch.Tensor]]:
    """The checkpoint's `student` and `teacher` keys as facebookresearch/dino writes them:
    the student under DDP as `module.backbone.*`, the teacher as `backbone.*`; the same tensors
    as the checkpoint's state_dict (torch.save stores them once)."""
    student = dino_keys(dino.student, vit)
    return {"student": {("module." if distributed else "") + k: v for k, v in student.items()},
            "teacher": dino_keys(dino.teacher, vit)}
