"""The frozen teacher of main_distill.py: `--teacher T` is

  * a file this project reads: a pretraining or main_lincls.py checkpoint (ours,
    facebookresearch/moco and moco-v3 layouts: common/ckpt/pretrained.py, main_lincls.py's
    loader) or an export_backbone.py export (its JSON names the architecture);
  * `torchvision:NAME`: torchvision's default ImageNet weights of NAME from the local torch
    hub cache (never downloaded: the sentence of `--init imagenet` names the missing file);
  * `hub:REPO_DIR:ENTRY`: torch.hub.load(REPO_DIR, ENTRY, source="local"), a torch.hub
    repository on disk (DINOv2/v3 as people keep them), whose output is the global feature.

Its input: the student's views (ImageNet-normalised, as every teacher here expects) resized
bilinearly to the teacher's own side (`size`: the checkpoint's crop, torchvision's weights'
crop, 224 for hub:). With --cache-teacher the features of the un-augmented images (resized,
centre crop at that side) are computed once and looked up by image index.

With --in-channels N other than 3 the student reads N channels, each normalised with the run's
own measured statistics. A teacher trained on the same N channels (a checkpoint or export of
such a run) takes that input as it is; an RGB teacher (every torchvision: and hub: one, and RGB
checkpoints) is fed a triple of its channels (teacher_bands): the gray channel three times for
N = 1, the --show-bands triple (default 0,1,2) for more."""
import argparse
import importlib.util
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from common.augment.transforms import eval_decode_side, eval_transform
from common.ckpt.init_weights import read_init
from common.ckpt.io import load_checkpoint
from common.ckpt.pretrained import checked_checkpoint, checkpoint_arch, load_backbone, load_pretrained
from common.data.channels import channels_of
from common.data.datasets import SMALL_CROP_MAX
from common.data.display import check_bands
from common.data.transformed import TransformedDataset
from common.errors import UserError, reason
from common.eval.features import extract_indexed_features
from common.log.progress import log
from common.nets.models import build_backbone
from common.nets.precision import Precision
from common.train.data import pretraining_images

HUB_SIZE = 224  # a multiple of 14 (DINOv2's patches) and of 16


