"""The frozen-backbone sanity check: after a probe, every tensor that was not meant to
learn must equal the one loaded, or the reported accuracy is not the pretrained features'."""
from typing import Dict, Sequence

import torch
import torch.nn as nn

from common.log.progress import log
from common.nets.backbones import block_names
from lincls.heads import backbone_state, is_trainable


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, except that NaN equals NaN at the same place: an untouched NaN weight is
    unchanged, and torch.equal(NaN, NaN) is False."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or not a.is_floating_point():
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def sanity_check(model: nn.Module, reference: Dict[str, torch.Tensor], trainable_layers: Sequence[str] = ()) -> None:
    """A frozen backbone (or its frozen blocks, with --trainable-layers) must leave every
    tensor (weights and BN statistics) exactly as loaded: otherwise the reported accuracy is
    not a probe of the pretrained features. A difference is a bug, so it fails loudly."""
    current = {k: v for k, v in backbone_state(model).items() if not is_trainable(k, trainable_layers)}
    reference = {k: v for k, v in reference.items() if not is_trainable(k, trainable_layers)}
    changed = [k for k in reference if k not in current or not same_tensor(current[k], reference[k].to(current[k].dtype))]
    if changed or set(current) != set(reference):
        raise RuntimeError(f"sanity check failed: the frozen backbone changed during training "
                           f"({len(changed)} tensors differ, e.g. {changed[:5]}; "
                           f"keys only in the model: {sorted(set(current) - set(reference))[:5]})")
    frozen = [b for b in block_names(model) if b not in trainable_layers]  # this family's blocks
    which = f"frozen ({', '.join(frozen)})" if trainable_layers else "backbone"
    log(f"=> sanity check passed: all {len(reference)} {which} tensors equal the loaded ones")
