"""The classifier main_lincls.py trains: a fresh head (linear or MLP, one per level of a
hierarchy) on the --pretrained backbone, which of its tensors may learn, and its placement
on the worker's device."""
import argparse
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from common.distributed.collectives import DistEnv
from common.distributed.placement import place_model
from common.errors import UserError
from common.eval.label_tree import LabelTree
from common.eval.inputs import pretrained_backbone
from common.log.progress import log
from common.nets.backbones import block_names
from common.nets.models import feature_dim
from lincls.hierarchy import LevelHeads


def build_head(in_dim: int, num_classes: Union[int, Sequence[int]], kind: str, hidden_dim: int = 0,
               dropout: float = 0.5, bn: bool = False) -> nn.Module:
    """A fresh classifier head. Weights ~ N(0, 0.01), biases 0, as facebookresearch/moco
    initialises its linear probe; bn puts a parameter-free BatchNorm1d in front (MAE).
    A list of class counts builds one head per level of a hierarchy (LevelHeads)."""
    if not isinstance(num_classes, int):
        head = LevelHeads([build_head(in_dim, n, kind, hidden_dim, dropout) for n in num_classes])
    elif kind == "linear":
        head = nn.Linear(in_dim, num_classes)
    else:
        hidden = hidden_dim or in_dim
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.normal_(mean=0.0, std=0.01)
            m.bias.data.zero_()
    if bn:
        # part of the head: it learns its running statistics while the backbone stays frozen
        head = nn.Sequential(nn.BatchNorm1d(in_dim, affine=False, eps=1e-6), head)
    return head


def backbone_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every backbone tensor (parameters and BN buffers), head excluded, as CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def build_classifier(args: argparse.Namespace, num_classes: Union[int, Sequence[int]]
                     ) -> Tuple[nn.Module, Dict[str, torch.Tensor], str]:
    """The --pretrained backbone (common/eval/inputs.py) with a new head (one per level for a
    list of class counts). Returns (model, the checkpoint's backbone tensors for the sanity
    check (empty for random init), description of where the weights came from)."""
    outputs = num_classes if isinstance(num_classes, int) else sum(num_classes)
    # --evaluate loads the whole classifier from --resume afterwards
    model, source, reference = pretrained_backbone(args, outputs, load=not args.evaluate, keep_reference=True)
    check_trainable_layers(model, args.arch, args.trainable_layers)
    model.fc = build_head(feature_dim(model), num_classes, args.head, args.mlp_hidden_dim, args.dropout,
                          args.head_bn)
    return model, reference, source


def check_trainable_layers(model: nn.Module, arch: str, names: Sequence[str]) -> None:
    """Every --trainable-layers name is a block of this network (common.nets.backbones.block_names)."""
    blocks = block_names(model)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        example = ",".join(blocks[-2:])
        raise UserError(f"--trainable-layers names {unknown[0]!r}, which is not a block of {arch}; pick from "
                        f"{','.join(blocks)} (e.g. --trainable-layers {example})")


def parse_trainable_layers(value: str, finetune: bool) -> List[str]:
    """--trainable-layers 'layer3,layer4' -> ['layer3', 'layer4'], checked."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    # the names are checked against the network's own blocks once it is built (check_trainable_layers)
    if names and finetune:
        raise UserError("--finetune trains every block and --trainable-layers only some; pass one of them")
    return names


def is_trainable(name: str, trainable_layers: Sequence[str]) -> bool:
    """The head always; a backbone tensor when its block is in --trainable-layers."""
    if name.startswith("fc."):
        return True
    name = name[len("body."):] if name.startswith("body.") else name  # a wrapped family (Backbone)
    return any(name == b or name.startswith(b + ".") for b in trainable_layers)


def place_classifier(args: argparse.Namespace, env: DistEnv, num_classes: int, tree: Optional[LabelTree] = None
                     ) -> Tuple[nn.Module, nn.Module, Dict[str, torch.Tensor]]:
    """The classifier on this worker's device (DDP-wrapped when distributed), only the tensors
    meant to learn requiring grad. Returns (model, the bare network, the backbone tensors the
    sanity check compares against)."""
    model, reference, source = build_classifier(args, num_classes if tree is None else tree.sizes)
    if not args.finetune:
        # only the head (and --trainable-layers) learns; the rest gets no gradients at all
        for name, p in model.named_parameters():
            p.requires_grad = is_trainable(name, args.trainable_layers)
    model = place_model(model, env, args, networks=(model,))
    net = model.module if env.distributed else model
    if not reference:
        # random init: the reference is the init as DDP broadcast it from rank 0 (each rank drew its own)
        reference = backbone_state(net)
    mode = ("fine-tuning everything" if args.finetune else f"fine-tuning {', '.join(args.trainable_layers)}, the rest "
            f"frozen" if args.trainable_layers else "frozen backbone")
    heads = (f"{args.head} head, {num_classes} classes" if tree is None else
             f"one {args.head} head per level, " + ", ".join(f"{n} {name} classes" for n, name in
                                                             zip(tree.sizes, tree.level_names)))
    log(f"=> {args.arch} from {source}; {mode}, {heads}, {env.world_size} process(es) on {env.device}")
    return model, net, reference
