"""--in-channels N (issue 44) in export, distillation and inpainting: a 5-band .npy run
exports with its channel count and measured statistics (sidecar, meta, TorchScript and hub
reload, --init from the export), an ImageNet-stem 1-channel checkpoint through detectron2's
layout, an RGB teacher fed the gray channel of a 16-bit PNG student or a band triple of a
5-band one (a 5-band teacher: all of them), and a 5-band context encoder painting back
normalised channels (--loss bce refused in one sentence). Tiny images, resnet18 at 16 px."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import _randomise_bn, _save, run_inline, run_main
from PIL import Image

import export_backbone
import hubconf
import main_distill
import main_inpaint
import main_simclr
from common.ckpt.init_weights import read_init
from common.ckpt.io import load_checkpoint
from common.ckpt.pretrained import load_backbone
from common.errors import UserError
from common.nets.models import build_backbone
from common.train.run import PretrainRun
from distill.teacher import teacher_bands
from export.formats import in_channels
from inpaint.masking import InpaintingPair
from simclr.builder import SimCLR

SMALL = ["-a", "resnet18", "-j", "0", "--crop-size", "16", "--epochs", "1", "--no-payoff", "--seed", "2", "-p", "100"]


@pytest.fixture(autouse=True)
def no_view_check(monkeypatch):
    monkeypatch.setattr(PretrainRun, "check_views", lambda self, recipe: None)  # seconds, unrelated


def band_folder(root) -> str:
    """2 classes x 12 .npy images of 5 x 20 x 20 16-bit values; class 1 has stripes in band 2."""
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(os.path.join(root, f"c{c}"))
        for i in range(12):
            x = rng.integers(0, 4000, (5, 20, 20)).astype(np.uint16)
            if c:
                x[2, ::4] += 3000
            np.save(os.path.join(root, f"c{c}", f"{i}.npy"), x)
    return str(root)


@pytest.fixture(scope="module")
def bands(tmp_path_factory) -> str:
    return band_folder(tmp_path_factory.mktemp("bands") / "data")


@pytest.fixture(scope="module")
def band_run(bands, tmp_path_factory) -> str:
    """A 1-epoch SimCLR resnet18 on the 5 bands (CIFAR stem at 16 px): its last checkpoint."""
    out = tmp_path_factory.mktemp("band_run")
    argv = [bands, "--in-channels", "auto", "-b", "8", "--proj-dim", "16", "--proj-hidden-dim", "32",
            "--output-dir", str(out)] + SMALL
    assert run_main(main_simclr.main, argv) == 0
    return str(out / "checkpoint_last.pth.tar")


def gray16_folder(root) -> str:
    """2 classes x 8 16-bit grayscale PNGs of 20 x 20 (values up to 50,000: not 8-bit)."""
    rng = np.random.default_rng(1)
    for c in range(2):
        os.makedirs(os.path.join(root, f"c{c}"))
        for i in range(8):
            x = rng.integers(0, 30000, (20, 20)).astype(np.uint16)
            if c:
                x[::4] += 20000
            Image.fromarray(x).save(os.path.join(root, f"c{c}", f"{i}.png"))
    return str(root)


def rgb_teacher(path) -> str:
    """A random-init RGB SimCLR resnet18 checkpoint (CIFAR stem, 32 px): nothing downloaded."""
    torch.manual_seed(0)
    return _save(path, _randomise_bn(SimCLR(lambda: build_backbone("resnet18", small_images=True), proj_dim=16)),
                 "simclr")


# ---------------------------------------------------------------- export

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_a_5_band_run_exports_its_channels_and_statistics_and_reloads(band_run, tmp_path):
    ckpt = load_checkpoint(band_run)
    saved = ckpt["args"]
    assert saved["in_channels"] == 5 and len(saved["channel_mean"]) == 5 and saved["channel_mean"][2] > 2000
    ours = build_backbone("resnet18", small_images=True, in_channels=5)
    load_backbone(ours, ckpt, band_run)
    ours.fc = nn.Identity()
    ours.eval()
    x = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        expected = ours(x)

    out = tmp_path / "b.pth"
    export_backbone.main([band_run, "-o", str(out)])
    info = json.load(open(str(out) + ".json"))
    assert info["in_channels"] == 5 and info["mean"] == saved["channel_mean"] and info["std"] == saved["channel_std"]
    assert info["min_size"] == [1, 1] and info["input_size"] == [16, 16] and "stored values" in info["input_values"]
    net = hubconf.backbone(str(out))  # torch.hub's entry point: built for 5 channels from the JSON
    assert net.meta["in_channels"] == 5
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(net(x[:1]), expected[:1], atol=1e-5, rtol=0)  # a (1, 5, H, W) input
    # --init from the export: the 5-channel weights into a 5-channel network, as they are
    fresh = build_backbone("resnet18", small_images=True, in_channels=5)
    load_backbone(fresh, read_init(str(out), "resnet18"), str(out))
    fresh.fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, atol=1e-5, rtol=0)

    script = tmp_path / "b.pt"  # traced on a 5-channel example
    export_backbone.main([band_run, "--format", "torchscript", "-o", str(script)])
    assert json.load(open(str(script) + ".json"))["in_channels"] == 5
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(script))(x), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_an_imagenet_stem_gray_checkpoint_exports_to_detectron2_and_old_jsons_are_rgb(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "gray.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in _randomise_bn(
                    build_backbone("resnet18", in_channels=1)).state_dict().items()},
                "arch": "resnet18", "method": "lincls",
                "args": {"small_images": False, "crop_size": 32, "in_channels": 1, "channel_mean": [1234.5],
                         "channel_std": [321.0]}}, path)
    out = tmp_path / "gray.pkl"  # read back into torchvision's resnet18 with a 1-channel conv1 and checked
    export_backbone.main([str(path), "--format", "detectron2", "-o", str(out), "--no-lincls-head"])
    info = json.load(open(str(out) + ".json"))
    assert (info["in_channels"], info["mean"], info["std"]) == (1, [1234.5], [321.0])
    assert info["max_abs_difference"] <= 1e-4
    # a checkpoint of N channels without their statistics is refused in one sentence
    torch.save({**torch.load(path, weights_only=False), "args": {"in_channels": 1, "crop_size": 32}}, path)
    with pytest.raises(SystemExit):
        export_backbone.main([str(path), "-o", str(tmp_path / "x.pth")])
    err = capsys.readouterr().err
    assert "was trained on 1 channel(s) but does not hold their mean and std" in err and err.count("\n") == 1
    assert in_channels({"arch": "resnet18", "small_images": True}) == 3  # a JSON from before --in-channels


# ---------------------------------------------------------------- distillation

def test_teacher_bands():
    assert teacher_bands(3, 3, None, "t") == (None, None)
    assert teacher_bands(3, 1, None, "t")[0] == [0, 0, 0]
    assert teacher_bands(3, 5, None, "t")[0] == [0, 1, 2] and teacher_bands(3, 5, (4, 2, 0), "t")[0] == [4, 2, 0]
    assert teacher_bands(3, 2, None, "t")[0] == [0, 1, 1]
    assert teacher_bands(5, 5, None, "t")[0] is None
    with pytest.raises(UserError, match="reads 5 channel"):
        teacher_bands(5, 1, None, "t")
    with pytest.raises(UserError, match="names channel 7"):
        teacher_bands(3, 5, (7, 1, 0), "t")


@pytest.mark.slow
def test_a_gray_16_bit_student_learns_from_an_rgb_teacher(tmp_path, capsys):
    data = gray16_folder(tmp_path / "gray")
    teacher = rgb_teacher(tmp_path / "teacher.pth.tar")
    out = tmp_path / "run"
    argv = [data, "--in-channels", "1", "--teacher", teacher, "-b", "8", "--queue-size", "16", "--proj-hidden-dim",
            "32", "--output-dir", str(out)] + SMALL
    proc = run_inline(capsys, main_distill.main, argv)
    assert "teacher sees the gray channel repeated 3 times" in proc.stdout
    saved = load_checkpoint(str(out / "checkpoint_last.pth.tar"))["args"]
    assert saved["in_channels"] == 1 and saved["teacher_dim"] == 512 and saved["channel_mean"][0] > 10000


@pytest.mark.slow
def test_a_5_band_student_with_cached_rgb_and_5_band_teachers(bands, band_run, tmp_path, capsys):
    teacher = rgb_teacher(tmp_path / "teacher.pth.tar")
    base = [bands, "--in-channels", "5", "-b", "8", "--queue-size", "16", "--proj-hidden-dim", "32",
            "--cache-teacher"] + SMALL
    proc = run_inline(capsys, main_distill.main, base + ["--teacher", teacher, "--show-bands", "4,2,0",
                                                         "--output-dir", str(tmp_path / "rgb")])
    assert "teacher sees bands 4,2,0 of 5 as R, G, B" in proc.stdout and "--cache-teacher: the teacher's" in proc.stdout
    proc = run_inline(capsys, main_distill.main, base + ["--teacher", band_run, "--output-dir", str(tmp_path / "five")])
    assert "the teacher reads the student's 5 channel(s) as they are" in proc.stdout
    proc = run_inline(capsys, main_distill.main, base + ["--teacher", teacher, "--show-bands", "4,2,7",
                                                         "--output-dir", str(tmp_path / "bad")], check=False)
    assert proc.returncode == 2 and "--show-bands 4,2,7 names channel 7" in proc.stderr


# ---------------------------------------------------------------- inpainting

def test_full_depth_patches_hold_each_channels_mean():
    from common.data.channels import Channels
    ch = Channels(2, (100.0, 2000.0), (10.0, 50.0))
    torch.manual_seed(0)
    masked, image, mask = InpaintingPair(8, 2, 3, flip=False, channels=ch)(torch.full((2, 12, 12), 7.0))
    assert masked.shape == image.shape == (2, 8, 8) and torch.allclose(image, torch.full_like(image, 7.0))
    assert (masked[0][mask[0]] == 100.0).all() and (masked[1][mask[0]] == 2000.0).all()  # 0 once normalised
    assert torch.equal(masked[:, ~mask[0]], image[:, ~mask[0]])


@pytest.mark.slow
def test_a_5_band_context_encoder_paints_back_normalised_channels(bands, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [bands, "--in-channels", "5", "-b", "8", "--patches", "2", "--patch-size", "4",
            "--show-bands", "2,1,0"] + SMALL
    proc = run_inline(capsys, main_inpaint.main, argv + ["--output-dir", str(out), "--export-at-end"])
    assert "--loss mse on the normalised channels" in proc.stdout
    exported = [f for f in os.listdir(out / "exported") if f.endswith(".pth")]
    assert json.load(open(out / "exported" / (exported[0] + ".json")))["in_channels"] == 5
    ckpt = load_checkpoint(str(out / "checkpoint_last.pth.tar"))
    assert ckpt["args"]["loss"] == "mse" and ckpt["state_dict"]["module.decoder.6.weight"].shape[1] == 5
    grid = Image.open(out / "reconstructions" / "epoch_0000.png")
    assert grid.mode == "RGB" and grid.size[1] == 3 * (16 + 2) + 2  # originals, masked, reconstructions
    proc = run_inline(capsys, main_inpaint.main, argv + ["--output-dir", str(tmp_path / "bce"), "--loss", "bce"],
                      check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--loss bce compares pixels in [0, 1]" in proc.stderr and "pass --loss mse" in proc.stderr
