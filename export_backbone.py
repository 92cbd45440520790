#!/usr/bin/env python
"""Take the backbone out of a checkpoint, for use in your own code.

    python export_backbone.py runs/moco/checkpoint_last.pth.tar                    # torchvision state_dict
    python export_backbone.py runs/simclr/checkpoint_last.pth.tar --format torchscript
    python export_backbone.py runs/lincls/model_best.pth.tar --format onnx          # needs onnx, onnxscript

Reads any checkpoint main_moco.py, main_simclr.py or main_lincls.py wrote, and
facebookresearch/moco's. Formats:
  torchvision   a state_dict that `torchvision.models.<arch>()` loads with strict=True once
                its `fc` is nn.Identity() (with a lincls linear head: with its `fc`, for
                `<arch>(num_classes=C)`); CIFAR-stem backbones also need the stem swap the
                sidecar JSON describes
                Other families (ConvNeXt, EfficientNet, MobileNet, DenseNet, Swin, ViT, ...)
                are exported in our layout, `body.*` (+ `fc.*`): rebuild them with
                common.nets.models.build_backbone(arch, small_images=...) as the sidecar's
                "family" and "small_images" say, set `fc` to nn.Identity() and load strictly
  torchscript   the whole backbone, architecture included (torch.jit.load)
  onnx          the same as an ONNX graph, input "images" N x 3 x H x W, output "features"
Before anything is written, the exported model's features are compared with ours on a
random batch (fp32: the largest difference within 1e-4 of the largest feature, + 1e-5; ONNX
through onnxruntime when it is installed). `<output file>.json` beside the export (e.g.
checkpoint_last_backbone.pth.json) records the architecture, stem, feature width and input size.
"""
import argparse
import json
import os
import warnings
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torchvision.models as tvm

from common.ckpt.atomic import atomic_path, create_temp
from common.ckpt.io import load_checkpoint
from common.ckpt.pretrained import extract_backbone, load_backbone
from common.cli import HelpFormatter
from common.errors import UserError, report_user_errors
from common.extras import available, require
from common.nets.backbones import family
from common.nets.models import arch_names, build_backbone

