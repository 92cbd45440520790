#!/usr/bin/env python
"""Take the backbone out of a checkpoint, for use in your own code.

    python export_backbone.py runs/moco/checkpoint_last.pth.tar                    # torchvision state_dict
    python export_backbone.py runs/simclr/checkpoint_last.pth.tar --format torchscript
    python export_backbone.py runs/moco/checkpoint_last.pth.tar --format torch-export   # .pt2
    python export_backbone.py runs/moco/checkpoint_last.pth.tar --format detectron2     # ResNet, ImageNet stem
    python export_backbone.py runs/lincls/model_best.pth.tar --format onnx          # needs onnx, onnxscript

Reads any checkpoint main_moco.py, main_simclr.py or main_lincls.py wrote, and
facebookresearch/moco's. Formats:
  torchvision   a state_dict that `torchvision.models.<arch>()` loads with strict=True once
                its `fc` is nn.Identity() (with a lincls linear head: with its `fc`, for
                `<arch>(num_classes=C)`); CIFAR-stem backbones also need the stem swap the
                sidecar JSON describes, and a checkpoint of --in-channels other than 3 its
                first layer (conv1) reading the JSON's "in_channels" (hubconf.py's
                `backbone` entry point does all of them).
                Other families (ConvNeXt, EfficientNet, MobileNet, DenseNet, Swin, ViT, ...)
                are exported in our layout, `body.*` (+ `fc.*`): rebuild them with
                common.nets.models.build_backbone(arch, small_images=...) as the sidecar's
                "family" and "small_images" say, set `fc` to nn.Identity() and load strictly.
                The default name carries the file's hash, `<name>_backbone-<sha256[:8]>.pth`,
                as torch.hub.load_state_dict_from_url(check_hash=True) wants it
  torchscript   the whole backbone, architecture included (torch.jit.load)
  torch-export  the same as a torch.export program (torch.export.load(f).module()), batch dynamic
  onnx          the same as an ONNX graph, input "images" N x C x H x W (C: "in_channels", 3
                for RGB), output "features"
  detectron2    the pickle detectron2's DetectionCheckpointer reads for its ResNet (res2..res5,
                stem.conv1, matching_heuristics), as facebookresearch/moco's
                convert-pretrain-to-detectron2.py writes it, without the head
Before anything is written, the exported model's features are compared with ours on a
random batch (fp32: the largest difference within 1e-4 of the largest feature, + 1e-5; ONNX
through onnxruntime when it is installed; detectron2 read back under torchvision's names).
`<output file>.json` beside the export (e.g. checkpoint_last_backbone-1a2b3c4d.pth.json)
records the architecture, stem, input channels, feature width, input size, sha256 and
torchvision's Weights.meta fields (num_params, min_size, mean/std, the recipe and the run's
metrics). mean/std are ImageNet's for RGB; for a checkpoint of --in-channels N other than 3
they are the N per-channel statistics the run measured, in the images' stored units
("input_values" says which), and every example input (check batch, TorchScript trace, ONNX
graph) has N channels.
"""
import argparse
import os

from common.ckpt.io import load_checkpoint
from common.cli import ArgumentParser, switch
from common.errors import UserError, report_user_errors
from common.files.atomic import create_temp
from common.nets.models import arch_names
from export.backbone import backbone_and_head, export_model, os_reason, sidecar
from export.formats import FORMATS
from export.meta import describe


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Export a checkpoint's backbone (torchvision state_dict, TorchScript, "
                                   "torch.export, ONNX, detectron2)")
    p.add_argument("checkpoint", help="a .pth.tar from main_moco.py, main_simclr.py, main_lincls.py or "
                                      "facebookresearch/moco")
    p.add_argument("--format", default="torchvision", choices=list(FORMATS))
    p.add_argument("-o", "--output", default="", help="file to write, plus <file>.json beside it (default: "
                                                      "beside the checkpoint, <name>_backbone-<hash>.pth / "
                                                      "<name>_backbone.pt / .pt2 / .onnx / .pkl)")
    p.add_argument("-a", "--arch", default=None, choices=arch_names(), metavar="ARCH",
                   help="architecture, when the checkpoint does not say (ours always do)")
    switch(p, "--small-images", default=None, help="CIFAR stem, when the checkpoint does not say (default: as trained)")
    p.add_argument("--crop-size", default=None, type=int,
                   help="input side of the check batch and of the ONNX graph (default: as trained, else 224)")
    # not --head: main_lincls.py's --head is the kind of classifier; --no-head, the name before, still works
    switch(p, "--lincls-head", default=True, help="keep a lincls checkpoint's linear head (--no-lincls-head: leave it "
                                                  "out)")
    p.add_argument("--no-head", dest="lincls_head", action="store_false", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    return p


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
        raise UserError(f"cannot write {out} ({os_reason(e)}); pass -o a path in a folder you can write to")


def default_output(checkpoint: str, ext: str) -> str:
    return os.path.splitext(os.path.splitext(checkpoint)[0])[0] + "_backbone" + ext


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
    info = describe(ckpt, args.checkpoint, args.arch, args.small_images, args.crop_size)
    # detectron2's layout holds no classifier (moco's converter keeps one as stem.fc.*, which detectron2 ignores)
    model, weights = backbone_and_head(ckpt, info, args.checkpoint,
                                       with_head=args.lincls_head and args.format != "detectron2")
    # the default name of a state_dict carries its hash (torch.hub's check_hash); -o is kept as given
    out = export_model(args.format, model, weights, info, ckpt, args.checkpoint, out,
                       hash_in_name=not args.output)
    print(f"=> {out}: {info['arch']} backbone ({info['feature_dim']}-d features"
          + (f", head of {info['num_classes']} classes" if "num_classes" in info else "") + ")"
          + (f", matches on a random batch (max difference {info['max_abs_difference']:.1e}, "
             f"{info['max_rel_difference']:.1e} of the largest feature)" if "max_abs_difference" in info else "")
          + f"; {sidecar(out)} describes it", flush=True)


if __name__ == "__main__":
    main()
