"""ViT state_dict keys between timm's layout (facebookresearch/moco-v3's `vits.py`, DINO) and
torchvision's (ours): the same tensors under other names, one to one. timm's fused `qkv`
Linear stacks q, k, v in the order torchvision's `in_proj_weight` does."""
import re
from typing import Dict, List, Tuple

import torch

# (timm, torchvision); `{i}` is the block index
_PAIRS: List[Tuple[str, str]] = [
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    ("patch_embed.proj.weight", "conv_proj.weight"),
    ("patch_embed.proj.bias", "conv_proj.bias"),
    ("norm.weight", "encoder.ln.weight"),
    ("norm.bias", "encoder.ln.bias"),
    ("blocks.{i}.norm1.weight", "encoder.layers.encoder_layer_{i}.ln_1.weight"),
    ("blocks.{i}.norm1.bias", "encoder.layers.encoder_layer_{i}.ln_1.bias"),
    ("blocks.{i}.attn.qkv.weight", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight"),
    ("blocks.{i}.attn.qkv.bias", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias"),
    ("blocks.{i}.attn.proj.weight", "encoder.layers.encoder_layer_{i}.self_attention.out_proj.weight"),
    ("blocks.{i}.attn.proj.bias", "encoder.layers.encoder_layer_{i}.self_attention.out_proj.bias"),
    ("blocks.{i}.norm2.weight", "encoder.layers.encoder_layer_{i}.ln_2.weight"),
    ("blocks.{i}.norm2.bias", "encoder.layers.encoder_layer_{i}.ln_2.bias"),
    ("blocks.{i}.mlp.fc1.weight", "encoder.layers.encoder_layer_{i}.mlp.0.weight"),
    ("blocks.{i}.mlp.fc1.bias", "encoder.layers.encoder_layer_{i}.mlp.0.bias"),
    ("blocks.{i}.mlp.fc2.weight", "encoder.layers.encoder_layer_{i}.mlp.3.weight"),
    ("blocks.{i}.mlp.fc2.bias", "encoder.layers.encoder_layer_{i}.mlp.3.bias"),
]


def _rename(state_dict: Dict[str, torch.Tensor], src: int) -> Dict[str, torch.Tensor]:
    rules = [(re.compile("^" + re.escape(pair[src]).replace(r"\{i\}", r"(\d+)") + "$"), pair[1 - src])
             for pair in _PAIRS]
    out = {}
    for key, value in state_dict.items():
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                out[target.replace("{i}", match.group(1)) if match.groups() else target] = value
                break
        else:  # not a ViT tensor (e.g. a head): kept under its name, for the caller to judge
            out[key] = value
    return out


def is_timm_vit(state_dict: Dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state_dict and "cls_token" in state_dict


def timm_to_torchvision(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A timm-layout ViT backbone (moco-v3's) under torchvision's `VisionTransformer` names."""
    return _rename(state_dict, 0)


def torchvision_to_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse: a torchvision ViT backbone (ours, without `body.`) under timm's names."""
    return _rename(state_dict, 1)
