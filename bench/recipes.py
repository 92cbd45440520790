#!/usr/bin/env python
"""The small-data recipes table: what `--recipe small` sets for 1k / 5k / 20k images at
32, 64, 96 and 128 px, how many epochs to run, and how many minutes that takes here.

For every method and crop size the real script (main_moco.py / main_simclr.py with
`--recipe small`) trains on a folder of JPEG files of the real image size (8/7 of the crop,
as ImageNet's 256 -> 224) for --measure-epochs epochs; the last epoch's images/s (from its
metrics.jsonl, data loading included) gives the minutes. The epochs are the recipe's:
each method's pretraining budget in images seen, as bench/quality.py measured it (docs/moco.md: Small
datasets; common/train/recipes.py), over the pool (--budget gives every method another one). The
recipe's flags are those the script prints for that pool and crop.

    python bench/recipes.py                        # CPU: ImageNet stem at every size
    python bench/recipes.py --device cuda -j 8     # GPU: the script's default stem
"""
import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tools.inspection_data import write_inspection_set  # noqa: E402
from bench.quality import run_script  # noqa: E402
from bench.util import format_table, resolve_device, save_record, write_jpegs  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402
from common.train.recipes import SMALL_DATA_BUDGET, DataProfile, epochs_for_budget  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Minutes of `--recipe small` pretraining per pool size and crop size")
    p.add_argument("--methods", nargs="+", default=["moco", "simclr"], choices=("moco", "simclr"))
    p.add_argument("--crop-sizes", nargs="+", type=int, default=[32, 64, 96, 128])
    p.add_argument("--pools", nargs="+", type=int, default=[1000, 5000, 20000], help="dataset sizes of the table")
    p.add_argument("--budget", type=int, default=None,
                   help="images seen in pretraining by every method: epochs = budget / pool (default: each "
                        "method's --recipe small budget, " + ", ".join(f"{m} {b:,}" for m, b in SMALL_DATA_BUDGET.items())
                        + ")")
    p.add_argument("--measure-images", type=int, default=384,
                   help="JPEG files to time on at the largest crop (6 steps of 64); a smaller crop gets as many more "
                        "as keep the pixels equal (16x at a quarter of the size), so every timing lasts about as long")
    p.add_argument("--measure-epochs", type=int, default=2, help="timed on the last one (the first warms up)")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--small-images", default=None, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem at <= 64 px (default: off on a CPU, where it is about 10x slower; "
                        "the script's default, on at <= 64 px, on a GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--rates", default=None, metavar="JSON",
                   help="take the images/s from an earlier recipes.json of this machine instead of measuring "
                        "(another --budget or --pools, the same timings)")
    p.add_argument("--data-dir", default=None, help="where the JPEG folders go (default: a temporary folder)")
    p.add_argument("--source-size", default=None, metavar="WxH",
                   help="time on source files of this size instead of 8/7 x the crop (e.g. 500x375, the size "
                        "of a typical photo; the scripts decode and resize each one)")
    p.add_argument("--source-format", default="jpeg", choices=("jpeg", "png"),
                   help="png: tools/inspection_data.py's grayscale PNGs (square, --source-size's width)")
    p.add_argument("--output-dir", default="runs/bench_recipes")
    p.add_argument("--json", default=None, help="result file (default: OUTPUT_DIR/recipes.json)")
    return p


def recipe_values(method: str, pool: int, crop: int) -> Dict[str, object]:
    """What `--recipe small` sets for this pool and crop (the script's own function)."""
    import main_moco
    import main_simclr
    script = {"moco": main_moco, "simclr": main_simclr}[method]
    data = DataProfile(pool, grayscale=False, short_side=crop)
    return script.small_data_recipe(data, crop, script.get_args_parser().parse_args([]))  # no flag given