class FrozenTeacher(nn.Module):
    """`net` (images at `size` px -> NxD global feature) frozen: no parameter needs a gradient,
    always in eval mode (train() keeps it there), run under torch.no_grad. `spec` is what
    identifies it (--teacher); `dim` its feature width, from one forward pass; `in_channels` the
    channels `net` reads; `bands` (set by load_teacher) the student's channels it is fed, in
    order, or None: the student's input as it is."""

    def __init__(self, net: nn.Module, size: int, spec: str, in_channels: int = 3):
        super().__init__()
        self.net, self.size, self.spec, self.in_channels = net, size, spec, in_channels
        self.bands: Optional[List[int]] = None
        self.net.requires_grad_(False)
        self.eval()
        self.dim = int(self(torch.zeros(2, in_channels, size, size)).shape[1])
        self.table: Optional[torch.Tensor] = None  # --cache-teacher: NxD features of the un-augmented images

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxCxHxW normalised (RGB: with ImageNet's statistics) -> BxD; its `bands` picked
        first where set, and resized to `size` where H, W differ."""
        if self.bands is not None:
            x = x[:, self.bands]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        out = self.net(x)
        if isinstance(out, (tuple, list)):  # (global feature, ...) of some hub models
            out = out[0]
        return out.flatten(1)

    def cached(self, index: torch.Tensor) -> torch.Tensor:
        """The cached features of the images `index` (N) -> NxD."""
        return self.table[index]

    @torch.no_grad()
    def cache(self, args: argparse.Namespace, device: torch.device, workers: int) -> None:
        """--cache-teacher: every pretraining image, resized and centre-cropped to `size`
        (un-augmented), through the teacher once; under DDP each rank embeds its share and
        all get the whole table (common/eval/features.py). Unreadable images keep a zero row
        (training reads the next readable image in their place, and looks up that one's)."""
        # normalised as the student's views are (full depth: the run's statistics), the bands picked in forward
        dataset = TransformedDataset(pretraining_images(args), eval_transform(self.size, channels_of(args)),
                                     decode_side=eval_decode_side(self.size), skip_unreadable=True)
        feats, _, index = extract_indexed_features(self, dataset, args.batch_size, device, workers,
                                                   Precision.from_args(args), normalize=True,
                                                   print_freq=args.print_freq, desc="teacher features")
        self.table = torch.zeros(len(dataset), feats.shape[1], dtype=feats.dtype, device=device)
        self.table[index] = feats
        log(f"=> --cache-teacher: the teacher's features of the {len(dataset)} un-augmented images ({self.size} px "
            f"resize + centre crop) computed once; the student sees augmented views of them, matched to these")


def teacher_bands(teacher: int, student: int, show_bands: Optional[Sequence[int]], spec: str
                  ) -> Tuple[Optional[List[int]], Optional[str]]:
    """Which of the student's `student` channels a teacher reading `teacher` channels is fed,
    in order (None: all of them, as they are), and how the log says it (None for RGB into
    RGB). An RGB teacher of a full-depth student gets a triple: the gray channel three times,
    else `show_bands` (--show-bands; default the first three, the last repeated for 2)."""
    if teacher == student:
        return None, (None if student == 3 else f"the teacher reads the student's {student} channel(s) as they are "
                                                 f"(it was trained on {student})")
    if teacher != 3:
        raise UserError(f"--teacher {spec!r} reads {teacher} channel(s) but the student's images have {student}; pass "
                        f"a teacher trained on RGB or on {student} channel(s), or --in-channels {teacher}")
    if student == 1:
        return [0, 0, 0], "teacher sees the gray channel repeated 3 times (as R, G, B)"
    check_bands(show_bands, student)
    bands = list(show_bands) if show_bands is not None else [min(b, student - 1) for b in (0, 1, 2)]
    return bands, (f"teacher sees bands {','.join(map(str, bands))} of {student} as R, G, B"
                   + ("" if show_bands is not None else " (--show-bands picks others)"))


def load_teacher(spec: str, size: Optional[int] = None, student_channels: int = 3,
                 show_bands: Optional[Sequence[int]] = None) -> FrozenTeacher:
    """The frozen teacher behind `--teacher spec` at `size` px (None: its own side), fed the
    student's `student_channels` as teacher_bands says; every problem is one sentence."""
    if spec.startswith("torchvision:"):
        (net, own), channels = _torchvision_teacher(spec[len("torchvision:"):]), 3
    elif spec.startswith("hub:"):
        net, own, channels = _hub_teacher(spec), HUB_SIZE, 3
    else:
        net, own, channels = _file_teacher(spec)
    bands, note = teacher_bands(channels, student_channels, show_bands, spec)
    size = size or own
    patch = getattr(net, "patch_size", None)  # a hub ViT (DINOv2: 14) needs a multiple of its patch
    if isinstance(patch, int) and size % patch:
        raise UserError(f"--teacher-size {size} is not a multiple of the teacher's patch size {patch}; pass "
                        f"--teacher-size {max(patch, round(size / patch) * patch)}")
    teacher = FrozenTeacher(net, size, spec, channels)
    teacher.bands = bands
    n = sum(p.numel() for p in teacher.parameters())
    log(f"=> teacher {spec}: {n / 1e6:.1f}M parameters, frozen (eval mode, no gradient), {teacher.dim}-d global "
        f"feature of the student's views resized to {size} px")
    if note:
        # The RGB teacher expects ImageNet-normalised RGB; the student's channels are normalised with
        # the run's own per-channel statistics, so each band it gets is zero-mean and unit-std over
        # the images, as an ImageNet-normalised channel roughly is over ImageNet: close enough to feed
        # as it is, rather than guess a mapping of stored values to ImageNet's [0, 1] colours.
        log(f"=> {note}, each normalised with the run's own statistics (zero mean, unit std per channel"
            + (", close to the ImageNet-normalised input an RGB teacher expects)" if bands is not None else ")"))
    return teacher


def _torchvision_teacher(name: str):
    ckpt = load_pretrained("imagenet", name)  # the local hub cache only: one sentence naming the missing file
    crop = tvm.get_model_weights(name).DEFAULT.transforms().crop_size
    size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    net = build_backbone(name, small_images=False, crop_size=size)
    load_backbone(net, ckpt, f"torchvision's ImageNet weights of {name}")
    net.fc = nn.Identity()
    return net, size


def _hub_teacher(spec: str) -> nn.Module:
    repo, _, entry = spec[len("hub:"):].rpartition(":")
    if not repo or not entry:
        raise UserError(f"--teacher {spec!r} must be hub:REPO_DIR:ENTRY, e.g. hub:/models/dinov2:dinov2_vits14")
    if not os.path.isdir(repo):
        raise UserError(f"--teacher {spec!r}: the folder {repo!r} does not exist; pass the folder of a torch.hub "
                        f"repository on disk (one that holds hubconf.py, e.g. a clone of facebookresearch/dinov2)")
    if not os.path.isfile(os.path.join(repo, "hubconf.py")):
        raise UserError(f"--teacher {spec!r}: {repo!r} has no hubconf.py, so it is not a torch.hub repository; "
                        f"pass the folder that holds hubconf.py")
    try:
        entries = _hub_entries(repo)
    except Exception as e:
        raise UserError(f"--teacher {spec!r}: {os.path.join(repo, 'hubconf.py')!r} cannot be imported ({reason(e)}); "
                        f"install what it needs or pass another repository")
    if entry not in entries:
        raise UserError(f"--teacher {spec!r}: {os.path.join(repo, 'hubconf.py')!r} has no entry {entry!r}; it offers "
                        f"{', '.join(entries) or 'none'}")
    try:
        net = torch.hub.load(repo, entry, source="local")
    except Exception as e:
        raise UserError(f"--teacher {spec!r}: {entry}() of {repo!r} failed ({reason(e)}); if it fetches weights, put "
                        f"them in {os.path.join(torch.hub.get_dir(), 'checkpoints')!r} first (nothing is downloaded)")
    if not isinstance(net, nn.Module):
        raise UserError(f"--teacher {spec!r}: {entry}() returned a {type(net).__name__}, not a network")
    return net


def _hub_entries(repo: str) -> List[str]:
    """The public callables of `repo`'s hubconf.py (what torch.hub.list gives for a github repo),
    imported with the repository first on sys.path as torch.hub.load(source="local") does."""
    sys.path.insert(0, repo)
    try:
        spec = importlib.util.spec_from_file_location("hubconf", os.path.join(repo, "hubconf.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(repo)
    return [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]


def _file_teacher(spec: str):
    """A checkpoint (ours, reference, main_lincls.py) or an export_backbone.py export: the
    backbone without its head, at the side the run learned on (its eval_size, else crop), and
    the channels it reads (its --in-channels; 3 for one from before it)."""
    if not os.path.isfile(spec):
        raise UserError(f"--teacher {spec!r} is neither a file nor torchvision:NAME nor hub:REPO_DIR:ENTRY; pass a "
                        f"checkpoint or export_backbone.py export, e.g. runs/simclr/checkpoint_last.pth.tar")
    sidecar = spec + ".json"  # export_backbone.py's description of its export
    if os.path.isfile(sidecar) and not spec.endswith(".pth.tar"):
        with open(sidecar) as f:
            info = json.load(f)
        arch, saved = info.get("arch"), info
        ckpt = read_init(spec, arch)
    else:
        ckpt = load_checkpoint(spec)
        arch, saved = checkpoint_arch(ckpt), dict(ckpt.get("args") or {}, crop_size=ckpt.get("eval_size")
                                                  or (ckpt.get("args") or {}).get("crop_size"))
        if arch is None:
            raise UserError(f"--teacher {spec!r} does not say which architecture it holds; pass a checkpoint of "
                            f"this project or of facebookresearch/moco / moco-v3 (they store `arch`)")
        ckpt = checked_checkpoint(ckpt, arch, spec)
    size = int(saved.get("crop_size") or 224)
    small = saved.get("small_images")
    channels = int(saved.get("in_channels") or 3)
    net = build_backbone(arch, small_images=size <= SMALL_CROP_MAX if small is None else bool(small), crop_size=size,
                         in_channels=channels)
    load_backbone(net, ckpt, spec)
    net.fc = nn.Identity()
    return net, size, channels
