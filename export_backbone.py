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
  torchscript   the whole backbone, architecture included (torch.jit.load)
  onnx          the same as an ONNX graph, input "images" N x 3 x H x W, output "features"
Before anything is written, the exported model's features are compared with ours on a
random batch (fp32, atol 1e-5; ONNX through onnxruntime when it is installed). A JSON file
beside the export records the architecture, stem, feature width and input size.
"""
import argparse
import json
import os
import tempfile
import warnings
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torchvision.models as tvm

from common.checkpoint import load_checkpoint, save_atomic
from common.cli import HelpFormatter
from common.errors import UserError, report_user_errors
from common.extras import available, require
from common.models import arch_names, build_backbone
from common.pretrained import extract_backbone, load_backbone

FORMATS = {"torchvision": ".pth", "torchscript": ".pt", "onnx": ".onnx"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint's backbone (torchvision state_dict, TorchScript, "
                                            "ONNX)", formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a .pth.tar from main_moco.py, main_simclr.py, main_lincls.py or "
                                      "facebookresearch/moco")
    p.add_argument("--format", default="torchvision", choices=list(FORMATS))
    p.add_argument("-o", "--output", default="", help="file to write (default: beside the checkpoint, "
                                                      "<name>_backbone.pth / .pt / .onnx)")
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


def write(fmt: str, model: nn.Module, weights: Dict, example: torch.Tensor, tmp: str) -> None:
    if fmt == "torchvision":
        save_atomic(weights, tmp)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript's deprecation notice: the file still loads everywhere
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, example), tmp)
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
    ckpt = load_checkpoint(args.checkpoint)
    if not isinstance(ckpt.get("state_dict"), dict) or not ckpt["state_dict"]:
        raise UserError(f"{args.checkpoint!r} holds no model weights; pass a checkpoint from main_moco.py, "
                        f"main_simclr.py, main_lincls.py or facebookresearch/moco")
    info = describe(ckpt, args, args.checkpoint)
    model, weights = backbone_and_head(ckpt, info, args.checkpoint, with_head=not args.no_head)
    out = args.output or os.path.splitext(os.path.splitext(args.checkpoint)[0])[0] + "_backbone" + FORMATS[args.format]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    torch.manual_seed(0)
    x = torch.randn(4, 3, info["crop_size"], info["crop_size"])
    with torch.no_grad():
        expected = model(x)
    info["feature_dim"] = model.fc.in_features if "num_classes" in info else int(expected.shape[1])
    # written under a temporary name, checked, then moved into place: a failed check leaves nothing
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=FORMATS[args.format])
    os.close(fd)
    try:
        write(args.format, model, weights, x[:2], tmp)
        forward = exported_forward(args.format, tmp, info)
        if forward is not None:
            with torch.no_grad():
                got = forward(x[1:])  # another batch size than the trace's: the export is not fixed to it
            err = (got - expected[1:]).abs().max().item()
            if got.shape != expected[1:].shape or err > 1e-5:
                raise UserError(f"the {args.format} export does not reproduce the backbone's features (max "
                                f"difference {err:.2e}); nothing was written; please report this with the checkpoint")
            info["max_abs_difference"] = err
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    info.update(format=args.format, file=os.path.abspath(out))
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    print(f"=> {out}: {info['arch']} backbone ({info['feature_dim']}-d features"
          + (f", head of {info['num_classes']} classes" if "num_classes" in info else "") + ")"
          + (f", matches on a random batch (max difference {info['max_abs_difference']:.1e})"
             if "max_abs_difference" in info else ""))


if __name__ == "__main__":
    main()
