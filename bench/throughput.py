#!/usr/bin/env python
"""Pretraining step throughput, step time and peak memory of MoCo v2 and SimCLR, in one
process: a baseline written like facebookresearch/moco's loop (fp32, NCHW, for-loop SGD,
`loss.item()` and accuracy read every step) against our engine (common/train/step.py) with
its defaults and with each speed flag. Configurations are interleaved (A B C A B C ...)
so drifting clocks or a busy neighbour hit all of them alike; medians are reported, and
every ratio is against the baseline measured in the same run.

    python bench/throughput.py -a resnet18 --crop-size 32 -b 32 --device cpu --steps 4 --repeats 3
    python bench/throughput.py -a resnet50 --crop-size 224 -b 128 --device cuda
    python bench/throughput.py --families --crop-size 32 -b 16 --device cpu --steps 2 --repeats 3

--families measures our default step (the "default" configuration) once per backbone
family instead, each family's smallest member (common/nets/backbones.py), interleaved the
same way, every ratio against the first family (resnet18) of the same run.

Inputs are random tensors already in memory (the data pipeline has its own benchmark,
bench/dataloader.py, and bench/endtoend.py runs the real script on JPEG files), handed
over as CPU batches (pinned on a GPU) the way a loader does: float views, or for the
*gpu_augment configurations uint8 crops with their photometric parameters, so the step
includes the batched colour jitter, grayscale, blur and normalisation on the device; for
the *gpu_decode ones the JPEG files' bytes (--jpeg-size, texture images) with every
view's crop box and parameters, so the step also includes decoding, cropping and
flipping on the device.
"""
import argparse
import contextlib
import functools
import io
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.util import (  # noqa: E402
    format_table,
    machine_info,
    median,
    peak_memory_block,
    resolve_device,
    synchronize,
    texture_jpeg,
    write_json,
)
from common.augment import transforms as augment  # noqa: E402
from common.augment.gpu import ViewsToDevice, draw_params  # noqa: E402
from common.augment.gpu_decode import DecodeToDevice, EncodedImage, EncodedViews, collate_encoded  # noqa: E402
from common.distributed.collectives import DistEnv  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402
from common.nets.backbones import family  # noqa: E402
from common.nets.models import build_backbone, feature_dim, has_batchnorm  # noqa: E402
from common.nets.precision import Precision  # noqa: E402
from common.train.data import PretrainData  # noqa: E402
from common.train.optim import LARS, split_decay_groups  # noqa: E402
from common.train.step import train_one_epoch  # noqa: E402
from moco.augment import moco_v2  # noqa: E402
from moco.builder import MoCo  # noqa: E402
from moco.split_bn import SplitBatchNorm  # noqa: E402
from simclr.augment import simclr_augmentation  # noqa: E402
from simclr.builder import SimCLR  # noqa: E402

