"""torch.hub entry points for the backbones this repository exports:

    net = torch.hub.load("path/to/this/repo", "backbone", path="runs/moco/exported", source="local")

`path`: an export_backbone.py (torchvision format) or --export-at-end `.pth` with its `.pth.json`
beside it, a folder of them (the newest is taken), or a run's output folder (its exported/).
The network is the torchvision model the JSON names, with its stem (`small_images`) and, for
families other than ResNet, our `body.*` wrapper (common.nets.models.build_backbone), its first
layer reading the JSON's `in_channels` (an --in-channels run's count; 3 when an older JSON does
not say); `fc`, the head, is nn.Identity(), so `net(images)` gives the features (a lincls export
keeps its linear head). Returned in eval mode, on the CPU; `net.meta` is the JSON, whose
`mean`/`std` normalise the input (ImageNet's for RGB, the run's measured per-channel statistics
of the stored values otherwise). A file whose sha256 is not the one its JSON records (a damaged
copy, an interrupted export) is refused.
"""
dependencies = ["torch", "torchvision"]

import glob  # noqa: E402 (torch.hub reads `dependencies` first)
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from typing import Dict, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.errors import UserError, reason  # noqa: E402
from export.backbone import sidecar  # noqa: E402
from export.formats import network  # noqa: E402


def _find(path: str) -> Tuple[str, Dict]:
    """The export file `path` names (a file, a folder of exports, a run folder) and its JSON."""
    if not os.path.exists(path):  # a mistyped path, not an export whose JSON went missing
        raise UserError(f"{path} does not exist; pass an export_backbone.py .pth (its .pth.json beside it), a folder "
                        f"of such exports or a run's output folder (its exported/)")
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
    try:
        with open(sidecar(path)) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"cannot read {sidecar(path)} ({reason(e)}), the JSON that says {os.path.basename(path)}'s "
                        f"architecture and stem; export it again with export_backbone.py")
    if not isinstance(info, dict) or not {"arch", "small_images"} <= info.keys():
        raise UserError(f"{sidecar(path)} is not the JSON export_backbone.py writes (it lacks 'arch' or "
                        f"'small_images'); export {os.path.basename(path)} again with export_backbone.py")
    if info.get("format", "torchvision") != "torchvision":
        raise UserError(f"{path} is a {info['format']} export; torch.hub loads the torchvision format "
                        f"(export_backbone.py --format torchvision)")
    return path, info


def backbone(path: str) -> nn.Module:
    """The exported backbone at `path` (see the module's docstring), its features as output."""
    file, info = _find(path)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {file} ({reason(e)}); check its permissions")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes, a cut-off copy, a pickle of objects: torch's text is no help
        raise UserError(f"cannot read {file}: it is damaged or not a backbone export (truncated? {reason(e)}); "
                        f"export it again with export_backbone.py")
    # export_backbone.py renames the weights into place before their JSON: a kill between the
    # two leaves new weights beside the JSON (arch, metrics, recipe) of the earlier export
    if "sha256" in info and hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise UserError(f"{file} is not the file its JSON {os.path.basename(sidecar(file))} describes (another "
                        f"sha256: an export to this name was interrupted, or one of the two was replaced); export "
                        f"it again with export_backbone.py")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{file} is not a backbone export (not a state_dict of tensors); export it again with "
                        f"export_backbone.py")
    net = network(info, state)
    expected = net.state_dict()
    wrong = sorted((expected.keys() ^ state.keys())
                   | {k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape})
    if wrong:  # the weights of another network than the JSON describes (load_state_dict's text is many lines)
        raise UserError(f"{file} does not hold the {info['arch']} its JSON describes ({len(wrong)} tensors missing, "
                        f"unexpected or of another shape, such as {wrong[0]!r}); export it again with "
                        f"export_backbone.py")
    net.load_state_dict(state, strict=True)
    net.meta = info
    return net.eval()
