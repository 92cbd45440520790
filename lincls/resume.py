"""Which lincls checkpoint a run may continue or evaluate: only one of the same kind of
model, trained on the same images and classes."""
import argparse
from typing import Dict, List, Optional, Tuple

from common.ckpt.io import load_checkpoint
from common.ckpt.resume import check_arch, check_same_flags, resolve_resume
from common.errors import UserError


def probe_checkpoint(args: argparse.Namespace, classes: List[str]) -> Tuple[Optional[str], Optional[Dict]]:
    """(path, checkpoint) of the lincls checkpoint to continue (--resume) or to evaluate
    (--evaluate: --resume, else the output folder's last), checked against this run's model
    and classes; (None, None) for a fresh probe."""
    path = resolve_resume(args.resume or ("auto" if args.evaluate else ""), args.output_dir)
    ckpt = load_checkpoint(path, expected_method="lincls") if path else None
    if ckpt is not None:
        check_compatible(ckpt, args, classes, path)
    return path, ckpt


def check_compatible(ckpt: Dict, args: argparse.Namespace, classes: List[str], path: str) -> None:
    """A lincls checkpoint can only continue (or be evaluated) as the same kind of model."""
    check_arch(ckpt, args.arch, path)
    saved = ckpt.get("args", {})
    checked = ["--head", "--head-bn", "--small-images", "--mlp-hidden-dim", "--hierarchy-depth"]
    if not args.evaluate:  # continuing on other training images would silently mix two experiments
        checked += ["--label-fraction", "--subset-seed", "--label-subset"]
    check_same_flags(saved, args, checked, path)
    if not args.evaluate and saved.get("finetune", args.finetune) != args.finetune:
        raise UserError(f"{path!r} was trained {'with' if saved['finetune'] else 'without'} --finetune; "
                        f"resume it the same way (or use another --output-dir for a new run)")
    if not args.evaluate and saved.get("trainable_layers", []) != args.trainable_layers:
        raise UserError(f"{path!r} was trained with --trainable-layers {','.join(saved['trainable_layers']) or '(none)'}"
                        f"; resume it with the same (or use another --output-dir for a new run)")
    saved_classes = ckpt.get("classes")
    if saved_classes is not None and list(saved_classes) != list(classes):
        raise UserError(f"{path!r} classifies {len(saved_classes)} classes {list(saved_classes)[:3]}... but this "
                        f"dataset has {len(classes)} {list(classes)[:3]}...; use it on the dataset it was trained on")