def recipe_flags(values: Dict[str, object]) -> str:
    """The recipe's values as the flags the script prints."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in values.items())


def measure_images(args: argparse.Namespace, crop: int) -> int:
    """--measure-images at the largest crop, as many more at a smaller one as keep the pixels."""
    return round(args.measure_images * (max(args.crop_sizes) / crop) ** 2)


def source_size(args: argparse.Namespace, crop: int) -> Tuple[int, int]:
    """(width, height) of the timed files: --source-size, else 8/7 of the crop (ImageNet's 256 -> 224)."""
    if args.source_size is None:
        return round(crop * 8 / 7), round(crop * 8 / 7)
    try:
        width, height = (int(v) for v in args.source_size.lower().split("x"))
    except ValueError:
        raise UserError(f"--source-size {args.source_size!r} is not WIDTHxHEIGHT; pass e.g. 500x375")
    if args.source_format == "png" and width != height:
        raise UserError(f"--source-format png writes square images; pass --source-size {width}x{width}")
    return width, height


def measure(args: argparse.Namespace, method: str, crop: int, data_root: str) -> Dict[str, float]:
    """images/s of the script's last epoch on files of source_size()."""
    import main_moco
    import main_simclr
    width, height = source_size(args, crop)
    folder = os.path.join(data_root, f"{args.source_format}_{width}x{height}_{measure_images(args, crop)}")
    if not os.path.isdir(folder):
        if args.source_format == "png":
            write_inspection_set(folder, measure_images(args, crop), width, seed=0, val_fraction=0.0)
        else:
            write_jpegs(folder, measure_images(args, crop), width, height, classes=1)
    out = os.path.join(args.output_dir, f"{method}_{crop}px")
    argv = [folder, "--recipe", "small", "-a", args.arch, "--crop-size", str(crop), "--epochs",
            str(args.measure_epochs), "-j", str(args.workers), "--seed", "0", "--output-dir", out, "--overwrite", "-p", "1000"]
    if args.small_images is not None:
        argv.append("--small-images" if args.small_images else "--no-small-images")
    if args.device == "cpu":
        argv.append("--cpu")
    seconds = run_script({"moco": main_moco, "simclr": main_simclr}[method], argv, os.path.join(out, "log.txt"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"images_per_sec": float(last["images_per_sec"]), "data_wait": float(last["data_wait"]),
            "seconds": seconds}


def earlier_rates(args: argparse.Namespace) -> Dict[str, Dict[str, Dict[str, float]]]:
    """images/s per method and crop from an earlier record (--rates)."""
    try:
        with open(args.rates) as f:
            rows = json.load(f)["results"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--rates {args.rates} is not a recipes.json record of bench/recipes.py ({e})")
    speed = {m: {str(r["crop"]): {k: r[k] for k in ("images_per_sec", "data_wait")} for r in rows if r["method"] == m}
             for m in args.methods}
    missing = [f"{m} {c} px" for m in args.methods for c in args.crop_sizes if str(c) not in speed[m]]
    if missing:
        raise UserError(f"--rates {args.rates} has no timing for {', '.join(missing)}; measure them (drop --rates)")
    return speed


@report_user_errors
def main(argv: Optional[List[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    if args.small_images is None and args.device == "cpu":
        args.small_images = False
    args.json = args.json or os.path.join(args.output_dir, "recipes.json")
    device = torch.device(args.device)
    if args.rates:
        speed = earlier_rates(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data_root = args.data_dir or tmp
            speed = {m: {str(c): measure(args, m, c, data_root) for c in args.crop_sizes} for m in args.methods}
    name = {"moco": "MoCo v2", "simclr": "SimCLR"}
    stem = "" if args.small_images is None else (" --small-images" if args.small_images else " --no-small-images")
    where = "GPU" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows, results, sets = [], [], []
    for pool in args.pools:
        for crop in args.crop_sizes:
            row = [f"{pool:,}", f"{crop} px"]
            for m in args.methods:
                s = speed[m][str(crop)]
                values = recipe_values(m, pool, crop)
                if args.budget:  # --epochs given on the command line, which the recipe keeps
                    epochs = epochs_for_budget(pool, args.budget)
                    given = f" --epochs {epochs}"
                    del values["epochs"]
                else:
                    epochs, given = int(values["epochs"]), ""
                minutes = epochs * pool / s["images_per_sec"] / 60
                command = f"main_{m}.py DATA --recipe small{given} --crop-size {crop}{stem}"
                results.append({"pool": pool, "crop": crop, "method": m, "epochs": epochs, "minutes": minutes,
                                "images_per_sec": s["images_per_sec"], "data_wait": s["data_wait"],
                                "command": command, "recipe_sets": recipe_flags(values)})
                row += [str(epochs), f"{s['images_per_sec']:.0f}", f"{minutes:.1f}" if minutes < 20 else f"{minutes:.0f}"]
                if pool == args.pools[0] and crop == args.crop_sizes[0]:
                    sets.append(f"{name[m]}, {pool:,} images at {crop} px: {command} sets {recipe_flags(values)}")
            rows.append(row)
    header = ["images", "crop"] + [f"{name[m]} {col}" for m in args.methods
                                   for col in ("epochs", "images/s", f"minutes ({where})")]
    table = format_table(header, rows)
    sets = "\n".join(sets)
    timed = (f"from {args.rates}" if args.rates else f"the script's last of {args.measure_epochs} epochs on "
             + ", ".join(f"{measure_images(args, c)}" for c in args.crop_sizes)
             + (f" {args.source_format.upper()}s of {args.source_size}" if args.source_size else
                " JPEGs of 8/7 x the crop") + f", -j {args.workers}")
    budget = (f"{args.budget:,}" if args.budget else
              ", ".join(f"{name[m]} {SMALL_DATA_BUDGET[m]:,}" for m in args.methods) + " (--recipe small)")
    title = f"{args.arch}, pretraining budget {budget} images seen; images/s: {timed}"
    print(f"{title}\n{table}\n{sets}", flush=True)
    return save_record(args, "recipes", device, results, table, title)


if __name__ == "__main__":
    main()
