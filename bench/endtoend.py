#!/usr/bin/env python
"""End-to-end pretraining throughput on real JPEG files, next to the pure step rate of the
same configuration measured in the same run.

The real script (main_moco.py or main_simclr.py) trains on an ImageFolder of
ImageNet-sized JPEGs (--image-size 500 375, quality 90; generated once into --data-dir,
or your own folder), with the flags of each configuration. The step rate comes from
bench/throughput.py's runner on in-memory batches (uint8 crops + parameters for the
gpu_augment configurations, so it includes the device augmentation; JPEG bytes of the
same size for the gpu_decode ones, so it includes the decoding too). Their ratio says
how much of the GPU the input pipeline lets you use; the data-wait share says where the
rest went.

    python bench/endtoend.py --method moco -a resnet50 -b 256 --moco-k 65536 -j 15 \\
        --configs default amp+channels_last amp+channels_last+gpu_augment

End-to-end images/s are read from the script's progress lines, timestamped here as they
arrive: "steady" is the rate between the first progress line after --warmup-iters of the
last epoch and the epoch's last line (what a long ImageNet epoch sees); "epoch" is the
last epoch's images/s from metrics.jsonl, including the wait for its first batches.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import throughput  # noqa: E402
from bench.util import format_table, save_record, write_jpegs  # noqa: E402
from common.data.images import IMG_EXTENSIONS  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^Epoch \[(\d+)/\d+\]\[\s*(\d+)/(\d+)\]")


def script_flags(config: str) -> List[str]:
    """The script flags of a bench/throughput.py configuration (its loop is the script's)."""
    cfg = throughput.CONFIGS[config]
    return ((["--amp"] if cfg.get("amp") else []) + (["--channels-last"] if cfg.get("channels_last") else [])
            + (["--compile"] if cfg.get("compile") else [])
            + (["--gpu-augment"] if cfg.get("gpu_augment") else ["--no-gpu-augment"])
            + (["--gpu-decode"] if cfg.get("gpu_decode") else []))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="End-to-end pretraining images/s on JPEG files vs the pure step rate")
    p.add_argument("--method", default="moco", choices=("moco", "simclr"))
    p.add_argument("--configs", nargs="+", default=["default", "amp+channels_last", "amp+channels_last+gpu_augment"],
                   choices=[c for c in throughput.CONFIGS if c != "baseline"])
    p.add_argument("--data-dir", default="", help="ImageFolder to train on; generated there when it holds no images "
                                                  "(default: a temporary folder)")
    p.add_argument("--num-images", default=6144, type=int, help="JPEGs to generate")
    p.add_argument("--image-size", default=[500, 375], type=int, nargs=2, metavar=("W", "H"))
    p.add_argument("-a", "--arch", default="resnet50")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument("-b", "--batch-size", default=256, type=int)
    p.add_argument("-j", "--workers", default=15, type=int)
    p.add_argument("--moco-k", default=65536, type=int)
    p.add_argument("--bn-splits", default=8, type=int, help="MoCo's SplitBatchNorm groups (the script's default)")
    p.add_argument("--epochs", default=2, type=int, help="the last one is measured")
    p.add_argument("--print-freq", default=4, type=int, help="iterations between the script's progress lines")
    p.add_argument("--warmup-iters", default=4, type=int, help="iterations of the last epoch left out of 'steady'")
    p.add_argument("--step-repeats", default=3, type=int, help="repeats of the step-rate measurement")
    p.add_argument("--step-steps", default=8, type=int, help="steps per repeat of the step-rate measurement")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--timeout", default=600, type=int, help="seconds allowed per script run")
    p.add_argument("--json", default="runs/bench/endtoend.json")
    return p


def has_images(folder: str) -> bool:
    for _, _, names in os.walk(folder):
        if any(n.lower().endswith(IMG_EXTENSIONS) for n in names):
            return True
    return False


def method_flags(args: argparse.Namespace) -> List[str]:
    if args.method == "moco":
        return ["--mlp", "--aug-plus", "--moco-t", "0.2", "--cos", "--moco-k", str(args.moco_k),
                "--bn-splits", str(args.bn_splits)]
    return []


