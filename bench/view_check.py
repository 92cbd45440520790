#!/usr/bin/env python
"""The view check of a pretraining script's views on your data, without training: for a
sample of images, how much more alike an image's two views are than views of two images, by
pixel statistics and by an untrained backbone's features (common/watch/view_check.py, the
line a run prints before its first step). Try augmentation settings in seconds, before a
run spends its budget on views that leave no instance signal:

    python bench/view_check.py main_simclr.py DATA --recipe small --no-small-images -a resnet18
    python bench/view_check.py main_moco.py DATA --aug-plus --crop-min 0.08 --color-strength 1 --seeds 0 1 2

Everything after the script's name is that script's own flags (its --recipe included); the
check uses the recipe the script would train with (its `view_recipe`).
"""
import argparse
import importlib
import json
import os
import sys
from typing import Dict, List

import torch

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.data.datasets import build_dataset  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402
from common.files.atomic import atomic_path  # noqa: E402
from common.watch.view_check import view_check, view_check_message  # noqa: E402

SCRIPTS = ("main_moco.py", "main_simclr.py", "main_moco_v3.py")
HINT = "larger crops (--crop-min), weaker colour jitter (--color-strength), or a larger --crop-size"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="the view check of a pretraining script's views, without training",
                                     usage="%(prog)s [--seeds S ...] [--json PATH] SCRIPT SCRIPT_FLAGS ...")
    parser.add_argument("script", choices=SCRIPTS, help="the pretraining script whose views to check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="sample seeds; several show how much the figures move from one sample to the next")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser


def check(argv: List[str]) -> Dict[str, object]:
    """{"script", "recipe", "results": one view_check result per seed, "lines": what a run prints}."""
    ours, rest = get_args_parser().parse_known_args(argv)
    script = importlib.import_module(ours.script[:-3])
    args = script.finalize_args(script.get_args_parser().parse_args(rest))
    recipe = script.view_recipe(args)
    dataset = build_dataset(args, "pretrain")
    if dataset is None or len(dataset) < 2:
        raise UserError("the view check needs at least two images in the pretraining split; point DATA at them")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    results = [view_check(dataset, recipe, args.arch, args.small_images, device, seed=s) for s in ours.seeds]
    return {"script": ours.script, "argv": rest, "crop_size": args.crop_size, "crop_min": args.crop_min,
            "color_strength": args.color_strength, "gray_images": args.gray_images, "seeds": ours.seeds,
            "results": results, "lines": [view_check_message(r, HINT) for r in results]}


@report_user_errors
def main(argv: List[str] = None) -> Dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    ours, _ = get_args_parser().parse_known_args(argv)
    record = check(argv)
    for seed, line in zip(record["seeds"], record["lines"]):
        print(f"seed {seed}: {line.lstrip('=> ')}")
    if ours.json:
        with atomic_path(ours.json) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        print(f"=> {ours.json}")
    return record


if __name__ == "__main__":
    main()