FORMATS = {"torchvision": ".pth", "torchscript": ".pt", "onnx": ".onnx"}
# fp32 kernels differ in summation order between runtimes, so the difference grows with the
# features' scale (a trained backbone's reach ~100): a wrong stem or missing buffer is off by
# far more than 1e-4 of it
RTOL, ATOL = 1e-4, 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint's backbone (torchvision state_dict, TorchScript, "
                                            "ONNX)", formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a .pth.tar from main_moco.py, main_simclr.py, main_lincls.py or "
                                      "facebookresearch/moco")
    p.add_argument("--format", default="torchvision", choices=list(FORMATS))
    p.add_argument("-o", "--output", default="", help="file to write, plus <file>.json beside it (default: "
                                                      "beside the checkpoint, <name>_backbone.pth / .pt / .onnx)")
    p.add_argument("-a", "--arch", default=None, choices=arch_names(), metavar="ARCH",
                   help="architecture, when the checkpoint does not say (ours always do)")
    p.add_argument("--small-images", default=None, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem, when the checkpoint does not say (default: as trained)")
    p.add_argument("--crop-size", default=None, type=int,
                   help="input side of the check batch and of the ONNX graph (default: as trained, else 224)")
    p.add_argument("--no-head", action="store_true", help="leave out a lincls checkpoint's linear head")
    return p


def describe(ckpt: Dict, args: argparse.Namespace, path: str) -> Dict:
    """Architecture, stem and input size: from the flags, else the checkpoint's own args."""
    saved = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
    arch = args.arch or ckpt.get("arch")
    if arch is None:
        raise UserError(f"{path!r} does not say its architecture; pass -a/--arch (e.g. -a resnet50)")
    crop = args.crop_size or saved.get("crop_size") or 224
    small = args.small_images if args.small_images is not None else saved.get("small_images", False)
    return {"arch": arch, "small_images": bool(small), "crop_size": int(crop), "method": ckpt.get("method"),
            "checkpoint": os.path.abspath(path)}


def backbone_and_head(ckpt: Dict, info: Dict, path: str, with_head: bool) -> Tuple[nn.Module, Dict]:
    """Our backbone with the checkpoint's weights (fc = Identity, or a lincls linear fc), in
    eval mode, and the torchvision-format state_dict that holds exactly its weights."""
    weights, layout = extract_backbone(ckpt["state_dict"])
    state = ckpt["state_dict"]
    prefix = "module." if any(k.startswith("module.fc.") for k in state) else ""
    head = {k[len(prefix) + 3:]: v for k, v in state.items() if k.startswith(prefix + "fc.")}
    linear_head = layout == "classifier" and set(head) == {"weight", "bias"} and head["weight"].ndim == 2
    model = build_backbone(info["arch"], small_images=info["small_images"])
    load_backbone(model, ckpt, path)  # a missing, extra or misshapen tensor is a plain error naming the flags
    model.fc = nn.Identity()
    if with_head and linear_head:
        model.fc = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        model.fc.load_state_dict(head)
        weights = {**weights, **{"fc." + k: v for k, v in head.items()}}
        info["num_classes"] = head["weight"].shape[0]
    elif with_head and head and layout == "classifier":
        print("=> the classifier's head is not a single linear layer (--head mlp or --head-bn): exporting the "
              "backbone alone", flush=True)
    return model.eval(), {k: v.detach().clone().contiguous() for k, v in weights.items()}


def exported_forward(fmt: str, file: str, info: Dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported model, read back from `file` as a user would, as a function of a batch."""
    if fmt == "torchvision" and info["family"] != "ResNet":  # `body.*` layout, or a non-ResNet stem
        net = build_backbone(info["arch"], num_classes=info.get("num_classes", 1000),
                             small_images=info["small_images"])
        if "num_classes" not in info:
            net.fc = nn.Identity()
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True), strict=True)
        return net.eval()
    if fmt == "torchvision":
        net = tvm.get_model(info["arch"], num_classes=info.get("num_classes", 1000))
        if info["small_images"]:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        if "num_classes" not in info:
            net.fc = nn.Identity()
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True), strict=True)
        return net.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(file, map_location="cpu").eval()
    if not available("onnxruntime"):
        print("=> onnxruntime is not installed: the ONNX file is checked by onnx.checker only", flush=True)
        require("onnx").checker.check_model(file)
        return None
    session = require("onnxruntime").InferenceSession(file, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def sidecar(out: str) -> str:
    """The JSON beside an export: named after the whole file, so a .pth and a .pt of one
    checkpoint each keep their own."""
    return out + ".json"


def _reason(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def check_output(out: str, checkpoint: str, ext: str) -> None:
    """Before the slow part: `out` and its JSON are files we may write that are not the
    checkpoint itself (under any spelling, symlink or hard link)."""
    if os.path.isdir(out):
        raise UserError(f"{out} is a folder; pass -o a file name, e.g. -o "
                        f"{os.path.join(out, os.path.basename(default_output(checkpoint, ext)))}")
    if os.path.isdir(sidecar(out)):
        raise UserError(f"{sidecar(out)} is a folder, where the export's JSON goes; move it or pass another -o")
    for target in (out, sidecar(out)):
        if os.path.exists(target) and os.path.exists(checkpoint) and os.path.samefile(target, checkpoint):
            raise UserError(f"writing {out} would overwrite the checkpoint {checkpoint} itself; pass another -o "
                            f"(the default is {default_output(checkpoint, ext)})")


def make_room(out: str) -> None:
    """`out`'s folder, created if missing, and one we can create files in: found out before
    the export rather than after it."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        os.remove(create_temp(out))
    except OSError as e:
        raise UserError(f"cannot write {out} ({_reason(e)}); pass -o a path in a folder you can write to")


def default_output(checkpoint: str, ext: str) -> str:
    return os.path.splitext(os.path.splitext(checkpoint)[0])[0] + "_backbone" + ext


def matches(got: torch.Tensor, expected: torch.Tensor) -> Tuple[bool, float, float]:
    """Whether the export's features are ours up to fp32 reordering, the largest absolute
    difference and that difference relative to the largest feature."""
    if got.shape != expected.shape:
        return False, float("inf"), float("inf")
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err <= RTOL * scale + ATOL, err, err / max(scale, 1e-12)


def write(fmt: str, model: nn.Module, weights: Dict, example: torch.Tensor, tmp: str) -> None:
    if fmt == "torchvision":
        torch.save(weights, tmp)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript's deprecation notice: the file still loads everywhere
            warnings.simplefilter("ignore")
            # check_trace off: a ViT's attention fast path traces differently on each run (the graphs
            # compare unequal though they compute the same); the export is checked on a random batch below
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), tmp)
    else:
        require("onnx")
        require("onnxscript")  # torch's ONNX exporter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["features"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                              external_data=False)  # one self-contained file


