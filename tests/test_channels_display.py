"""Images that are not 8-bit RGB (--in-channels other than 3, issue 44) where they are shown or
their pixels read: to_display's gray and --show-bands pictures, main_knn.py's retrieval grids
and --query, main_curate.py's thumbnails, statistics and report on a 16-bit gray PNG folder and
a 5-band .npy folder, and a --show-bands past the channel count as one sentence."""
import argparse
import os

import numpy as np
import pytest
import torch
from conftest import run_inline
from PIL import Image

import main_curate
import main_knn
from common.data.channels import Channels
from common.data.display import stretch, to_display
from common.data.images import FileListDataset
from curate.embed import fingerprint
from curate.pixels import image_stats
from knn.retrieval import display_transform

# random init, tiny crops: the tests check the pictures and the plumbing, not what is learned
NET = ["--pretrained", "none", "-a", "resnet18", "--crop-size", "16", "-j", "0", "-b", "16", "-p", "1000"]
CURATE = NET + ["--dup-k", "3", "--outlier-k", "3", "--label-k", "3", "--probe-iters", "10", "--probe-folds", "2"]


def band_folder(root, bands: int = 5, per_class: int = 6) -> str:
    """DATA/train and DATA/val of two classes of 24 px (bands, H, W) uint16 .npy arrays;
    class c1 has stripes in band 2."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = os.path.join(root, split, f"c{c}")
            os.makedirs(folder)
            for i in range(per_class):
                x = rng.integers(0, 4000, (bands, 24, 24)).astype(np.uint16)
                if c:
                    x[2, ::4] += 3000
                np.save(os.path.join(folder, f"{i}.npy"), x)
    return str(root)


def gray16_folder(root, per_class: int = 6) -> str:
    """DATA/train of two classes of 24 px 16-bit gray PNGs: a faint texture (a few levels) on
    a bright offset that 8 bits would round away."""
    rng = np.random.default_rng(1)
    for c in range(2):
        folder = os.path.join(root, "train", f"c{c}")
        os.makedirs(folder)
        for i in range(per_class):
            x = 60000 + rng.integers(0, 8, (24, 24)) + (np.arange(24)[None, :] % (3 + c) == 0) * 6
            Image.fromarray(x.astype(np.uint16)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def test_to_display_gray_bands_and_faint_texture():
    rng = np.random.default_rng(0)
    gray = torch.from_numpy((60000 + rng.integers(0, 4, (1, 20, 20))).astype(np.float32))
    shown = np.asarray(to_display(gray))
    assert shown.shape == (20, 20, 3)
    assert (shown[..., 0] == shown[..., 1]).all() and (shown[..., 1] == shown[..., 2]).all()
    assert len(np.unique(shown[..., 0])) > 1  # the texture under the offset survives the stretch

    bands = torch.from_numpy(rng.uniform(0, 65535, (5, 12, 12)).astype(np.float32))
    shown = np.asarray(to_display(bands, (4, 0, 2)))
    for colour, band in enumerate((4, 0, 2)):
        assert np.array_equal(shown[..., colour], stretch(bands[band].numpy()))
    assert np.array_equal(np.asarray(to_display(bands))[..., 1], stretch(bands[1].numpy()))  # default 0,1,2


def test_full_depth_thumbnail_keeps_16_bit_detail():
    """The copy search's thumbnail of a texture 3 levels deep on 60000 is not one flat gray,
    and a brighter image measures brighter (one mapping for every image, not a stretch each)."""
    rng = np.random.default_rng(0)
    ch = Channels(1, (30000.0,), (20000.0,))
    faint = torch.from_numpy((60000 + rng.integers(0, 4, (1, 40, 40))).astype(np.float32))
    thumb, stats = image_stats(faint, 16, ch)
    assert thumb.shape == (16, 16) and thumb.dtype == np.uint8 and len(np.unique(thumb)) > 1
    _, darker = image_stats(faint - 20000, 16, ch)
    assert stats[0] > darker[0] + 10  # brightness, in gray levels
    assert stats[4] == 0.0  # one channel: no saturation
    _, multi = image_stats(torch.from_numpy(rng.uniform(0, 4000, (5, 24, 24)).astype(np.float32)), 16,
                           Channels(5, (2000.0,) * 5, (1150.0,) * 5))
    assert multi[4] > 0 and np.isfinite(multi).all()


def test_display_transform_full_depth():
    ch = Channels(5, (2000.0,) * 5, (1150.0,) * 5)
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 4000, (5, 24, 24)).astype(np.float32))
    shown = display_transform(16, ch, (2, 1, 0))(x)
    assert shown.shape == (3, 16, 16) and 0.0 <= float(shown.min()) and float(shown.max()) <= 1.0


def test_retrieval_grids_of_5_bands(tmp_path, capsys):
    data = band_folder(tmp_path / "data")
    out = tmp_path / "knn"
    run_inline(capsys, main_knn.main, [data, *NET, "--in-channels", "auto", "--skip-knn", "--retrieval", "3",
                                       "--retrieval-k", "2", "--query", os.path.join(data, "val", "c1", "0.npy"),
                                       "--show-bands", "2,1,0", "--output-dir", str(out)])
    grid = Image.open(out / "retrieval" / "grid_000.png")
    assert grid.mode == "RGB" and len(np.unique(np.asarray(grid))) > 2
    rows = (out / "retrieval" / "captions.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 3 and any(",query," in r for r in rows)  # 3 drawn + the --query, 2 neighbours


@pytest.mark.parametrize("kind", ["gray16", "bands"])
def test_curate_full_depth(tmp_path, capsys, kind):
    data = gray16_folder(tmp_path / "data") if kind == "gray16" else band_folder(tmp_path / "data")
    pool = band_folder(tmp_path / "pool") if kind == "bands" else gray16_folder(tmp_path / "pool")
    out = tmp_path / "curate"
    run_inline(capsys, main_curate.main, [data, *CURATE, "--in-channels", "auto", "--output-dir", str(out),
                                          "--unlabelled", pool, "--select", "2"])
    assert (out / "report.html").is_file() and (out / "grids" / "outliers.png").is_file()
    thumbs = os.listdir(out / "thumbnails")  # the selection's table: the pool read at full depth
    assert thumbs and Image.open(out / "thumbnails" / thumbs[0]).mode == "RGB"
    if kind == "gray16":  # shown as gray, the faint texture visible
        cell = np.asarray(Image.open(out / "thumbnails" / thumbs[0]))
        assert (cell[..., 0] == cell[..., 2]).all() and len(np.unique(cell)) > 2


@pytest.mark.parametrize("script", [main_knn, main_curate])
def test_show_bands_past_the_count_is_one_sentence(tmp_path, capsys, script):
    data = band_folder(tmp_path / "data", bands=4, per_class=2)
    extra = ["--retrieval", "1", "--skip-knn"] if script is main_knn else []
    ran = run_inline(capsys, script.main, [data, *NET, "--in-channels", "auto", "--show-bands", "1,2,4",
                                           "--output-dir", str(tmp_path / "out"), *extra], check=False)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "--show-bands 1,2,4 names channel 4, but the images have 4 (0 to 3)" in ran.stderr


def test_embedding_fingerprint_follows_the_channels():
    """--resume reuses embedding shards only for the same eval view: a full-depth run's
    channels and statistics are in the fingerprint; an RGB run's is as it was."""
    ds = FileListDataset([("a.npy", 0), ("b.npy", 1)], ["x", "y"])
    base = dict(pretrained="none", arch="resnet18", crop_size=16, small_images=True, seed=0, shard_size=10)
    rgb = fingerprint(ds, argparse.Namespace(**base, in_channels=3, channel_mean=None, channel_std=None))
    assert "in_channels" not in rgb
    five = fingerprint(ds, argparse.Namespace(**base, in_channels=5, channel_mean=[1.0] * 5, channel_std=[2.0] * 5,
                                              channel_norm="set"))
    four = fingerprint(ds, argparse.Namespace(**base, in_channels=4, channel_mean=[1.0] * 4, channel_std=[2.0] * 4,
                                              channel_norm="set"))
    per_image = fingerprint(ds, argparse.Namespace(**base, in_channels=5, channel_mean=[1.0] * 5,
                                                   channel_std=[2.0] * 5, channel_norm="image"))
    assert five != rgb and five != four and five["in_channels"] == 5 and per_image != five


def test_query_of_another_channel_count_is_one_sentence(tmp_path, capsys):
    data = band_folder(tmp_path / "data", per_class=2)
    query = str(tmp_path / "four.npy")
    np.save(query, np.zeros((4, 24, 24), np.uint16))
    ran = run_inline(capsys, main_knn.main, [data, *NET, "--in-channels", "auto", "--skip-knn", "--query", query,
                                             "--output-dir", str(tmp_path / "out")], check=False)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "has 4 channel(s), not the 5 of --in-channels 5" in ran.stderr
