#!/usr/bin/env python
"""A 16-bit set whose class lives only in the low byte: does `--in-channels 1` (full depth)
learn what the 8-bit path cannot see? (issue 44)

Each image is a bright 16-bit offset (257 k - 120, k drawn per image) under a faint texture of
at most 100 levels: horizontal stripes (class 0) or vertical stripes (class 1), random period
and phase, plus noise. Every pixel of an image stays inside one 8-bit bin, so the 8-bit path
(16-bit scaled to 8 bits, today's default) sees a flat image; full depth sees the stripes.

    python bench/low_byte.py --seeds 0 1 2 --output runs/low_byte --json bench/results/low_byte_cpu.json

Per seed: the set (written once per --data-seed), SimCLR pretraining with --recipe small on
the train images through each path (8-bit; full depth normalised with the set's statistics;
full depth with each image standardised by its own, --channel-norm image), then main_lincls.py
--probe logreg (all labels) on val, against the random-init network through the same path.
"""
import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_lincls  # noqa: E402
import main_simclr  # noqa: E402
from common.files.atomic import write_json_atomic  # noqa: E402

PATHS = {"8-bit (default)": [], "full depth (--in-channels 1)": ["--in-channels", "1"],
         "full depth, per image (--in-channels 1 --channel-norm image)": ["--in-channels", "1", "--channel-norm",
                                                                         "image"]}
FOLDER = {"8-bit (default)": "8bit", "full depth (--in-channels 1)": "full",
          "full depth, per image (--in-channels 1 --channel-norm image)": "image"}


def write_set(root: str, train: int, val: int, side: int, seed: int) -> None:
    """ImageFolder of 16-bit grayscale PNGs, classes `h` and `v` (stripes' direction)."""
    if os.path.isdir(os.path.join(root, "val")):
        return
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            cls = i % 2
            period, phase = rng.uniform(3.0, 7.0), rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * (y if cls == 0 else x) / period + phase)
            texture = 40 * (1 + wave) + rng.uniform(0, 20, (side, side))  # 0 .. 100 of 65535
            k = rng.integers(20, 235)
            img = (257 * k - 120 + texture).astype(np.uint16)  # all in 8-bit bin k: (t - 120) / 257 in [-0.47, -0.08]
            folder = os.path.join(root, split, "hv"[cls])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.png"))


def run(main, argv: List[str]) -> None:
    try:
        main.main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"{main.__name__} {' '.join(argv)} exited {e.code}")


def top1(folder: str) -> float:
    with open(os.path.join(folder, "results.json")) as f:
        return float(json.load(f)["final"]["acc1"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=400)
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--output", default="runs/low_byte")
    p.add_argument("--json", default="")
    args = p.parse_args()
    data = os.path.join(args.output, f"data{args.data_seed}")
    write_set(data, args.train, args.val, args.side, args.data_seed)
    common = ["-a", "resnet18", "--no-small-images", "--crop-size", str(args.side), "-j", "0"]
    rows: Dict[str, Dict[str, List[float]]] = {}
    seconds: Dict[str, float] = {}
    for name, flags in PATHS.items():
        rows[name] = {"pretrained": [], "random init": []}
        for seed in args.seeds:
            out = os.path.join(args.output, f"{FOLDER[name]}_s{seed}")
            t0 = time.time()
            if not os.path.isfile(os.path.join(out, f"checkpoint_{args.epochs:04d}.pth.tar")):  # (a rerun reuses it)
                # --no-trial: both paths train the recipe's own views, so only the reading differs
                run(main_simclr, [data] + common + flags + ["--recipe", "small", "--epochs", str(args.epochs),
                                                             "--seed", str(seed), "--no-payoff", "--no-trial",
                                                             "--output-dir", out, "--overwrite", "-p", "1000"])
            seconds[f"{name} s{seed}"] = time.time() - t0
            for kind, pretrained in (("pretrained", os.path.join(out, "checkpoint_last.pth.tar")),
                                     ("random init", "none")):
                probe = os.path.join(out, f"probe_{kind.replace(' ', '_')}")
                run(main_lincls, [data] + common + flags + ["--pretrained", pretrained, "--probe", "logreg",
                                                            "--seed", str(seed), "--output-dir", probe,
                                                            "--overwrite"])
                rows[name][kind].append(top1(probe))
            print(f"=> {name}, seed {seed}: pretrained {rows[name]['pretrained'][-1]:.1f}, random init "
                  f"{rows[name]['random init'][-1]:.1f}", flush=True)
    print("\n| path | pretrained + logreg, val top-1 (seeds) | random init + logreg |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {np.mean(r['pretrained']):.1f} ({', '.join(f'{v:.1f}' for v in r['pretrained'])}) | "
              f"{np.mean(r['random init']):.1f} ({', '.join(f'{v:.1f}' for v in r['random init'])}) |")
    if args.json:
        write_json_atomic(args.json, {"benchmark": "low_byte", "config": vars(args), "results": rows,
                                      "seconds": seconds, "machine": platform.platform(),
                                      "cores": len(os.sched_getaffinity(0))})


if __name__ == "__main__":
    main()