# --families: each family's smallest member (ConvNeXt: the narrow convnext_micro), the first one the baseline
FAMILY_ARCHS = ["resnet18", "regnet_y_400mf", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                "convnext_micro", "convnext_tiny", "swin_t", "vit_tiny"]
# name -> what differs from our default path. "baseline" is the reference-style loop.
CONFIGS: Dict[str, Dict] = {
    "baseline": dict(loop="reference", optim_impl="loop"),
    "default": dict(),
    "amp": dict(amp=True),
    "channels_last": dict(channels_last=True),
    "amp+channels_last": dict(amp=True, channels_last=True),
    "foreach_optim": dict(optim_impl="foreach"),
    "fused_optim": dict(optim_impl="fused"),
    "gpu_augment": dict(gpu_augment=True),
    "amp+channels_last+gpu_augment": dict(amp=True, channels_last=True, gpu_augment=True),
    "amp+channels_last+fused_optim": dict(amp=True, channels_last=True, optim_impl="fused"),
    "compile": dict(compile=True),
    "amp+channels_last+compile": dict(amp=True, channels_last=True, compile=True),
    "amp+channels_last+gpu_augment+compile": dict(amp=True, channels_last=True, gpu_augment=True, compile=True),
    "gpu_decode": dict(gpu_augment=True, gpu_decode=True),
    "amp+channels_last+gpu_decode": dict(amp=True, channels_last=True, gpu_augment=True, gpu_decode=True),
    "amp+channels_last+gpu_decode+compile": dict(amp=True, channels_last=True, gpu_augment=True, gpu_decode=True,
                                                 compile=True),
}
DEFAULT_CONFIGS = {"cpu": ["baseline", "default", "amp", "channels_last", "amp+channels_last", "foreach_optim",
                           "fused_optim"],
                   "cuda": list(CONFIGS)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoCo v2 / SimCLR pretraining step throughput vs a reference-style loop")
    p.add_argument("--methods", nargs="+", default=["moco", "simclr"], choices=("moco", "simclr"))
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--crop-size", default=32, type=int)
    p.add_argument("-b", "--batch-size", default=32, type=int, help="images per step (each seen as two views)")
    p.add_argument("--small-images", default=None, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem (default: on for crops <= 64 px, as the scripts do)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="which configurations (default: all on cuda; on cpu all but compile, whose "
                        "inductor build takes minutes on a small CPU)")
    p.add_argument("--amp-dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--steps", default=10, type=int, help="timed steps per repeat")
    p.add_argument("--warmup", default=3, type=int, help="untimed steps per configuration before the repeats "
                                                          "(their time, torch.compile's included, is 'warm-up s')")
    p.add_argument("--repeats", default=5, type=int, help="interleaved timed repeats per configuration")
    p.add_argument("--moco-k", default=4096, type=int)
    p.add_argument("--bn-splits", default=2, type=int, help="MoCo SplitBatchNorm groups (single-process run)")
    p.add_argument("--simclr-optimizer", default="lars", choices=("lars", "sgd"),
                   help="SimCLR's optimizer (the *_optim configurations need sgd: LARS has one implementation)")
    p.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--jpeg-size", default=[500, 375], type=int, nargs=2, metavar=("W", "H"),
                   help="size of the JPEGs the *gpu_decode configurations decode")
    p.add_argument("--families", nargs="*", default=None, metavar="ARCH",
                   help="one row per backbone family (our default step, parameters, ratio against the first) "
                        f"instead of the configurations; the bare flag: {' '.join(FAMILY_ARCHS)}")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--json", default="runs/bench/throughput.json")
    return p


def finalize(args: argparse.Namespace) -> argparse.Namespace:
    args.device = resolve_device(args.device)
    if args.small_images is None:
        args.small_images = args.crop_size <= 64
    if args.families == []:
        args.families = FAMILY_ARCHS
    if args.configs is None:
        args.configs = ["default"] if args.families else DEFAULT_CONFIGS[args.device]
    if "baseline" not in args.configs and not args.families:
        args.configs = ["baseline"] + args.configs  # every ratio is against it
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        raise UserError("--steps and --repeats must be at least 1 and --warmup at least 0")
    if args.moco_k % args.batch_size:
        raise UserError(f"--moco-k {args.moco_k} is not a multiple of --batch-size {args.batch_size}; "
                        f"use e.g. --moco-k {max(1, args.moco_k // args.batch_size) * args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---------------------------------------------------------------- one configuration

def build_model(method: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)  # every configuration starts from the same weights
    if method == "moco":
        norm = functools.partial(SplitBatchNorm, num_splits=args.bn_splits) if args.bn_splits > 1 else None
        enc = functools.partial(build_backbone, args.arch, small_images=args.small_images, norm_layer=norm)
        return MoCo(enc, 128, args.moco_k, 0.99, 0.2, mlp=True)
    return SimCLR(functools.partial(build_backbone, args.arch, small_images=args.small_images), temperature=0.2)


def build_optimizer(method: str, model: nn.Module, impl: str, device: torch.device, args) -> torch.optim.Optimizer:
    """The scripts' optimizers (MoCo: SGD lr 0.03, wd 1e-4; SimCLR: LARS) with the update
    implementation `impl`: loop (per-tensor Python loop, the reference's torch 1.x), foreach
    (multi-tensor kernels), fused (one fused kernel), default (what our script picks)."""
    if method == "simclr" and args.simclr_optimizer == "lars":
        return LARS(split_decay_groups(model), 0.3, momentum=0.9, weight_decay=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
          "default": dict(foreach=device.type == "cuda")}[impl]  # default: main_moco.py's choice
    return torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4, **kw)


