"""--in-channels (issue 44): 16-bit values reach the network's input tensor bit-exactly, a
5-band .npy folder pretrains, resumes exactly and probes, the first layer of every family takes
N channels (RGB weights summed / repeated), the N-channel views run the same ops on the CPU
and --gpu-augment paths, and mixed channel counts / unreadable files are one sentence each."""
import argparse
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import run_main
from PIL import Image

import main_lincls
import main_simclr
from common.augment import gpu
from common.augment.transforms import Recipe, eval_transform
from common.ckpt.pretrained import fit_first_layer
from common.data.channels import Channels, adapt_rgb_filters, channels_of
from common.data.datasets import build_dataset, resolve_channels
from common.data.transformed import TransformedDataset
from common.errors import UserError
from common.nets.backbones import first_conv
from common.nets.models import build_backbone


def bands_folder(root, n_per_class=12, bands=5, side=16, seed=0, val=4):
    """Two classes of `bands`-band uint16 .npy images; class 1 has stripes in band 2."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("val", val)):
        for c in range(2):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 4000, (bands, side, side)).astype(np.uint16)
                if c:
                    x[2, ::4] += 3000
                np.save(os.path.join(d, f"{i}.npy"), x)
    return str(root)


def data_args(root, in_channels, **kw):
    return argparse.Namespace(**{"dataset": "imagefolder", "data": str(root), "in_channels": in_channels, "seed": 0,
                                 "channel_mean": None, "channel_std": None, "channel_norm": None, **kw})


def test_16_bit_values_reach_the_input_tensor_bit_exactly(tmp_path):
    values = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)
    values[0, 0], values[0, 1], values[0, 2] = 1, 65535, 256  # the low byte alone, the top, the 9th bit
    os.makedirs(tmp_path / "a")
    Image.fromarray(values).save(tmp_path / "a" / "x.png")
    Image.fromarray(values[::-1].copy()).save(tmp_path / "a" / "y.tif")
    args = data_args(tmp_path, "auto")
    ch = resolve_channels(args, "pretrain")
    assert args.in_channels == 1 and ch.full_depth
    ds = build_dataset(args, "pretrain")
    x = ds[0][0]
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16)
    assert torch.equal(x[0].to(torch.int64), torch.from_numpy(values.astype(np.int64)))
    # the statistics are of the stored values (no 8-bit rescale): the mean of both images
    assert args.channel_mean[0] == pytest.approx(float(values.astype(np.float64).mean()), rel=1e-6)
    # and 8-bit RGB still reads as before with the default
    rgb = build_dataset(data_args(tmp_path, None), "pretrain")
    assert rgb[0][0].mode == "RGB"


def test_auto_finds_bands_and_a_mix_is_one_sentence(tmp_path):
    root = bands_folder(tmp_path / "d", n_per_class=3, val=1)
    args = data_args(root, "auto")
    resolve_channels(args, "pretrain")
    assert args.in_channels == 5 and len(args.channel_mean) == 5 and min(args.channel_std) > 0
    np.save(os.path.join(root, "train", "c0", "odd.npy"), np.zeros((3, 16, 16), np.uint16))
    with pytest.raises(UserError, match="mix channel counts") as e:
        resolve_channels(data_args(root, "auto"), "pretrain")
    assert "odd.npy" in str(e.value)
    # a file of another count met during a run: one sentence naming it and the fix
    ds = build_dataset(data_args(root, "5"), "pretrain")
    odd = [i for i in range(len(ds)) if ds.path(i).endswith("odd.npy")][0]
    with pytest.raises(UserError, match=r"has 3 channel\(s\), not the 5 of --in-channels 5"):
        ds[odd]
    # an array through the 8-bit RGB path: one sentence, not PIL's "cannot identify"
    with pytest.raises(UserError, match="pass --in-channels"):
        build_dataset(data_args(root, None), "pretrain")[0]


def test_an_unreadable_band_file_is_skipped_or_one_sentence(tmp_path):
    root = bands_folder(tmp_path / "d", n_per_class=2, val=1)
    bad = os.path.join(root, "train", "c0", "0.npy")
    with open(bad, "wb") as f:
        f.write(b"\x93NUMPY broken")
    ds = build_dataset(data_args(root, "5"), "pretrain")
    i = [k for k in range(len(ds)) if ds.path(k) == bad][0]
    with pytest.raises(UserError, match="cannot read image .*0.npy.*fix or remove the file"):
        TransformedDataset(ds, None, strict=True)[i]
    img, _ = TransformedDataset(ds, None)[i]  # training: the next readable image stands in
    assert img.shape == (5, 16, 16)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_micro", "vit_tiny", "efficientnet_b0", "densenet121"])
def test_every_family_reads_n_channels_and_rgb_weights_are_fitted(arch):
    for n in (1, 5):
        net = build_backbone(arch, small_images=True, in_channels=n).eval()
        assert first_conv(net)[1].in_channels == n
        with torch.no_grad():
            assert net(torch.randn(2, n, 32, 32)).shape == (2, 1000)
    rgb = build_backbone(arch, small_images=True)
    name = first_conv(rgb)[0] + ".weight"
    w = rgb.state_dict()[name]
    one = build_backbone(arch, small_images=True, in_channels=1)
    fitted = fit_first_layer(one, dict(rgb.state_dict()), "rgb")
    assert torch.allclose(fitted[name], w.sum(dim=1, keepdim=True))
    # a gray image through the summed filters gives the RGB network's response to it
    x = torch.rand(1, 1, 32, 32)
    one.load_state_dict(fitted)
    with torch.no_grad():
        assert torch.allclose(one.eval()(x), rgb.eval()(x.expand(1, 3, 32, 32)), atol=1e-4)
    five = adapt_rgb_filters(w, 5)
    assert five.shape[1] == 5 and torch.allclose(five[:, 3], w[:, 0] * 0.6)


# ---------------------------------------------------------------- the views: CPU path == --gpu-augment path

def full_depth_recipe(n, ops, per_image=False, **kw):
    ch = Channels(n, tuple(100.0 + 10 * i for i in range(n)), tuple(20.0 + i for i in range(n)), per_image=per_image)
    return Recipe(12, 0.5, ops, jitter=(0.6, 0.6, 0.0, 0.0), **kw).for_channels(ch)[0]


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("ops, kw", [
    (("crop", "flip", "jitter"), dict(jitter_p=1.0)),
    (("crop", "blur"), dict(blur_p=1.0)),
    (("crop", "noise"), dict(noise_p=1.0, noise_sigma=(0.1, 0.3))),
    (("crop", "jitter"), dict(jitter_p=1.0, per_image=True)),  # --channel-norm image
])
def test_gpu_augment_path_equals_the_cpu_path_per_op(n, ops, kw):
    recipe = full_depth_recipe(n, ops, **kw)
    images = [torch.rand(n, 20, 18) * 4000 for _ in range(6)]
    cpu = []
    for i, img in enumerate(images):  # the loader worker, per-sample seed
        torch.manual_seed(100 + i)
        cpu.append(recipe(img))
    parts = []
    for i, img in enumerate(images):
        torch.manual_seed(100 + i)
        parts.append(recipe.split()(img))
    crops = torch.stack([p[0] for p in parts])
    params = torch.stack([p[1] for p in parts])
    assert crops.dtype == torch.float32  # stored values, not uint8
    batched = gpu.photometric(crops, params, recipe.spec())
    assert torch.allclose(batched, torch.stack(cpu), atol=1e-5)
    if recipe.channels.per_image:  # each view's channels at zero mean, unit std
        assert torch.allclose(batched.mean(dim=(2, 3)), torch.zeros(6, n), atol=1e-4)
        assert torch.allclose(batched.std(dim=(2, 3), unbiased=False), torch.ones(6, n), atol=1e-3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # bench/gpu_check.sh's ops part runs both


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 5])
def test_the_batched_full_depth_ops_on_the_device_equal_the_loader_path(device, n):
    """--gpu-augment on `device` against the loader worker's photometric_one, every op on, 16-bit
    values (noise left out: each device type draws its own field from a sample's seed)."""
    recipe = full_depth_recipe(n, ("crop", "jitter", "blur", "flip"), jitter_p=1.0, blur_p=0.5)
    parts = []
    for i in range(8):
        torch.manual_seed(i)
        parts.append(recipe.split()(torch.rand(n, 20, 18) * 60000))
    crops, params = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    one = torch.stack([gpu.photometric_one(c, p, recipe.spec()) for c, p in parts])
    batched = gpu.photometric(crops.to(device), params, recipe.spec()).cpu()
    assert torch.allclose(batched, one, atol=1e-3)  # normalised units; TF32/fused kernels on a GPU


@pytest.mark.parametrize("n", [1, 5])
def test_each_full_depth_op_is_what_it_says(n):
    x = torch.rand(3, n, 10, 10) * 60000  # 16-bit range: nothing is clipped
    f = torch.tensor([0.5, 1.0, 1.7])
    assert torch.allclose(gpu.scale_brightness(x, f), x * f.view(-1, 1, 1, 1))
    c = gpu.band_contrast(x, f)
    for s in range(3):
        for b in range(n):
            m = x[s, b].mean()
            assert torch.allclose(c[s, b], f[s] * x[s, b] + (1 - f[s]) * m, rtol=1e-5)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    blurred = gpu.gaussian_blur(x, sigma, 5)
    for s in range(3):
        ref = TF.gaussian_blur(x[s], [5, 5], [float(sigma[s])] * 2)
        assert torch.allclose(blurred[s], ref, rtol=1e-4, atol=1e-2)
    z = torch.zeros(2, n, 64, 64)
    noisy = gpu.add_noise(z, torch.tensor([0.5, 0.5]), torch.tensor([7.0, 8.0]))
    assert abs(float(noisy.std()) - 0.5) < 0.02 and not torch.equal(noisy[0], noisy[1])
    assert torch.equal(noisy, gpu.add_noise(z, torch.tensor([0.5, 0.5]), torch.tensor([7.0, 8.0])))


def test_colour_ops_are_left_out_and_said():
    r = Recipe(32, 0.2, ("crop", "gray", "jitter", "blur", "solarize", "flip"), jitter=(0.4, 0.4, 0.4, 0.1),
               solarize_p=0.2)
    same, dropped = r.for_channels(Channels())
    assert same.ops == r.ops and dropped == []
    five, dropped = r.for_channels(Channels(5, (0.0,) * 5, (1.0,) * 5))
    assert five.ops == ("crop", "jitter", "blur", "flip") and five.jitter == (0.4, 0.4, 0.0, 0.0)
    assert dropped[0] == "saturation and hue jitter" and "random grayscale" in dropped
    assert any("solarization" in d for d in dropped)


# ---------------------------------------------------------------- a 5-band folder end to end

TINY = ["-a", "resnet18", "--small-images", "-j", "0", "-b", "8", "--crop-size", "16", "--seed", "3", "-p", "50",
        "--proj-dim", "16", "--proj-hidden-dim", "32", "--no-cos", "--schedule", "1", "--warmup-epochs", "0",
        "--no-payoff", "--in-channels", "auto"]


def test_a_5_band_folder_pretrains_resumes_exactly_and_probes(tmp_path, capsys):
    root = bands_folder(tmp_path / "d")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(main_simclr.main, [root] + TINY + ["--epochs", "2", "--output-dir", str(straight)]) == 0
    out = capsys.readouterr().out
    assert "--in-channels auto: 5 channel(s)" in out and "measured on 24 images" in out
    assert "leave out saturation and hue jitter" in out
    assert run_main(main_simclr.main, [root] + TINY + ["--epochs", "1", "--output-dir", str(split)]) == 0
    assert run_main(main_simclr.main, [root] + TINY + ["--epochs", "2", "--output-dir", str(split),
                                                       "--resume", "auto"]) == 0
    a = torch.load(straight / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
    b = torch.load(split / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
    assert a["args"]["in_channels"] == 5 and len(a["args"]["channel_mean"]) == 5
    assert a["args"]["channel_mean"] == b["args"]["channel_mean"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["state_dict"]["module.encoder.conv1.weight"].shape[1] == 5
    capsys.readouterr()
    # the probe follows the checkpoint: 5 channels and its statistics, nothing to pass
    probe = tmp_path / "probe"
    assert run_main(main_lincls.main, [root, "--pretrained", str(straight / "checkpoint_last.pth.tar"), "-j", "0",
                                       "--epochs", "1", "-b", "8", "--output-dir", str(probe)]) == 0
    assert (probe / "results.json").exists()
    # a probe told another count than the checkpoint's: one sentence
    assert run_main(main_lincls.main, [root, "--pretrained", str(straight / "checkpoint_last.pth.tar"), "-j", "0",
                                       "--epochs", "1", "--in-channels", "3", "--output-dir",
                                       str(tmp_path / "p3")]) == 2
    err = capsys.readouterr().err
    assert "trained on 5 channel(s), not the 3 of --in-channels" in err and "Traceback" not in err


def test_in_channels_1_on_the_synthetic_set_trains_on_gray(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--synthetic-size", "16", "--in-channels", "1", "--epochs", "1",
            "--output-dir", str(tmp_path / "r")] + TINY[:-2]
    assert run_main(main_simclr.main, argv) == 0
    ckpt = torch.load(tmp_path / "r" / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["args"]["in_channels"] == 1
    assert channels_of(argparse.Namespace(**ckpt["args"])).count == 1


def test_recipe_small_on_large_16_bit_sources_checks_the_one_channel_views(tmp_path, capsys):
    """--recipe small's choice of views on sources 3x the crop runs the view check on the
    full-depth images with the N-channel views (common/train/source_views.py)."""
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "d" / f"c{c}")
        for i in range(8):
            img = (rng.integers(0, 2000, (200, 200)) + 30000 + 5000 * c).astype(np.uint16)
            Image.fromarray(img).save(tmp_path / "d" / f"c{c}" / f"{i}.png")
    argv = [str(tmp_path / "d"), "-a", "resnet18", "--no-small-images", "-j", "0", "--recipe", "small",
            "--in-channels", "1", "--view-check-only", "--no-payoff", "--no-trial"]
    assert run_main(main_simclr.main, argv) == 0
    out = capsys.readouterr().out
    assert "1 input channel(s) at full depth" in out and "source-scale views (--crop-min" in out
    assert "view check on 16 images" in out


def test_channel_norm_image_removes_a_per_image_offset_and_follows_the_checkpoint(tmp_path, capsys):
    """--channel-norm image: a 16-bit texture under an offset that differs per image reaches the
    network at unit scale (the set's statistics would leave it at a thousandth of a std); the
    probe follows the checkpoint's choice, and another one is one sentence."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in range(2):
            os.makedirs(tmp_path / "d" / split / f"c{c}")
            for i in range(n):
                y, x = np.mgrid[0:16, 0:16]
                img = 257 * rng.integers(20, 235) + 30 * (1 + np.sin((y if c else x) * 1.5))
                Image.fromarray(img.astype(np.uint16)).save(tmp_path / "d" / split / f"c{c}" / f"{i}.png")
    root = str(tmp_path / "d")
    args = data_args(root, "1", channel_norm="image")
    ch = resolve_channels(args, "train")
    assert ch.per_image and args.channel_norm == "image"
    view = eval_transform(16, ch)(build_dataset(args, "train")[0][0])
    assert abs(float(view.mean())) < 1e-4 and abs(float(view.std(unbiased=False)) - 1) < 1e-3
    run = tmp_path / "run"
    assert run_main(main_simclr.main, [root] + TINY[:-2] + ["--in-channels", "1", "--channel-norm", "image",
                                                            "--epochs", "1", "--output-dir", str(run)]) == 0
    assert "each image standardised per channel by its own mean and std" in capsys.readouterr().out
    ckpt = str(run / "checkpoint_last.pth.tar")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["args"]["channel_norm"] == "image"
    assert run_main(main_lincls.main, [root, "--pretrained", ckpt, "-j", "0", "--probe", "logreg",
                                       "--output-dir", str(tmp_path / "p")]) == 0
    assert run_main(main_lincls.main, [root, "--pretrained", ckpt, "-j", "0", "--probe", "logreg", "--channel-norm",
                                       "set", "--output-dir", str(tmp_path / "p2")]) == 2
    assert "normalised per image, not per set" in capsys.readouterr().err
    with pytest.raises(UserError, match="--channel-norm image is for images read at full depth"):
        resolve_channels(data_args(root, "3", channel_norm="image"), "train")


def test_the_multi_crop_and_momentum_methods_train_on_5_bands(tmp_path):
    """DINO's multi-crop views and MoCo's key encoder go through the same N-channel views and
    first layer (one step each: the wiring, not the learning)."""
    import main_dino
    import main_moco
    root = bands_folder(tmp_path / "d", n_per_class=8, val=1)
    common = [root, "-a", "resnet18", "--small-images", "-j", "0", "-b", "16", "--crop-size", "16", "--epochs", "1",
              "--no-payoff", "--in-channels", "5", "-p", "50"]
    assert run_main(main_dino.main, common + ["--out-dim", "32", "--local-crops-number", "2", "--local-crop-size", "8",
                                              "--output-dir", str(tmp_path / "dino")]) == 0
    assert run_main(main_moco.main, common + ["--moco-k", "32", "--moco-dim", "16", "--mlp", "--aug-plus",
                                              "--bn-splits", "2", "--output-dir", str(tmp_path / "moco")]) == 0
    for name, key in (("dino", "student"), ("moco", "state_dict")):
        ckpt = torch.load(tmp_path / name / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
        assert ckpt["args"]["in_channels"] == 5
        assert any(v.ndim == 4 and v.shape[1] == 5 for v in ckpt[key].values())
