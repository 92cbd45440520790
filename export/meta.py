"""What the JSON beside an export says, in the terms of torchvision's `Weights.meta`, and
the hash-carrying file names torch.hub's `check_hash` accepts."""
import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.hub import HASH_REGEX

from common.augment.transforms import IMAGENET_MEAN, IMAGENET_STD
from common.ckpt.pretrained import checkpoint_arch
from common.errors import UserError

# what the numbers the network reads are, per --in-channels: the sidecar says it beside mean/std,
# since the full-depth statistics are in the images' own units (a 16-bit band's mean ~ 2000)
RGB_VALUES = "8-bit RGB scaled to [0, 1], then (x - mean) / std"
FULL_DEPTH_VALUES = "the images' stored values at full depth (16-bit kept, bands, .npy), then (x - mean) / std"
PER_IMAGE_VALUES = ("the images' stored values at full depth, each image's channels then standardised by their own "
                    "mean and std over the image's pixels (--channel-norm image)")


def describe(ckpt: Dict, path: str, arch: Optional[str] = None, small_images: Optional[bool] = None,
             crop_size: Optional[int] = None) -> Dict:
    """Architecture, stem, input size and input channels: from the arguments, else the
    checkpoint's own args (a checkpoint without `in_channels` is from before --in-channels:
    RGB)."""
    saved = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
    arch = arch or checkpoint_arch(ckpt)  # moco-v3 writes vit_base for torchvision's vit_b_16
    if arch is None:
        raise UserError(f"{path!r} does not say its architecture; pass -a/--arch (e.g. -a resnet50)")
    crop = crop_size or ckpt.get("eval_size") or saved.get("crop_size") or 224  # payoff.py: the learned scale
    small = small_images if small_images is not None else saved.get("small_images", False)
    channels = int(saved.get("in_channels") or 3)
    if channels != 3 and not (saved.get("channel_mean") and saved.get("channel_std")):
        raise UserError(f"{path!r} was trained on {channels} channel(s) but does not hold their mean and std "
                        f"(channel_mean, channel_std in its args); export a checkpoint written by this project's "
                        f"--in-channels runs")
    return {"arch": arch, "small_images": bool(small), "crop_size": int(crop), "in_channels": channels,
            "method": ckpt.get("method"), "checkpoint": os.path.abspath(path)}


def normalisation(ckpt: Dict, channels: int) -> Dict:
    """The mean and std the exported network's input is normalised with: ImageNet's for RGB,
    the checkpoint's measured per-channel statistics for other counts (describe checked them)."""
    if channels == 3:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_values": RGB_VALUES}
    saved = ckpt["args"]
    if saved.get("channel_norm") == "image":  # nothing of the set's: each image is standardised by its own
        return {"mean": None, "std": None, "input_values": PER_IMAGE_VALUES}
    return {"mean": [float(v) for v in saved["channel_mean"]], "std": [float(v) for v in saved["channel_std"]],
            "input_values": FULL_DEPTH_VALUES}


def min_size(model: nn.Module, crop_size: int, in_channels: int = 3) -> List[int]:
    """The smallest square input of `in_channels` channels the network takes (torchvision's
    meta["min_size"]), found by trying sides up to the trained crop: pooling and strides
    decide it, per family."""
    side = 1
    while side < crop_size:
        try:
            with torch.no_grad():
                model(torch.zeros(1, in_channels, side, side))
            break
        except (RuntimeError, ValueError, AssertionError, IndexError):
            side *= 2
    side = min(side, crop_size)
    return [side, side]


def run_metrics(ckpt: Dict, path: str) -> Dict:
    """The run's metrics for the checkpoint's last epoch: its line of the metrics.jsonl beside
    the checkpoint (the last line when none is that epoch's), else the checkpoint's own."""
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl")
    lines = []
    if os.path.isfile(log):
        with open(log) as f:
            for line in f:
                try:
                    lines.append(json.loads(line))
                except ValueError:  # a line cut short by a kill
                    continue
    epoch = ckpt.get("epoch")
    same = [r for r in lines if isinstance(r, dict) and epoch is not None and r.get("epoch") == epoch - 1]
    if same or lines:
        return (same or lines)[-1]
    return dict(ckpt.get("metrics") or {})


def weights_meta(model: nn.Module, info: Dict, ckpt: Dict, path: str) -> Dict:
    """torchvision's Weights.meta fields for this export: parameter count, input sizes,
    normalisation (with what the input values are), categories (none: features, not classes),
    the recipe and its metrics."""
    saved = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
    return {"num_params": sum(p.numel() for p in model.parameters()),
            "min_size": min_size(model, info["crop_size"], info["in_channels"]),
            "input_size": [info["crop_size"], info["crop_size"]],
            **normalisation(ckpt, info["in_channels"]), "categories": None,
            "recipe": {"method": ckpt.get("method"), "arch": info["arch"], "epochs": ckpt.get("epoch"),
                       "args": saved},
            "metrics": run_metrics(ckpt, path)}


def hashed_name(out: str, sha256: str) -> str:
    """`<name>-<first 8 hex digits of the sha256>.<ext>`: torch.hub.load_state_dict_from_url
    (check_hash=True) takes the digits after the first `-` that is followed by hex digits and
    a dot, so any such `-` in the name itself becomes `_`."""
    folder, base = os.path.split(out)
    stem, ext = os.path.splitext(base)
    if HASH_REGEX.search(f"{stem}-{sha256[:8]}{ext}").group(1) != sha256[:8]:
        stem = stem.replace("-", "_")
    return os.path.join(folder, f"{stem}-{sha256[:8]}{ext}")
