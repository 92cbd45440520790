#!/usr/bin/env python
"""Fashion-MNIST as one gray channel (`--in-channels 1`) against today's 3-channel copy, on
this CPU: the loader's two views per second (the transform alone, one thread) and a short
SimCLR run end to end (images/s from its metrics log), alternating the two paths in one
process so both see the same machine (issue 44).

    python bench/channels_speed.py ../shared/data/fashion-mnist --json bench/results/channels_speed_cpu.json
"""
import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_simclr  # noqa: E402
from bench.util import machine_info, mnist_subset  # noqa: E402
from common.augment.transforms import two_views  # noqa: E402
from common.data.datasets import build_dataset, resolve_channels  # noqa: E402
from common.data.transformed import TransformedDataset  # noqa: E402
from common.files.atomic import write_json_atomic  # noqa: E402
from simclr.augment import simclr_augmentation  # noqa: E402


def views_per_second(data: str, in_channels: str, n: int) -> float:
    """Two views of `n` train images through the quick benchmark's views (32 px, gray recipe)."""
    args = argparse.Namespace(dataset="fashion-mnist", data=data, download=False, in_channels=in_channels, seed=0,
                              channel_mean=None, channel_std=None, channel_norm=None)
    channels = resolve_channels(args, "train")
    recipe = simclr_augmentation(32, strength=1.0, blur=False, crop_min=0.3, gray_images=True).for_channels(channels)[0]
    views = TransformedDataset(build_dataset(args, "train"), two_views(recipe))
    views[(0, 0)]
    start = time.perf_counter()
    for i in range(n):
        views[(i, i)]
    return n / (time.perf_counter() - start)


def run_images_per_second(data: str, in_channels: str, epochs: int, workers: int) -> float:
    out = tempfile.mkdtemp(prefix=f"speed{in_channels}_")
    argv = [data, "--dataset", "fashion-mnist", "-a", "resnet18", "--no-small-images", "--crop-size", "32",
            "--in-channels", in_channels, "--gray-images", "--crop-min", "0.3", "-b", "64", "--epochs", str(epochs),
            "--lr", "0.1", "--optimizer", "sgd", "-j", str(workers), "--seed", "0", "--no-payoff", "--output-dir", out,
            "-p", "100000", "--save-freq", "1000000"]
    try:
        main_simclr.main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"main_simclr exited {e.code}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"images_per_sec"' in line]
    return float(rows[-1]["images_per_sec"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--views", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    # the quality benchmark's pool: 2,000 class-balanced train images (seed 1, as its pool)
    pool = mnist_subset(args.data, os.path.join(tempfile.mkdtemp(prefix="fmnist2k_"), "data"), 2000, 10, seed=1)
    result: Dict[str, Dict[str, List[float]]] = {c: {"views_per_s": [], "run_images_per_s": []} for c in ("3", "1")}
    for _ in range(args.repeats):
        for c in ("3", "1"):
            result[c]["views_per_s"].append(views_per_second(pool, c, args.views))
            result[c]["run_images_per_s"].append(run_images_per_second(pool, c, args.epochs, args.workers))
            print(f"=> --in-channels {c}: {result[c]['views_per_s'][-1]:.0f} two-view images/s in the loader, "
                  f"{result[c]['run_images_per_s'][-1]:.0f} images/s in the run", flush=True)
    for key in ("views_per_s", "run_images_per_s"):
        ratio = [a / b for a, b in zip(result["1"][key], result["3"][key])]
        print(f"{key}: 1 channel / 3 channels = {', '.join(f'{r:.2f}' for r in ratio)}")
    if args.json:
        write_json_atomic(args.json, {"benchmark": "channels_speed", "config": vars(args), "results": result,
                                      "machine": machine_info(torch.device("cpu"))})


if __name__ == "__main__":
    main()
