"""--gpu-decode: the workers read bytes and draw what the --gpu-augment worker draws; the
device decodes, crops and flips like PIL does; files nvJPEG should not get are decoded by
the worker; a bad JPEG is skipped or stops the run; main_moco.py resumes exactly."""
import os

import numpy as np
import pytest
import torch
from conftest import run_inline
from PIL import Image

from common.augment import gpu_decode as D
from common.augment import transforms as augment
from common.data.images import FileListDataset
from common.data.transformed import TransformedDataset
from common.errors import UserError
from moco.augment import moco_v2
from simclr.augment import simclr_augmentation

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour texture with an edge (compresses like a photograph)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    arr = np.asarray(small.resize((width, height), Image.BILINEAR)).copy()
    arr[:, width // 3: width // 2] = 255 - arr[:, width // 3: width // 2]
    return Image.fromarray(arr)


def write_jpeg(path, width=60, height=44, seed=0, **save) -> str:
    photo(width, height, seed).convert(save.pop("mode", "RGB")).save(path, format="JPEG", quality=95, **save)
    return str(path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", [moco_v2(32), simclr_augmentation(32, blur=True)], ids=["mocov2", "simclr"])
def test_same_seed_gives_the_gpu_augment_workers_draws_and_nearly_its_crops(tmp_path, device, recipe):
    paths = [write_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    base = FileListDataset([(p, 0) for p in paths], ["a"])
    cpu = TransformedDataset(base, augment.TwoCropsTransform(recipe.split()), decode_side=recipe.decode_side())
    dev = TransformedDataset(base, D.EncodedViews(recipe), decode_side=recipe.decode_side(), read=D.read_sample)
    keys = [(i, 1000 + 7 * i) for i in range(6)]
    packed, geometry, params = D.collate_encoded([dev[k] for k in keys])[0]
    assert packed[0].dim() == 1 and packed[3] == []  # JPEG bytes in one tensor, nothing decoded in the worker
    decoded = D._decode(D.payloads(packed), torch.device(device), strict=True)
    # libjpeg's pixels (what PIL decodes) moved to the device: the crops must match PIL's
    libjpeg = [img.to(device) for img in D._decode(D.payloads(packed), torch.device("cpu"), strict=True)]
    for v in range(2):
        ref = [cpu[k][0][v] for k in keys]  # [uint8 crop, parameters] per sample
        assert torch.equal(params[:, v], torch.stack([r[1] for r in ref]))  # the same draws, bit for bit
        pil = torch.stack([r[0] for r in ref])
        crops = D.resized_crops(libjpeg, geometry[:, v], recipe.crop_size).cpu()
        diff = (crops.float() - pil.float()).abs()
        # the antialiased bilinear resizes of PIL and torch differ by rounding (1 level here)
        assert crops.dtype == torch.uint8 and crops.shape == pil.shape
        assert float(diff.mean()) < 0.5 and float(diff.max()) <= 2, (float(diff.mean()), float(diff.max()))
        # nvJPEG upsamples the colour planes otherwise than libjpeg: a few levels on average, more
        # at sharp colour edges (the inverted stripe of these images); measured 3.1-4.2 on an H200
        crops = D.resized_crops(decoded, geometry[:, v], recipe.crop_size).cpu()
        assert float((crops.float() - pil.float()).abs().mean()) < (0.5 if device == "cpu" else 6.0)
    assert geometry[:, :, D.FLIP].sum() > 0  # flips happened, and matched above


def test_files_nvjpeg_should_not_get_are_decoded_by_the_worker(tmp_path):
    plain = write_jpeg(tmp_path / "plain.jpg")
    gray = write_jpeg(tmp_path / "gray.jpg", mode="L")
    png = tmp_path / "a.png"
    photo(40, 30).save(png)
    cmyk = write_jpeg(tmp_path / "cmyk.jpg", mode="CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer rotates it by 90 degrees
    rotated = write_jpeg(tmp_path / "rotated.jpg", width=60, height=44, exif=exif)
    assert isinstance(D.read_for_device(plain), D.EncodedImage)
    assert isinstance(D.read_for_device(gray), D.EncodedImage)  # decode_jpeg(mode=RGB) expands grayscale
    for path in (str(png), cmyk, rotated):
        assert isinstance(D.read_for_device(path), Image.Image), path
    assert D.read_for_device(rotated).size == (44, 60)  # the EXIF rotation is applied
    recipe = moco_v2(16)
    views = D.EncodedViews(recipe)
    batch, _ = D.collate_encoded([(views(D.read_for_device(p)), 0) for p in (plain, gray, str(png), cmyk, rotated)])
    assert [p.dim() for p in D.payloads(batch[0])] == [1, 1, 3, 3, 3]
    assert torch.equal(D.payloads(batch[0])[1], views(D.read_for_device(gray))[0])  # unpacked as read
    q, k = D.DecodeToDevice(recipe, torch.device("cpu"), channels_last=True)(batch)
    assert q.shape == k.shape == (5, 3, 16, 16) and q.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(q).all() and -2.2 < float(q.min()) and float(q.max()) < 2.7  # normalised


def test_a_bad_jpeg_is_replaced_with_a_warning_or_stops_a_strict_run(tmp_path, capsys):
    good = D.read_for_device(write_jpeg(tmp_path / "good.jpg"))
    data = bytearray(good.data)
    data[len(data) // 3:] = b"\x00" * (len(data) - len(data) // 3)  # a header, then garbage
    bad = D.EncodedImage(bytes(data), good.width, good.height)
    views = D.EncodedViews(moco_v2(16))
    batch, _ = D.collate_encoded([(views(good), 0), (views(bad), 0), (views(good), 0)])
    images = D._decode(D.payloads(batch[0]), torch.device("cpu"), strict=False)
    if len({id(img) for img in images}) == 3:  # libjpeg decoded the garbage without complaint
        pytest.skip("this libjpeg decodes the damaged file without an error")
    assert "skipping a JPEG" in capsys.readouterr().err
    with pytest.raises(UserError, match="drop --strict-data"):
        D._decode(D.payloads(batch[0]), torch.device("cpu"), strict=True)


@pytest.mark.long
@pytest.mark.slow
def test_main_moco_gpu_decode_resumes_exactly_on_jpeg_files(tmp_path, capsys):
    import main_moco
    for c in ("a", "b"):
        os.makedirs(tmp_path / "data" / c)
        for i in range(16):
            write_jpeg(tmp_path / "data" / c / f"{i}.jpg", width=48 + 4 * i, height=40, seed=i)
    common = [str(tmp_path / "data"), "-a", "resnet18", "--crop-size", "32", "-b", "16", "--moco-k", "32",
              "--moco-dim", "16", "--mlp", "--aug-plus", "--bn-splits", "2", "--seed", "5", "-p", "1", "-j", "2",
              "--gpu-decode", "--channels-last", "--schedule", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = run_inline(capsys, main_moco.main, common + ["--epochs", "2", "--output-dir", str(straight)])
    assert "(--gpu-decode)" in proc.stdout
    run_inline(capsys, main_moco.main, common + ["--epochs", "1", "--output-dir", str(split)])
    run_inline(capsys, main_moco.main, common + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"])
    a = torch.load(straight / "checkpoint_last.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(split / "checkpoint_last.pth.tar", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gpu_decode_without_gpu_augment_is_one_sentence(tmp_path):
    import main_moco
    args = main_moco.get_args_parser().parse_args(["--dataset", "synthetic", "--gpu-decode", "--no-gpu-augment",
                                                   "--output-dir", str(tmp_path)])
    with pytest.raises(UserError, match="drop --no-gpu-augment"):
        main_moco.finalize_args(args)


def test_the_decode_probe_speaks_in_one_sentence_when_a_device_cannot_decode(monkeypatch):
    def no_nvjpeg(*a, **k):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")
    monkeypatch.setattr(D, "decode_jpeg", no_nvjpeg)
    with pytest.raises(UserError, match="drop --gpu-decode"):
        D.check_device_decoding(torch.device("cpu"))