class Runner:
    """A model, optimizer and step function for one (method, configuration)."""

    def __init__(self, method: str, name: str, args: argparse.Namespace, device: torch.device, label: str = ""):
        """name: the configuration; label: what the results call it (default: name)."""
        cfg = {"loop": "engine", "amp": False, "channels_last": False, "compile": False, "optim_impl": "default",
               "gpu_augment": False, "gpu_decode": False, **CONFIGS[name]}
        self.name, self.cfg, self.device = label or name, cfg, device
        self.model = build_model(method, args).to(device)
        self.params = sum(p.numel() for n, p in self.model.networks()[0].named_parameters() if not n.startswith("fc."))
        if cfg["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        if cfg["compile"]:
            # as the scripts do (common.distributed.placement.place_model): the networks, in place, glue eager
            for net in self.model.networks():
                net.compile()
        self.optimizer = build_optimizer(method, self.model, cfg["optim_impl"], device, args)
        self.args = argparse.Namespace(amp=cfg["amp"], amp_dtype=args.amp_dtype, channels_last=cfg["channels_last"],
                                       print_freq=10 ** 9, epochs=1, lr=0.03, output_dir="")
        self.scaler = Precision.from_args(self.args).scaler(device)
        self.env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, distributed=False, local_world_size=1)
        view_recipe = recipe(method, args.crop_size)
        self.prepare = DecodeToDevice(view_recipe, device, cfg["channels_last"]) if cfg["gpu_decode"] else \
            ViewsToDevice(device, cfg["channels_last"], view_recipe.spec() if cfg["gpu_augment"] else None)
        self.state_bytes = 0

    def run(self, batches: Dict[str, List]) -> None:
        batches = batches["encoded" if self.cfg["gpu_decode"] else "uint8" if self.cfg["gpu_augment"] else "float"]
        if self.cfg["loop"] == "reference":
            reference_loop(self.model, self.optimizer, batches, self.device)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # the engine's end-of-epoch progress line
                data = PretrainData(None, batches, None, len(batches[0][1]), len(batches), self.prepare)
                train_one_epoch(self.model, data, self.optimizer, self.scaler, lambda _: 0.03, 0, self.args, self.env)
        synchronize(self.device)

    def measure_state(self) -> None:
        """Bytes of weights, buffers and optimizer state (all resident for the whole run)."""
        n = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))
        for st in self.optimizer.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        self.state_bytes = n