@report_user_errors
def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    out = args.output or default_output(args.checkpoint, FORMATS[args.format])
    check_output(out, args.checkpoint, FORMATS[args.format])
    ckpt = load_checkpoint(args.checkpoint)
    make_room(out)  # after the checkpoint read: a mistyped checkpoint leaves no new folder behind
    if not isinstance(ckpt.get("state_dict"), dict) or not ckpt["state_dict"]:
        raise UserError(f"{args.checkpoint!r} holds no model weights; pass a checkpoint from main_moco.py, "
                        f"main_simclr.py, main_lincls.py or facebookresearch/moco")
    info = describe(ckpt, args, args.checkpoint)
    model, weights = backbone_and_head(ckpt, info, args.checkpoint, with_head=not args.no_head)
    info["family"] = family(model)  # not ResNet: rebuild with build_backbone (`body.*` layout when wrapped)

    torch.manual_seed(0)
    x = torch.randn(4, 3, info["crop_size"], info["crop_size"])
    with torch.no_grad():
        expected = model(x)
    if not torch.isfinite(expected).all():
        raise UserError(f"{args.checkpoint!r} gives NaN or infinite features on a random batch; export a "
                        f"checkpoint from before the run diverged")
    info["feature_dim"] = model.fc.in_features if "num_classes" in info else int(expected.shape[1])
    info.update(format=args.format, file=os.path.abspath(out))
    # both files are written under temporary names, checked, then moved into place (the
    # export first, the JSON that describes it last): a failed check or write leaves
    # nothing, and an earlier export of that name intact
    try:
        with atomic_path(sidecar(out)) as tmp_json, atomic_path(out) as tmp:
            write(args.format, model, weights, x[:2], tmp)
            forward = exported_forward(args.format, tmp, info)
            if forward is not None:
                with torch.no_grad():
                    got = forward(x[1:])  # another batch size than the trace's: the export is not fixed to it
                ok, err, rel = matches(got, expected[1:])
                if not ok:
                    raise UserError(f"the {args.format} export does not reproduce the backbone's features (max "
                                    f"difference {err:.2e}, {rel:.1e} of the largest feature); nothing was "
                                    f"written; please report this with the checkpoint")
                info.update(max_abs_difference=err, max_rel_difference=rel)
            with open(tmp_json, "w") as f:
                json.dump(info, f, indent=1)
    except OSError as e:
        raise UserError(f"could not write {out} ({_reason(e)}); nothing was written; pass -o a path in a "
                        f"folder you can write to, with space left") from e
    print(f"=> {out}: {info['arch']} backbone ({info['feature_dim']}-d features"
          + (f", head of {info['num_classes']} classes" if "num_classes" in info else "") + ")"
          + (f", matches on a random batch (max difference {info['max_abs_difference']:.1e}, "
             f"{info['max_rel_difference']:.1e} of the largest feature)" if "max_abs_difference" in info else "")
          + f"; {sidecar(out)} describes it", flush=True)


if __name__ == "__main__":
    main()
