"""hubconf.py and --export-at-end: the backbone a pretraining run exported at its end loads
through torch.hub (source="local") and gives our features; the file name carries its hash."""
import hashlib
import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import ROOT

import export_backbone
from common.ckpt.pretrained import load_backbone
from common.errors import UserError
from common.nets.models import build_backbone


def ours(checkpoint: str, arch: str, small: bool) -> nn.Module:
    net = build_backbone(arch, small_images=small)
    load_backbone(net, torch.load(checkpoint, map_location="cpu", weights_only=True))
    net.fc = nn.Identity()
    return net.eval()


def hub(path: str) -> nn.Module:
    return torch.hub.load(ROOT, "backbone", path=path, source="local")


@pytest.mark.slow
def test_export_at_end_writes_a_hashed_backbone_that_torch_hub_loads(moco_pretrained, tmp_path):
    run = os.path.dirname(moco_pretrained)  # conftest's MoCo run, with --export-at-end
    names = sorted(os.listdir(os.path.join(run, "exported")))
    assert len(names) == 2 and names[1] == names[0] + ".json", names
    file = os.path.join(run, "exported", names[0])
    sha = hashlib.sha256(open(file, "rb").read()).hexdigest()
    assert names[0] == f"backbone-{sha[:8]}.pth"
    info = json.load(open(file + ".json"))
    last = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][-1]
    assert info["sha256"] == sha and info["metrics"] == last and info["recipe"]["epochs"] == 2
    assert (info["arch"], info["small_images"], info["format"]) == ("resnet18", False, "torchvision")
    assert info["recipe"]["args"]["epochs"] == 2 and info["recipe"]["method"] == "moco"
    torch.hub.load_state_dict_from_url("file://" + file, model_dir=str(tmp_path), check_hash=True, progress=False)

    reference = ours(moco_pretrained, "resnet18", small=False)
    x = torch.randn(3, 3, 32, 32)
    for path in (run, os.path.join(run, "exported"), file):  # the run, its exported/ folder, the file
        net = hub(path)
        assert type(net).__name__ == "ResNet" and isinstance(net.fc, nn.Identity) and not net.training
        with torch.no_grad():
            torch.testing.assert_close(net(x), reference(x), atol=1e-6, rtol=0)
        assert net.meta["sha256"] == sha


@pytest.mark.slow
def test_hub_builds_the_cifar_stem_and_a_wrapped_family(tmp_path):
    torch.manual_seed(0)
    for arch in ("resnet18", "vit_tiny"):
        net = build_backbone(arch, small_images=True)
        ckpt = tmp_path / f"{arch}.pth.tar"
        torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in net.state_dict().items()}, "arch": arch,
                    "method": "moco", "args": {"small_images": True, "crop_size": 32}}, ckpt)
        out = tmp_path / arch / "backbone.pth"
        export_backbone.main([str(ckpt), "-o", str(out)])
        loaded = hub(str(tmp_path / arch))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ours(str(ckpt), arch, small=True)(x), atol=1e-6, rtol=0)
        if arch == "resnet18":  # the CIFAR stem: 3x3 conv1, no max-pool
            assert loaded.conv1.kernel_size == (3, 3) and isinstance(loaded.maxpool, nn.Identity)


def test_hub_without_an_export_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="holds no exported backbone") as e:
        hub(str(tmp_path))
    assert len(str(e.value).splitlines()) == 1
    torch.save({}, tmp_path / "lonely.pth")
    with pytest.raises(UserError, match="has no lonely.pth.json beside it"):
        hub(str(tmp_path / "lonely.pth"))