def reference_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: List, device: torch.device) -> None:
    """facebookresearch/moco's train(): move both views, forward, read loss and accuracy
    into AverageMeters every step (two host syncs), zero_grad, backward, step; fp32, NCHW."""
    model.train()
    losses, top1 = [], []
    for images, _ in batches:
        im_q = images[0].to(device, non_blocking=True)
        im_k = images[1].to(device, non_blocking=True)
        loss, stats = model(im_q, im_k)
        losses.append(loss.item())
        top1.append(stats["acc1"].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def recipe(method: str, crop_size: int) -> augment.Recipe:
    """The scripts' recipe (main_moco.py --aug-plus, main_simclr.py), blur above 64 px."""
    if method == "moco":
        return moco_v2(crop_size, blur=crop_size > 64)
    return simclr_augmentation(crop_size, blur=crop_size > 64)


def make_batches(args: argparse.Namespace, device: torch.device, n: int, method: str) -> Dict[str, List]:
    """n loader-style batches ([view1, view2], labels) on the CPU (pinned for a GPU), as the
    CPU path hands them over ("float": normalised views), as --gpu-augment does ("uint8":
    [crops, photometric parameters] per view) and as --gpu-decode does ("encoded": JPEG
    bytes, crop boxes, parameters; only when a configuration needs them); two distinct
    batches reused, which is all a step's cost depends on."""
    g = torch.Generator().manual_seed(args.seed)
    view_recipe = recipe(method, args.crop_size)
    spec = view_recipe.spec()
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)  # noqa: E731
    shape = (args.batch_size, 3, args.crop_size, args.crop_size)
    distinct = {"float": [], "uint8": [], "encoded": []}
    encoded = any(CONFIGS[c].get("gpu_decode") for c in args.configs)
    for b in range(min(n, 2)):
        labels = torch.zeros(args.batch_size, dtype=torch.long)
        distinct["float"].append(([pin(torch.randn(*shape, generator=g)) for _ in range(2)], labels))
        distinct["uint8"].append(([[pin(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)),
                                    pin(torch.stack([draw_params(spec) for _ in range(args.batch_size)]))]
                                   for _ in range(2)], labels))
        if encoded:
            views = EncodedViews(view_recipe)
            width, height = args.jpeg_size
            samples = [(views(EncodedImage(texture_jpeg(width, height, b * args.batch_size + i), width, height)), 0)
                       for i in range(args.batch_size)]
            (packed, geometry, params), _ = collate_encoded(samples)
            packed[0] = pin(packed[0])  # the JPEG bytes, as the loader's pin_memory hands them over
            distinct["encoded"].append(([packed, geometry, pin(params)], labels))
    return {kind: [b[i % len(b)] for i in range(n)] for kind, b in distinct.items() if b}


