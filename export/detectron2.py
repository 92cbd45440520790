"""detectron2's pickle layout of a ResNet backbone, as facebookresearch/moco's
detection/convert-pretrain-to-detectron2.py writes it: `stem.conv1`, `res2`..`res5`,
`convN.norm`, `shortcut(.norm)`, numpy arrays, `matching_heuristics` on. Our file leaves out
the head, which the converter keeps as `stem.fc.*` and detectron2 ignores."""
import pickle
from typing import Dict

import numpy as np
import torch

from common.errors import UserError

AUTHOR = "moco-pretrain export_backbone.py"


def check_convertible(info: Dict) -> None:
    """detectron2's ResNet is the torchvision ResNet with the ImageNet stem: nothing else maps."""
    if info["family"] != "ResNet" or info["small_images"]:
        what = "a CIFAR-stem (--small-images) ResNet" if info["family"] == "ResNet" else f"the {info['family']} family"
        raise UserError(f"--format detectron2 takes a ResNet with the ImageNet stem, not {what} ({info['arch']}); "
                        f"export it with --format torchvision or torch-export instead")


def to_detectron2(key: str) -> str:
    """The converter's renaming of one torchvision ResNet key."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def from_detectron2(key: str) -> str:
    """The inverse of to_detectron2: how the export is read back and checked."""
    key = key[len("stem."):] if key.startswith("stem.") else key
    for t in (1, 2, 3, 4):
        key = key.replace(f"res{t + 1}.", f"layer{t}.")
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for t in (1, 2, 3):
        key = key.replace(f"conv{t}.norm", f"bn{t}")
    return key


def payload(weights: Dict[str, torch.Tensor]) -> bytes:
    """The pickled file: the backbone's tensors (no `fc.*`) under detectron2's names."""
    model = {to_detectron2(k): v.cpu().numpy() for k, v in weights.items() if not k.startswith("fc.")}
    return pickle.dumps({"model": model, "__author__": AUTHOR, "matching_heuristics": True})


def read_back(path: str) -> Dict[str, torch.Tensor]:
    """The torchvision state_dict a detectron2 export holds (the file is our own, just written)."""
    with open(path, "rb") as f:
        obj = pickle.load(f)
    return {from_detectron2(k): torch.from_numpy(np.asarray(v)) for k, v in obj["model"].items()}
