#!/usr/bin/env python
"""The payoff probe's verdict with shuffled folds and with folds by group, for checkpoints on a
labelled ImageFolder: does the train-label cross-validation see what val sees when the images
come in correlated groups (frames of one video, states of one simulation)?

    python bench/payoff_folds.py ../shared/data/cahn-hilliard --groups '^(s[0-9]+)_' \\
        --checkpoint runs/ch/checkpoint_last.pth.tar --output runs/payoff_folds.json

Scores the untrained network (BatchNorm statistics from the images, seed 0) and each
checkpoint at its own crop with the probe of common/eval/payoff.py, both fold kinds, and prints
one line per (backbone, folds) with the per-fold top-1 and the verdict against the untrained one.
"""
import argparse
import os
import sys
import tempfile
from typing import Dict, List

import torch

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_simclr  # noqa: E402
from common.ckpt.io import load_checkpoint  # noqa: E402
from common.ckpt.pretrained import load_backbone  # noqa: E402
from common.distributed.collectives import DistEnv  # noqa: E402
from common.errors import report_user_errors  # noqa: E402
from common.eval import payoff  # noqa: E402
from common.files.atomic import write_json_atomic  # noqa: E402
from common.nets.models import build_backbone  # noqa: E402


def scores(data: str, ckpt_path: str, groups: str) -> Dict[str, Dict[str, List[float]]]:
    ckpt = load_checkpoint(ckpt_path)
    saved = ckpt["args"]
    stem = "--small-images" if saved["small_images"] else "--no-small-images"
    env = DistEnv(0, 1, 0, torch.device("cpu"), False)
    out: Dict[str, Dict[str, List[float]]] = {}
    for name, pattern in (("shuffled", None), ("grouped", groups)):
        argv = [data, "-a", ckpt["arch"], stem, "--crop-size", str(saved["crop_size"]), "--output-dir", tempfile.mkdtemp()]
        args = main_simclr.finalize_args(main_simclr.get_args_parser().parse_args(
            argv + (["--payoff-groups", pattern] if pattern else [])))
        args.crop_max = 1.0  # the checkpoint's crop only: this compares folds, not sizes
        args.payoff_holdout = 0  # the 5-fold cross-validation, the two kinds of folds compared
        probe = payoff.PayoffProbe(args, env)
        torch.manual_seed(0)
        fresh = build_backbone(ckpt["arch"], small_images=args.small_images, crop_size=args.crop_size)
        untrained = probe.score_as_initialised(fresh)[args.crop_size]
        net = build_backbone(ckpt["arch"], small_images=args.small_images, crop_size=args.crop_size)
        load_backbone(net, ckpt)
        trained = probe.score(net)[args.crop_size]
        out[name] = {"untrained": untrained, "checkpoint": trained, "verdict": payoff.verdict(trained, untrained)}
        v = out[name]["verdict"]
        print(f"{name:>8} folds: untrained {sum(untrained) / len(untrained):.1f}, checkpoint "
              f"{sum(trained) / len(trained):.1f}, gain {v['gain']:+.1f} (fold spread {v['spread']:.1f}), "
              f"paid off: {v['paid_off']}", flush=True)
    return out


@report_user_errors
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a labelled ImageFolder (DATA/train is used)")
    p.add_argument("--groups", required=True, metavar="REGEX", help="the --payoff-groups pattern")
    p.add_argument("--checkpoint", required=True, nargs="+", help="pretraining checkpoints to score")
    p.add_argument("--output", default=None, help="also write the figures here (JSON)")
    args = p.parse_args(argv)
    result = {path: scores(args.data, path, args.groups) for path in args.checkpoint}
    if args.output:
        write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()
