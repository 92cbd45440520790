"""export_backbone.py: each format round-trips and gives our backbone's features; MoCo,
SimCLR, lincls and facebookresearch/moco checkpoints export; detectron2 and torch.export;
the default name's hash (refused and failed writes: test_export_writes.py)."""
import functools
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from conftest import _randomise_bn, _save

import export_backbone
from common.ckpt.pretrained import load_backbone
from common.extras import available
from common.nets.models import build_backbone
from moco.builder import MoCo


def export(argv, capsys=None):
    try:
        export_backbone.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, (capsys.readouterr().err if capsys is not None else "")


def ours(path: str, arch: str = "resnet18", small: bool = True) -> nn.Module:
    net = build_backbone(arch, small_images=small)
    load_backbone(net, torch.load(path, weights_only=True))
    net.fc = nn.Identity()
    return net.eval()


def plain_torchvision(arch: str, small: bool, num_classes=None) -> nn.Module:
    net = tvm.get_model(arch, num_classes=num_classes or 1000)
    if small:  # the stem swap the sidecar JSON describes
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if num_classes is None:
        net.fc = nn.Identity()
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["moco", "simclr", "reference"])
def test_torchvision_export_loads_strict_in_plain_torchvision_and_gives_our_features(checkpoints, kind, tmp_path):
    out = tmp_path / "backbone.pth"
    assert export([checkpoints[kind], "-o", str(out)])[0] == 0
    small, arch = kind != "reference", "resnet18" if kind != "reference" else "resnet50"
    net = plain_torchvision(arch, small)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(checkpoints[kind], arch, small)(x), atol=1e-5, rtol=0)
    info = json.load(open(tmp_path / "backbone.pth.json"))
    assert (info["arch"], info["small_images"], info["feature_dim"]) == (arch, small, 512 if small else 2048)


@pytest.mark.slow
def test_lincls_export_keeps_its_linear_head(checkpoints, tmp_path):
    out = tmp_path / "classifier.pth"
    assert export([checkpoints["lincls"], "-o", str(out)])[0] == 0
    net = plain_torchvision("resnet18", True, num_classes=3)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ref = build_backbone("resnet18", num_classes=3, small_images=True)
    ref.load_state_dict({k[7:]: v for k, v in torch.load(checkpoints["lincls"], weights_only=True)["state_dict"].items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref.eval()(x), atol=1e-5, rtol=0)
    assert json.load(open(tmp_path / "classifier.pth.json"))["num_classes"] == 3
    assert export([checkpoints["lincls"], "-o", str(tmp_path / "no_head.pth"), "--no-head"])[0] == 0
    assert not any(k.startswith("fc.") for k in torch.load(tmp_path / "no_head.pth", weights_only=True))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_export_round_trips(checkpoints, tmp_path):
    out = tmp_path / "backbone.pt"
    assert export([checkpoints["simclr"], "--format", "torchscript", "-o", str(out)])[0] == 0
    net = torch.jit.load(str(out))
    x = torch.randn(5, 3, 32, 32)  # another batch size than the trace's
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(checkpoints["simclr"])(x), atol=1e-5, rtol=0)


@pytest.mark.skipif(not (available("onnx") and available("onnxscript") and available("onnxruntime")),
                    reason="onnx, onnxscript and onnxruntime are optional (requirements-extra.txt)")
@pytest.mark.slow
def test_onnx_export_round_trips_through_onnxruntime(checkpoints, tmp_path):
    import onnxruntime
    out = tmp_path / "backbone.onnx"
    assert export([checkpoints["moco"], "--format", "onnx", "-o", str(out)])[0] == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, ours(checkpoints["moco"])(x), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.onnx", "backbone.onnx.json"]  # one self-contained file


