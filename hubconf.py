"""torch.hub entry points for the backbones this repository exports:

    net = torch.hub.load("path/to/this/repo", "backbone", path="runs/moco/exported", source="local")

`path`: an export_backbone.py (torchvision format) or --export-at-end `.pth` with its `.pth.json`
beside it, a folder of them (the newest is taken), or a run's output folder (its exported/).
The network is the torchvision model the JSON names, with its stem (`small_images`) and, for
families other than ResNet, our `body.*` wrapper (common.nets.models.build_backbone); `fc`,
the head, is nn.Identity(), so `net(images)` gives the features (a lincls export keeps its
linear head). Returned in eval mode, on the CPU; `net.meta` is the JSON.
"""
dependencies = ["torch", "torchvision"]

import glob  # noqa: E402 (torch.hub reads `dependencies` first)
import json  # noqa: E402
import os  # noqa: E402
from typing import Dict, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.errors import UserError  # noqa: E402
from export.backbone import sidecar  # noqa: E402
from export.formats import network  # noqa: E402


def _find(path: str) -> Tuple[str, Dict]:
    """The export file `path` names (a file, a folder of exports, a run folder) and its JSON."""
    if os.path.isdir(os.path.join(path, "exported")):
        path = os.path.join(path, "exported")
    if os.path.isdir(path):
        found = [f for f in glob.glob(os.path.join(path, "*.pth")) if os.path.isfile(sidecar(f))]
        if not found:
            raise UserError(f"{path} holds no exported backbone (<name>.pth with <name>.pth.json beside it); run "
                            f"export_backbone.py on a checkpoint, or pretrain with --export-at-end")
        path = max(found, key=os.path.getmtime)
    if not os.path.isfile(sidecar(path)):
        raise UserError(f"{path} has no {os.path.basename(sidecar(path))} beside it, which says its architecture "
                        f"and stem; export it again with export_backbone.py")
    with open(sidecar(path)) as f:
        info = json.load(f)
    if info.get("format", "torchvision") != "torchvision":
        raise UserError(f"{path} is a {info['format']} export; torch.hub loads the torchvision format "
                        f"(export_backbone.py --format torchvision)")
    return path, info


def backbone(path: str) -> nn.Module:
    """The exported backbone at `path` (see the module's docstring), its features as output."""
    file, info = _find(path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    net = network(info, state)
    net.load_state_dict(state, strict=True)
    net.meta = info
    return net.eval()
