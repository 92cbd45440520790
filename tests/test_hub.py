"""hubconf.py and --export-at-end: the backbone a pretraining run exported at its end loads
through torch.hub (source="local") and gives our features; the file name carries its hash."""
import hashlib
import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, run_inline

import export_backbone
import hubconf
import main_lincls
import main_simclr
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


def small_export(folder, name="b.pth"):
    """A torchvision-format export as export_backbone.py writes it (weights, JSON beside),
    without a checkpoint to export from; its path."""
    net = build_backbone("resnet18", small_images=True)
    net.fc = nn.Identity()
    torch.save(net.state_dict(), folder / name)
    with open(folder / (name + ".json"), "w") as f:
        json.dump({"arch": "resnet18", "small_images": True, "format": "torchvision",
                   "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}, f)
    return folder / name


def one_sentence(path, *fragments):
    """hubconf.backbone(path) raises a one-line UserError naming the file and each fragment."""
    with pytest.raises(UserError) as e:
        hubconf.backbone(str(path))
    message = str(e.value)
    assert "\n" not in message and os.path.basename(str(path)) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_hub_refuses_a_missing_path_a_damaged_export_and_an_unreadable_json(tmp_path):
    good = small_export(tmp_path)
    assert isinstance(hubconf.backbone(str(good)).fc, nn.Identity)  # the fixture is a real export

    one_sentence(tmp_path / "b.ptth", "does not exist", "a folder of such exports")  # a typo, not a lost JSON

    (tmp_path / "noise.pth").write_bytes(os.urandom(4096))  # random bytes
    (tmp_path / "noise.pth.json").write_bytes((tmp_path / "b.pth.json").read_bytes())
    one_sentence(tmp_path / "noise.pth", "cannot read", "damaged or not a backbone export", "export_backbone.py")

    data = good.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 1):  # zip header only, half the tensors, the last byte lost
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        (tmp_path / "cut.pth.json").write_bytes((tmp_path / "b.pth.json").read_bytes())
        one_sentence(tmp_path / "cut.pth", "cannot read", "damaged or not a backbone export (truncated?")

    torch.save({k: v + 1 for k, v in torch.load(good, weights_only=True).items()}, tmp_path / "other.pth")
    (tmp_path / "other.pth.json").write_bytes((tmp_path / "b.pth.json").read_bytes())  # another export's JSON
    one_sentence(tmp_path / "other.pth", "is not the file its JSON other.pth.json describes", "another sha256")

    (tmp_path / "b.pth.json").write_text('{"arch": "resnet18", ')  # the JSON cut off
    one_sentence(good, "cannot read", "b.pth.json", "export it again")
    (tmp_path / "b.pth.json").write_text('["resnet18"]')  # JSON, not ours
    one_sentence(good, "b.pth.json", "is not the JSON export_backbone.py writes")

    (tmp_path / "b.pth.json").write_text('{"arch": "resnet34", "small_images": true}')  # another network's JSON
    one_sentence(good, "does not hold the resnet34 its JSON describes")


@pytest.mark.slow
def test_a_simclr_mobilenet_probes_exports_and_loads_through_torch_hub(tmp_path, capsys):
    """A wrapped family (`body.*`) pretrained by another method than the run conftest shares:
    SimCLR -> logreg probe -> export_backbone.py -> torch.hub, the same features throughout."""
    flags = ["--dataset", "synthetic", "--synthetic-size", "16", "-j", "0", "--seed", "3", "-a", "mobilenet_v3_small",
             "--small-images", "--crop-size", "32", "-b", "8"]
    run_inline(capsys, main_simclr.main, flags + ["--epochs", "1", "--proj-dim", "16", "--output-dir",
                                                  str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoint_last.pth.tar")
    assert "logistic-regression probe" in run_inline(capsys, main_lincls.main, flags + [
        "--probe", "logreg", "--pretrained", ckpt, "--output-dir", str(tmp_path / "probe")]).stdout
    run_inline(capsys, export_backbone.main, [ckpt, "-o", str(tmp_path / "exported" / "backbone.pth")])
    net = hub(str(tmp_path))  # a folder holding exported/, as --export-at-end's run folder does
    assert net.meta["arch"] == "mobilenet_v3_small" and not net.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(ckpt, "mobilenet_v3_small", small=True)(x), atol=1e-6, rtol=0)