@pytest.mark.slow
def test_missing_onnx_package_is_one_sentence_and_writes_nothing(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    code, err = export([checkpoints["moco"], "--format", "onnx", "-o", str(tmp_path / "b.onnx")], capsys)
    assert code == 2 and "needs the onnxscript package" in err and "pip install onnxscript" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------- detectron2, torch.export, hashes, metadata

def moco_converter(state_dict):
    """facebookresearch/moco's detection/convert-pretrain-to-detectron2.py, verbatim but for
    the file handling: the rules our detectron2 export must follow."""
    newmodel = {}
    for k, v in state_dict.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace("layer{}".format(t), "res{}".format(t + 1))
        for t in [1, 2, 3]:
            k = k.replace("bn{}".format(t), "conv{}.norm".format(t))
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = v.numpy()
    return newmodel


@pytest.fixture(scope="module")
def imagenet_stem(tmp_path_factory):
    """MoCo checkpoints with the ImageNet stem: resnet18 (basic blocks), resnet50 (bottleneck)."""
    root = tmp_path_factory.mktemp("d2")
    torch.manual_seed(2)
    out = {}
    for arch in ("resnet18", "resnet50"):
        moco = _randomise_bn(MoCo(functools.partial(build_backbone, arch), 16, 32, mlp=False))
        out[arch] = _save(root / f"{arch}.pth.tar", moco, "moco", small_images=False, arch=arch)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_export_has_the_converters_keys_shapes_and_values(imagenet_stem, arch, tmp_path):
    import pickle
    out = tmp_path / "d2.pkl"
    assert export([imagenet_stem[arch], "--format", "detectron2", "-o", str(out)])[0] == 0
    obj = pickle.load(open(out, "rb"))
    assert obj["matching_heuristics"] is True and set(obj) == {"model", "__author__", "matching_heuristics"}
    ref = moco_converter(torch.load(imagenet_stem[arch], weights_only=True)["state_dict"])
    # the converter keeps the head as stem.fc.*, which detectron2 ignores: ours leaves it out
    assert {k for k in ref if k.startswith("stem.fc.")} == {"stem.fc.weight", "stem.fc.bias"}
    ref = {k: v for k, v in ref.items() if not k.startswith("stem.fc.")}
    assert set(obj["model"]) == set(ref)
    for k, v in ref.items():
        assert obj["model"][k].shape == v.shape and np.array_equal(obj["model"][k], v), k
    block = "res2.0.conv3.norm.running_var" if arch == "resnet50" else "res2.0.conv2.norm.running_var"
    assert block in ref and "res3.0.shortcut.weight" in ref and "res5.1.conv1.norm.bias" in ref
    assert "stem.conv1.weight" in ref and "stem.conv1.norm.running_mean" in ref
    info = json.load(open(str(out) + ".json"))
    assert info["format"] == "detectron2" and info["max_abs_difference"] <= 1e-5  # read back, features compared


def test_detectron2_refuses_other_families_and_the_cifar_stem(checkpoints, tmp_path, capsys):
    code, err = export([checkpoints["moco"], "--format", "detectron2", "-o", str(tmp_path / "a.pkl")], capsys)
    assert code == 2 and "a CIFAR-stem (--small-images) ResNet" in err and "--format torchvision" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    vit = build_backbone("vit_tiny", small_images=True)
    torch.save({"state_dict": {"module." + k: v for k, v in vit.state_dict().items()}, "arch": "vit_tiny",
                "method": "lincls", "args": {"small_images": False, "crop_size": 32}}, tmp_path / "vit.pth.tar")
    code, err = export([str(tmp_path / "vit.pth.tar"), "--format", "detectron2", "-o", str(tmp_path / "b.pkl"),
                        "--no-head"], capsys)
    assert code == 2 and "not the VisionTransformer family" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.pth.tar"]


def test_a_lincls_checkpoint_exports_to_detectron2_as_its_backbone(tmp_path, capsys):
    """detectron2's layout keeps no classifier: a lincls checkpoint's head is left out, and the
    read-back compares the backbone's features (it used to fail on the missing fc.* keys)."""
    net = build_backbone("resnet18", num_classes=3, small_images=False)
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "arch": "resnet18",
                "method": "lincls", "args": {"small_images": False, "crop_size": 32}}, tmp_path / "cls.pth.tar")
    code, err = export([str(tmp_path / "cls.pth.tar"), "--format", "detectron2", "-o", str(tmp_path / "d2.pkl")],
                       capsys)
    assert code == 0, err
    info = json.load(open(tmp_path / "d2.pkl.json"))
    assert "num_classes" not in info and info["feature_dim"] == 512 and info["max_abs_difference"] <= 1e-5


@pytest.mark.slow
def test_torch_export_program_reloads_and_gives_our_features(checkpoints, tmp_path):
    out = tmp_path / "backbone.pt2"
    assert export([checkpoints["moco"], "--format", "torch-export", "-o", str(out)])[0] == 0
    net = torch.export.load(str(out)).module()
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's example
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(checkpoints["moco"])(x), atol=1e-5, rtol=0)
    assert json.load(open(str(out) + ".json"))["format"] == "torch-export"


@pytest.mark.slow
def test_default_name_carries_the_real_hash_and_the_json_torchvision_meta(checkpoints, tmp_path):
    ckpt = shutil.copy(checkpoints["moco"], tmp_path / "checkpoint_0002.pth.tar")
    lines = [{"epoch": 0, "loss": 5.0, "acc1": 10.0}, {"epoch": 1, "loss": 4.0, "acc1": 20.0},
             {"epoch": 2, "loss": 3.0, "acc1": 30.0}]  # a later epoch than the checkpoint's
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    state = torch.load(ckpt, weights_only=True)
    state.update(epoch=2, args={**state["args"], "epochs": 3, "lr": 0.03})
    torch.save(state, ckpt)
    assert export([str(ckpt)])[0] == 0
    names = sorted(p.name for p in tmp_path.iterdir() if "_backbone" in p.name)
    assert len(names) == 2 and names[1] == names[0] + ".json"
    file = tmp_path / names[0]
    sha = digest(file)
    assert names[0] == f"checkpoint_0002_backbone-{sha[:8]}.pth"
    # torch.hub's own check of the name against the file
    got = torch.hub.load_state_dict_from_url(file.as_uri(), model_dir=str(tmp_path / "hub"), check_hash=True,
                                             progress=False)
    assert set(got) == set(torch.load(file, weights_only=True))
    info = json.load(open(str(file) + ".json"))
    net = ours(checkpoints["moco"])
    assert info["sha256"] == sha and info["num_params"] == sum(p.numel() for p in net.parameters())
    assert info["min_size"] == [1, 1] and info["input_size"] == [32, 32] and info["categories"] is None
    assert info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]
    assert info["recipe"] == {"method": "moco", "arch": "resnet18", "epochs": 2, "args": state["args"]}
    assert info["metrics"] == lines[1]  # the checkpoint's epoch (epoch 2 = after epoch index 1)
    # the same weights give the same bytes: a second export lands on the same name
    assert export([str(ckpt)])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "_backbone" in p.name) == names and digest(file) == sha


def test_a_dash_in_the_checkpoint_name_does_not_hide_the_hash():
    from torch.hub import HASH_REGEX

    from export.meta import hashed_name
    sha = "0123abcd" + "e" * 56
    for name in ["run-a1.b/checkpoint_last_backbone.pth", "x/moco-ab.c_backbone.pth", "x/backbone.pth"]:
        out = hashed_name(name, sha)
        assert HASH_REGEX.search(os.path.basename(out)).group(1) == sha[:8] and out.endswith("-0123abcd.pth"), out


# a process killed (SIGKILL: no handler, no cleanup) at one point of export_backbone.py