def bench_method(method: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Dict]:
    """{configuration: figures}; with --families, {arch: figures} of the one configuration."""
    runners = {}
    warm_batches = make_batches(args, device, max(args.warmup, 1), method)
    batches = make_batches(args, device, args.steps, method)
    # --families: one runner per arch, all with the one configuration, keyed by the arch
    jobs = [(a, args.configs[0], argparse.Namespace(**{**vars(args), "arch": a})) for a in args.families] \
        if args.families else [(name, name, args) for name in args.configs]
    for name, config, run_args in jobs:
        if method == "simclr" and args.simclr_optimizer == "lars" and CONFIGS[config].get("optim_impl") in ("foreach", "fused"):
            print(f"   {method}/{name}: skipped (LARS has one implementation; --simclr-optimizer sgd compares them)")
            runners[name] = None
            continue
        r = Runner(method, config, run_args, device, label=name)
        t0 = time.perf_counter()
        try:
            r.run(warm_batches)  # cudnn autotuning, torch.compile, optimizer state, allocator warm-up
        except Exception as e:  # e.g. fused SGD or autocast unsupported on this build/device
            print(f"   {method}/{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
            runners[name] = None
            continue
        r.warmup_s = time.perf_counter() - t0
        r.measure_state()
        r.times, r.peak = [], None
        runners[name] = r
    active = [r for r in runners.values() if r is not None]
    for rep in range(args.repeats):
        for r in list(active):  # interleaved: A B C A B C ...
            with peak_memory_block(device) as mem:
                t0 = time.perf_counter()
                try:
                    r.run(batches)
                except UserError as e:  # the loss guard: a NaN/inf loss is a result, not a crash
                    print(f"   {method}/{r.name}: stopped ({e})", flush=True)
                    active.remove(r)
                    runners[r.name] = None
                    continue
                r.times.append(time.perf_counter() - t0)
            peak = mem.bytes + (r.state_bytes if device.type == "cpu" else 0)
            r.peak = peak if r.peak is None else max(r.peak, peak)
        print(f"   {method}: repeat {rep + 1}/{args.repeats} done", flush=True)
    out = {}
    for name, r in runners.items():
        if r is None:
            out[name] = {"skipped": True}
            continue
        step_s = median(r.times) / args.steps
        out[name] = {"config": r.cfg, "images_per_s": args.batch_size / step_s, "step_ms": 1000 * step_s,
                     "backbone_parameters": r.params,
                     "step_ms_all_repeats": [1000 * t / args.steps for t in r.times],
                     "peak_memory_mb": r.peak / 2 ** 20, "warmup_s": r.warmup_s}
    base = out[args.families[0] if args.families else "baseline"]
    for rec in out.values():
        if not rec.get("skipped") and not base.get("skipped"):
            rec["speedup_vs_baseline"] = rec["images_per_s"] / base["images_per_s"]
            rec["memory_vs_baseline"] = rec["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] else None
    return out


def families_table(results: Dict[str, Dict], args: argparse.Namespace) -> str:
    """One row per family: its member, width, BatchNorm or not, backbone parameters, and each
    method's images/s with the ratio against the first family."""
    rows = []
    for arch in args.families:
        net = build_backbone(arch, small_images=args.small_images)
        row = [family(net), arch, str(feature_dim(net)), "yes" if has_batchnorm(net) else "no"]
        first = next(r for r in (results[m][arch] for m in args.methods) if not r.get("skipped"))
        row.append(f"{first['backbone_parameters'] / 1e6:.2f}M")
        for m in args.methods:
            r = results[m][arch]
            row += ["skipped", ""] if r.get("skipped") else [f"{r['images_per_s']:.1f}",
                                                             f"{r['speedup_vs_baseline']:.2f}x"]
        rows.append(row)
    header = ["family", "arch", "width", "BatchNorm", "parameters"]
    for m in args.methods:
        header += [f"{m} images/s", f"vs {args.families[0]}"]
    return (f"backbone families ({args.crop_size} px, small images {'on' if args.small_images else 'off'}, batch "
            f"{args.batch_size}, {args.configs[0]} step, {args.device}):\n" + format_table(header, rows))


@report_user_errors
def main(argv=None) -> Dict:
    args = finalize(get_args_parser().parse_args(argv))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the scripts set it (common/pretrain.start_worker)
    results, tables = {}, []
    for method in args.methods:
        what = f"{len(args.families)} families" if args.families else f"{args.arch}, {len(args.configs)} configurations"
        print(f"=> {method}: {what}, {args.crop_size} px, batch {args.batch_size}, {args.repeats} repeats x "
              f"{args.steps} steps on {device}", flush=True)
        results[method] = bench_method(method, args, device)
        if args.families:
            continue
        rows = [[name, "skipped", "", "", "", ""] if r.get("skipped") else
                [name, f"{r['images_per_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['peak_memory_mb']:.0f}",
                 f"{r['speedup_vs_baseline']:.2f}x", f"{r['warmup_s']:.1f}"] for name, r in results[method].items()]
        mem = "peak allocated MiB" if device.type == "cuda" else "peak RSS MiB*"
        tables.append(f"{method} ({args.arch}, {args.crop_size} px, batch {args.batch_size}, {device}):\n"
                      + format_table(["config", "images/s", "step ms", mem, "vs baseline", "warm-up s"], rows))
    text = families_table(results, args) if args.families else "\n\n".join(tables)
    if device.type == "cpu" and not args.families:
        text += ("\n* CPU memory: sampled peak RSS growth during the timed steps plus the weights, buffers "
                 "and optimizer state; not comparable with GPU figures")
    print("\n" + text, flush=True)
    record = {"benchmark": "throughput", "config": vars(args), "machine": machine_info(device), "results": results,
              "table": text}
    write_json(args.json, record)
    print(f"=> {args.json}", flush=True)
    return record


if __name__ == "__main__":
    main()
