#!/usr/bin/env python
"""Forward + backward time of one BatchNorm layer as single-device MoCo runs it
(SplitBatchNorm, --bn-splits groups) in each memory format, next to plain BatchNorm2d
(no groups: the floor). "reshape" is the reference's path on a channels-last tensor: the
(N/S, C*S, H, W) reshape copies it, and its NCHW output is copied back to NHWC for the
next convolution; "grouped" is what SplitBatchNorm now does on channels-last input.

    python bench/split_bn.py --device cuda --shape 256 256 56 56
"""
import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.util import format_table, machine_info, median, synchronize, write_json  # noqa: E402
from moco.split_bn import SplitBatchNorm  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SplitBatchNorm forward+backward per memory format")
    p.add_argument("--shape", nargs=4, type=int, default=[256, 256, 56, 56], metavar=("N", "C", "H", "W"),
                   help="activation shape (default: ResNet-50 layer1 at 224 px, batch 256)")
    p.add_argument("--splits", default=8, type=int)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", default=20, type=int)
    p.add_argument("--json", default="runs/bench/split_bn.json")
    return p


def time_ms(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return median(times)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    n, c, h, w = args.shape
    cl = torch.channels_last
    rows, results = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, c, h, w, device=device, dtype=dtype)
        g = torch.randn_like(x)
        cases = {
            "BatchNorm2d NCHW (no groups)": (nn.BatchNorm2d(c), x, None),
            "BatchNorm2d NHWC (no groups)": (nn.BatchNorm2d(c), x.contiguous(memory_format=cl), None),
            "SplitBatchNorm NCHW": (SplitBatchNorm(c, args.splits), x, None),
            "SplitBatchNorm NHWC reshape (reference)": (SplitBatchNorm(c, args.splits), x, cl),
            "SplitBatchNorm NHWC grouped (ours)": (SplitBatchNorm(c, args.splits), x.contiguous(memory_format=cl), None),
        }
        for name, (bn, inp, back_to) in cases.items():
            bn = bn.to(device)
            inp = inp.detach().requires_grad_()
            grad = g.contiguous(memory_format=cl) if back_to or not inp.is_contiguous() else g

            def step():
                y = bn(inp.contiguous() if back_to else inp)
                if back_to:  # the next convolution wants NHWC again
                    y = y.contiguous(memory_format=back_to)
                y.backward(grad)
            ms = time_ms(step, device, args.repeats)
            results[f"{name} {dtype}"] = ms
            rows.append([name, str(dtype).replace("torch.", ""), f"{ms:.3f}"])
            print(f"   {name} {dtype}: {ms:.3f} ms", flush=True)
    table = format_table(["layer", "dtype", "fwd+bwd ms"], rows)
    print(f"\nBN layer {n}x{c}x{h}x{w}, {args.splits} groups, {device}\n{table}", flush=True)
    write_json(args.json, {"benchmark": "split_bn", "config": vars(args), "machine": machine_info(device),
                           "results": results, "table": table})
    return results


if __name__ == "__main__":
    main()
