"""Image files on disk (common/data/images.py): csv manifests as spreadsheets write them (a BOM,
not UTF-8, stray spaces, labels differing in case), 16-bit PNGs, EXIF rotation, symlink loops."""
import codecs
import os

import numpy as np
import pytest
from PIL import Image
from conftest import write_image_folder

from common.data.images import csv_manifest
from common.errors import UserError


@pytest.fixture
def images(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), per_class=2, split_dirs=("",))
    return tmp_path


@pytest.mark.parametrize("header", [True, False])
def test_csv_with_a_byte_order_mark_reads_like_one_without(images, header):
    """Excel's "CSV UTF-8" starts with a BOM: it must not stick to the header or the first path."""
    rows = ["path,label"] * header + ["cat/0.png,cat", "cat/1.png,cat", "dog/0.png,dog", "dog/1.png,dog"]
    path = images / "train.csv"
    path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(rows).encode() + b"\r\n")
    data = csv_manifest(str(path))
    assert data.classes == ["cat", "dog"] and data.targets == [0, 0, 1, 1]
    assert data.path(0) == str(images / "cat" / "0.png")


def test_csv_that_is_not_utf8_is_one_sentence_naming_where(images):
    path = images / "train.csv"
    # Excel's plain "CSV" on Windows: cp1252, where é is the single byte 0xe9
    path.write_bytes("path,label\ncat/0.png,cat\ndog/0.png,chien_été\n".encode("cp1252"))
    assert len("path,label\ncat/0.png,cat\ndog/0.png,chien_") == 41
    with pytest.raises(UserError) as e:
        csv_manifest(str(path))
    assert str(e.value) == (f"csv manifest {str(path)!r} is not UTF-8 text (byte 0xe9 at offset 41, line 3); "
                            f"save it as UTF-8 (in Excel: Save As > CSV UTF-8)")
    # the offset counts the BOM too, so it is where a hex editor shows the byte
    path.write_bytes(codecs.BOM_UTF8 + b"cat/0.png,\xe9t\xe9\n")
    with pytest.raises(UserError, match=r"byte 0xe9 at offset 13, line 1\)"):
        csv_manifest(str(path))
    path.write_bytes("path,label\ncat/0.png,cat\n".encode("utf-16"))
    with pytest.raises(UserError, match="is UTF-16 text; save it as UTF-8"):
        csv_manifest(str(path))


def test_loose_images_beside_class_folders_are_read_as_unlabelled_and_said(tmp_path, capsys):
    from common.data.images import image_folder
    write_image_folder(tmp_path, classes=("sub",), per_class=2, split_dirs=("",))
    for i in range(8):  # the pool's loose images, beside its one subfolder
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"loose_{i}.png")
    ds = image_folder(str(tmp_path))
    assert len(ds) == 10 and ds.classes == ["sub"]
    assert sorted(ds.targets) == [-1] * 8 + [0] * 2
    assert ("the 8 images directly in it are read as unlabelled, beside the 2 images in its 1 class folder(s)"
            in capsys.readouterr().out)


def test_a_link_from_one_class_into_another_reads_its_images_once_under_their_own_class(tmp_path, capsys):
    import os

    from common.data.images import image_folder
    write_image_folder(tmp_path, classes=("a", "b"), per_class=3, split_dirs=("",))
    os.symlink(tmp_path / "b", tmp_path / "a" / "more")  # a folder link into another class
    os.symlink(tmp_path / "b" / "0.png", tmp_path / "a" / "also.png")  # a file link into another class
    os.symlink(tmp_path, tmp_path / "b" / "up")  # a loop back to DATA
    ds = image_folder(str(tmp_path))
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    assert all("more" not in p and "up" not in p.split(os.sep) for p, _ in ds.samples)
    assert "1 image link(s)" in capsys.readouterr().err


def test_16_bit_png_exif_rotation_and_symlink_loops(tmp_path):
    from common.data.images import image_folder, pil_loader
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = np.asarray(pil_loader(str(tmp_path / "g16.png")))
    assert x.shape == (64, 64, 3) and x.max() == 255 and x.min() == 0 and 120 < x.mean() < 135  # not all white
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert pil_loader(str(tmp_path / "rot.jpg")).size == (20, 40)
    os.makedirs(tmp_path / "ds" / "c" / "sub")
    Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "c" / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "c" / "sub" / "1.png")
    os.symlink(tmp_path / "ds" / "c", tmp_path / "ds" / "c" / "sub" / "loop")
    assert len(image_folder(str(tmp_path / "ds")).samples) == 2


def test_csv_labels_are_stripped_and_case_clashes_warned(tmp_path, capsys):
    from common.data.images import csv_manifest
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "train.csv").write_text("path,label\na.png,Cat \nb.png, Cat\nc.png,cat\n")
    ds = csv_manifest(str(tmp_path / "train.csv"))
    assert ds.classes == ["Cat", "cat"] and ds.targets == [0, 0, 1]
    assert "differ only in case" in capsys.readouterr().err