def run_script(args: argparse.Namespace, data: str, config: str, out: str) -> Dict:
    """Train with the config's flags; returns steady/epoch images/s, data wait and wall time."""
    cmd = [sys.executable, os.path.join(ROOT, f"main_{args.method}.py"), data, "-a", args.arch, "-b",
           str(args.batch_size), "-j", str(args.workers), "--crop-size", str(args.crop_size), "--epochs",
           str(args.epochs), "-p", str(args.print_freq), "--seed", "0", "--output-dir", out, "--overwrite", "--save-freq", "1000"]
    cmd += method_flags(args) + script_flags(config) + (["--cpu"] if args.device == "cpu" else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    lines: List[Tuple[float, int, int, int]] = []  # (time, epoch, iteration, iterations per epoch)
    tail: List[str] = []
    assert proc.stdout is not None
    for text in proc.stdout:
        now = time.perf_counter()
        tail = (tail + [text.rstrip()])[-20:]
        m = LINE.match(text)
        if m:
            lines.append((now, int(m.group(1)), int(m.group(2)), int(m.group(3))))
        if now - t0 > args.timeout:
            proc.kill()
            raise UserError(f"{config}: the script ran past --timeout {args.timeout} s")
    if proc.wait() != 0:
        raise UserError(f"{config}: the script failed:\n" + "\n".join(tail))
    wall = time.perf_counter() - t0
    last = [ln for ln in lines if ln[1] == args.epochs - 1 and ln[2] > args.warmup_iters]
    steady = None
    if len(last) >= 2:
        (t_a, _, it_a, _), (t_b, _, it_b, _) = last[0], last[-1]
        steady = (it_b - it_a) * args.batch_size / max(t_b - t_a, 1e-9)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = [json.loads(x) for x in f][-1]
    return {"steady_images_per_s": steady, "epoch_images_per_s": record["images_per_sec"],
            "data_wait": record["data_wait"], "wall_s": wall, "command": " ".join(cmd)}


def step_rates(args: argparse.Namespace, device: torch.device) -> Dict[str, Dict]:
    """Pure step rate of every configuration (bench/throughput.py's runner, same process)."""
    targs = throughput.finalize(throughput.get_args_parser().parse_args(
        ["--methods", args.method, "-a", args.arch, "--crop-size", str(args.crop_size), "-b", str(args.batch_size),
         "--moco-k", str(args.moco_k), "--bn-splits", str(args.bn_splits), "--device", device.type,
         "--steps", str(args.step_steps), "--warmup", "2", "--repeats", str(args.step_repeats),
         "--jpeg-size", *map(str, args.image_size),
         "--configs", *args.configs]))
    return throughput.bench_method(args.method, targs, device)


@report_user_errors
def main(argv: Optional[List[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.epochs < 1 or args.num_images < args.batch_size:
        raise UserError("--epochs must be at least 1 and --num-images at least one batch")
    with tempfile.TemporaryDirectory(prefix="bench_endtoend_") as tmp:
        data = args.data_dir or os.path.join(tmp, "data")
        if not has_images(data):
            t0 = time.perf_counter()
            write_jpegs(data, args.num_images, *args.image_size, classes=10)
            print(f"=> wrote {args.num_images} JPEGs of {args.image_size[0]}x{args.image_size[1]} to {data} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"=> step rate: {args.method} {args.arch} {args.crop_size} px batch {args.batch_size} on {device}",
              flush=True)
        steps = step_rates(args, device)
        results = {}
        for config in args.configs:
            print(f"=> end to end: {config}", flush=True)
            e2e = run_script(args, data, config, os.path.join(tmp, config))
            step = steps[config].get("images_per_s")
            e2e["step_images_per_s"] = step
            best = e2e["steady_images_per_s"] or e2e["epoch_images_per_s"]
            e2e["ratio"] = best / step if step else None
            results[config] = e2e
            print(f"   {config}: {best:.0f} img/s end to end, step {step or 0:.0f} img/s, data wait "
                  f"{100 * e2e['data_wait']:.0f}%", flush=True)
    rows = [[c, f"{r['step_images_per_s'] or 0:.0f}", f"{r['steady_images_per_s']:.0f}" if r["steady_images_per_s"] else "-",
             f"{r['epoch_images_per_s']:.0f}", f"{100 * r['ratio']:.0f}%" if r["ratio"] else "-",
             f"{100 * r['data_wait']:.0f}%"] for c, r in results.items()]
    table = format_table(["config", "step img/s", "end-to-end steady", "end-to-end epoch", "steady / step",
                          "data wait"], rows)
    title = (f"{args.method} {args.arch} {args.crop_size} px batch {args.batch_size}, {args.num_images} JPEGs "
             f"{args.image_size[0]}x{args.image_size[1]}, -j {args.workers}, {device}")
    print(f"\n{title}\n{table}", flush=True)
    return save_record(args, "endtoend", device, results, table, title, step=steps)


if __name__ == "__main__":
    main()
