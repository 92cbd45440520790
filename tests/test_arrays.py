"""common/data/arrays.py: images that are not 8-bit RGB read at full depth (issue 44 item 2):
16-bit values bit-exact, .npy in either layout, multi-band TIFF through tifffile (or one
sentence without it), a mix of channel counts one sentence."""
import numpy as np
import pytest
from PIL import Image

from common.data import arrays
from common.errors import UserError


def test_16_bit_grayscale_png_and_tiff_keep_every_value_exactly(tmp_path):
    values = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)
    values[0, 0], values[0, 1], values[0, 2] = 1, 65535, 256  # the low byte alone, the top, the 9th bit
    for name in ("a.png", "a.tif"):
        Image.fromarray(values).save(tmp_path / name)
        arr = arrays.read_array(str(tmp_path / name))
        assert arr.shape == (16, 16, 1) and arr.dtype == np.float32
        assert np.array_equal(arr[:, :, 0].astype(np.uint16), values)  # bit-exact, no rescale
        assert arrays.channel_count(str(tmp_path / name)) == 1
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(tmp_path / "rgb.png")
    assert arrays.read_array(str(tmp_path / "rgb.png")).shape == (4, 4, 3)
    Image.fromarray(np.full((4, 4, 4), 9, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    assert arrays.read_array(str(tmp_path / "rgba.png")).shape == (4, 4, 3)  # alpha is a mask, not a band


def test_npy_in_either_layout_and_bad_arrays(tmp_path):
    bands = np.random.default_rng(0).integers(0, 4096, (5, 12, 10)).astype(np.uint16)
    np.save(tmp_path / "chw.npy", bands)
    np.save(tmp_path / "hwc.npy", bands.transpose(1, 2, 0))
    np.save(tmp_path / "hw.npy", bands[0].astype(np.float64) / 7)
    for name in ("chw.npy", "hwc.npy"):
        arr = arrays.read_array(str(tmp_path / name))
        assert arr.shape == (12, 10, 5) and np.array_equal(arr, bands.transpose(1, 2, 0).astype(np.float32))
        assert arrays.channel_count(str(tmp_path / name)) == 5
    assert arrays.read_array(str(tmp_path / "hw.npy")).shape == (12, 10, 1)
    assert arrays.npy_layout((3, 64, 64)) == "CHW" and arrays.npy_layout((64, 64, 3)) == "HWC"
    np.save(tmp_path / "4d.npy", np.zeros((2, 3, 4, 5)))
    np.save(tmp_path / "bool.npy", np.zeros((4, 4), bool))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for name, said in (("4d.npy", "4-d array"), ("bool.npy", "bool values"), ("broken.png", "cannot read image")):
        with pytest.raises(UserError, match=said) as e:
            arrays.read_array(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value)


def test_multi_band_tiff_through_tifffile_or_one_sentence_without_it(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    bands = np.random.default_rng(1).integers(0, 65535, (13, 8, 9)).astype(np.uint16)  # 13 bands, as Sentinel-2
    tifffile.imwrite(tmp_path / "s2.tif", bands, photometric="minisblack", planarconfig="separate")
    arr = arrays.read_array(str(tmp_path / "s2.tif"))
    assert arr.shape == (8, 9, 13) and np.array_equal(arr, bands.transpose(1, 2, 0).astype(np.float32))
    assert arrays.channel_count(str(tmp_path / "s2.tif")) == 13
    tifffile.imwrite(tmp_path / "contig.tif", bands.transpose(1, 2, 0), planarconfig="contig")  # Y X S
    assert np.array_equal(arrays.read_array(str(tmp_path / "contig.tif")), arr)
    monkeypatch.setattr(arrays, "require", lambda m: (_ for _ in ()).throw(
        UserError("multi-band TIFF needs the tifffile package, which is not installed; pip install tifffile")))
    with pytest.raises(UserError, match="pip install tifffile"):
        arrays.read_array(str(tmp_path / "s2.tif"))


def test_a_mix_of_channel_counts_is_one_sentence_naming_two_files(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "five.npy", np.zeros((5, 4, 4), np.float32))
    assert arrays.check_channels([str(tmp_path / "gray.png")] * 2) == 1
    with pytest.raises(UserError) as e:
        arrays.check_channels([str(tmp_path / "gray.png"), str(tmp_path / "rgb.png"), str(tmp_path / "five.npy")])
    assert "gray.png" in str(e.value) and "rgb.png" in str(e.value) and "has 1" in str(e.value)
    assert "\n" not in str(e.value)
