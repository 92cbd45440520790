"""`--init imagenet|PATH` of the pretraining scripts: the backbone starts from weights you
already have (continued pretraining) instead of a random draw. PATH is a torchvision
state_dict, an export_backbone.py export (its JSON sidecar names the architecture), or any
checkpoint main_lincls.py's --pretrained accepts (ours, facebookresearch/moco, moco-v3).
Only the backbone is loaded: heads, queue and predictor start fresh."""
import argparse
import glob
import json
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from common.ckpt.pretrained import check_finite, checked_checkpoint, extract_backbone, load_backbone, load_pretrained
from common.ckpt.io import safe_load, with_dino_state_dict
from common.ckpt.resume import check_arch, resolve_resume
from common.errors import UserError, reason
from common.log.progress import log
from common.nets.backbones import adopt_position_embedding


def read_init(spec: str, arch: str) -> Dict[str, Any]:
    """The checkpoint dict (state_dict, arch) behind `--init spec` for an `arch` backbone;
    every problem is one sentence."""
    if spec == "imagenet":  # torchvision's cache only; the sentence names the missing file
        return load_pretrained("imagenet", arch)
    if os.path.isdir(spec):
        likely = _file_in_run(spec)
        raise UserError(f"--init {spec!r} is a folder; pass a file in it, "
                        + (f"probably {likely!r}" if likely else "a checkpoint, exported backbone or torchvision "
                                                                 "state_dict (or 'imagenet')"))
    if not os.path.isfile(spec):
        raise UserError(f"--init {spec!r} does not exist; pass 'imagenet' or a checkpoint, exported backbone or "
                        f"torchvision state_dict file")
    try:
        loaded = safe_load(spec)  # weights_only, argparse.Namespace allowed (DINO's full checkpoints)
    except Exception as e:
        raise UserError(f"cannot read --init {spec!r} ({reason(e)}); it is damaged or was not written by torch.save: "
                        f"pass a checkpoint, an export_backbone.py .pth or a torchvision state_dict")
    loaded = with_dino_state_dict(loaded)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        return checked_checkpoint(loaded, arch, spec)
    if not isinstance(loaded, dict) or not loaded or not all(torch.is_tensor(v) for v in loaded.values()):
        raise UserError(f"--init {spec!r} is neither a checkpoint nor a state_dict of tensors; pass a checkpoint, "
                        f"an export_backbone.py .pth or a torchvision state_dict")
    sidecar = spec + ".json"  # export_backbone.py's description of its export
    ckpt: Dict[str, Any] = {"state_dict": loaded, "arch": None, "method": None}
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            ckpt["arch"] = json.load(f).get("arch")
    check_arch(ckpt, arch, spec)
    check_finite(extract_backbone(loaded)[0], spec)
    return ckpt


def _file_in_run(folder: str) -> Optional[str]:
    """The file a user who passed a run's output folder (or its exported/) as --init most
    likely meant: the run's last checkpoint, else its newest exported backbone."""
    last = os.path.join(folder, "checkpoint_last.pth.tar")
    if os.path.isfile(last):
        return last
    exports = [f for d in (folder, os.path.join(folder, "exported")) for f in glob.glob(os.path.join(d, "*.pth"))
               if os.path.isfile(f + ".json")]
    return max(exports, key=os.path.getmtime) if exports else None


def init_backbone(args: argparse.Namespace, backbone: nn.Module, *copies: nn.Module) -> None:
    """--init: load its backbone weights into `backbone` (its `fc` head is kept), then make
    each of `copies` (a momentum / key encoder) an exact copy of `backbone`. A run that
    resumes takes its weights from the checkpoint, so --init is ignored then."""
    if not args.init:
        return
    if resolve_resume(args.resume, args.output_dir):
        log(f"=> --resume: the weights come from the checkpoint; --init {args.init} is ignored")
        return
    ckpt = read_init(args.init, args.arch)
    where = "torchvision's ImageNet weights" if args.init == "imagenet" else args.init
    layout = load_backbone(backbone, ckpt, where)
    for copy in copies:
        adopt_position_embedding(copy, backbone.state_dict())  # a ViT's grid, as the backbone took it
        copy.load_state_dict(backbone.state_dict())
    log(f"=> --init: the backbone starts from {where} (layout {layout})"
        + (f", copied into the {len(copies)} momentum encoder(s)" if copies else ""))
