"""The export formats: how each is written and how it is read back, as a user would, to be
compared with our backbone's features before anything is moved into place."""
import io
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torchvision.models as tvm

from common.extras import available, require
from common.nets.backbones import adopt_position_embedding
from common.nets.models import build_backbone
from export import detectron2

FORMATS = {"torchvision": ".pth", "torchscript": ".pt", "onnx": ".onnx", "torch-export": ".pt2",
           "detectron2": ".pkl"}
# fp32 kernels differ in summation order between runtimes, so the difference grows with the
# features' scale (a trained backbone's reach ~100): a wrong stem or missing buffer is off by
# far more than 1e-4 of it
RTOL, ATOL = 1e-4, 1e-5


def payload(fmt: str, weights: Dict[str, torch.Tensor]) -> Optional[bytes]:
    """The file's bytes for the formats that are plain data (torchvision, detectron2), so its
    hash, and the name that carries it, are known before it is written; None for the
    formats an exporter writes to a path."""
    if fmt == "torchvision":
        # serialised to memory: torch.save onto a path names the zip's inner folder after the
        # (temporary) file, so the same weights would hash differently on every export
        buf = io.BytesIO()
        torch.save(weights, buf)
        return buf.getvalue()
    if fmt == "detectron2":
        return detectron2.payload(weights)
    return None


def write(fmt: str, model: nn.Module, data: Optional[bytes], example: torch.Tensor, tmp: str) -> None:
    if data is not None:
        with open(tmp, "wb") as f:
            f.write(data)
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript's deprecation notice: the file still loads everywhere
            warnings.simplefilter("ignore")
            # check_trace off: a ViT's attention fast path traces differently on each run (the graphs
            # compare unequal though they compute the same); the export is checked on a random batch
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), tmp)
    elif fmt == "torch-export":
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, tmp)
    else:
        require("onnx")
        require("onnxscript")  # torch's ONNX exporter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["features"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                              external_data=False)  # one self-contained file


def in_channels(info: Dict) -> int:
    """The channels an export reads: its JSON's `in_channels`; a JSON written before
    --in-channels has none and describes an RGB network."""
    return int(info.get("in_channels") or 3)


def plain_torchvision(info: Dict) -> nn.Module:
    """torchvision's own ResNet as the sidecar JSON describes it, built here without our
    code: the check that a user's `torchvision.models.<arch>()` takes the export."""
    net = tvm.get_model(info["arch"], num_classes=info.get("num_classes", 1000))
    channels = in_channels(info)
    if info["small_images"]:
        net.conv1 = nn.Conv2d(channels, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:  # torchvision's own stem, reading the export's channel count
        net.conv1 = nn.Conv2d(channels, net.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    if "num_classes" not in info:
        net.fc = nn.Identity()
    return net


def network(info: Dict, state: Dict[str, torch.Tensor]) -> nn.Module:
    """The network the export's `state` loads into strictly: build_backbone with the JSON's
    arch and stem, a ViT's position embedding on the grid `state` has, `fc` an Identity (a
    lincls export keeps its linear head)."""
    net = build_backbone(info["arch"], num_classes=info.get("num_classes", 1000), small_images=info["small_images"],
                         in_channels=in_channels(info))
    adopt_position_embedding(net, state)
    if "num_classes" not in info:
        net.fc = nn.Identity()
    return net


def exported_forward(fmt: str, file: str, info: Dict) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The exported model, read back from `file` as a user would, as a function of a batch."""
    if fmt in ("torchvision", "detectron2"):
        if fmt == "detectron2":
            state = detectron2.read_back(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        # a ResNet in plain torchvision; other families in our `body.*` layout (or their stem)
        net = plain_torchvision(info) if info["family"] == "ResNet" else network(info, state)
        net.load_state_dict(state, strict=True)
        return net.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(file, map_location="cpu").eval()
    if fmt == "torch-export":
        return torch.export.load(file).module()
    if not available("onnxruntime"):
        print("=> onnxruntime is not installed: the ONNX file is checked by onnx.checker only", flush=True)
        require("onnx").checker.check_model(file)
        return None
    session = require("onnxruntime").InferenceSession(file, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def matches(got: torch.Tensor, expected: torch.Tensor) -> Tuple[bool, float, float]:
    """Whether the export's features are ours up to fp32 reordering, the largest absolute
    difference and that difference relative to the largest feature."""
    if got.shape != expected.shape:
        return False, float("inf"), float("inf")
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err <= RTOL * scale + ATOL, err, err / max(scale, 1e-12)
