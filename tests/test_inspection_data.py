"""tools/inspection_data.py: the generated inspection-like set is seeded, 2:1, grayscale PNG
in an ImageFolder the scripts read, and its defects are small and local."""
import os

import numpy as np
from PIL import Image

from tools.inspection_data import inspection_image, surface, write_inspection_set
from common.data.images import image_folder


def test_the_set_is_seeded_two_to_one_and_read_as_an_image_folder(tmp_path):
    counts = write_inspection_set(str(tmp_path / "a"), images=60, size=64, seed=3)
    assert sum(counts["val"].values()) == 15 and sum(counts["train"].values()) == 45
    defects = counts["train"]["defect"] + counts["val"]["defect"]
    assert 10 <= defects <= 30  # a third of 60, drawn per image
    write_inspection_set(str(tmp_path / "b"), images=60, size=64, seed=3)
    for root, _, files in os.walk(tmp_path / "a"):
        for name in files:
            other = os.path.join(str(root).replace(str(tmp_path / "a"), str(tmp_path / "b")), name)
            assert open(os.path.join(root, name), "rb").read() == open(other, "rb").read()
    img = Image.open(next((tmp_path / "a" / "train" / "ok").iterdir()))
    assert img.mode == "L" and img.size == (64, 64)
    folder = image_folder(str(tmp_path / "a" / "train"))
    assert folder.classes == ["defect", "ok"] and len(folder) == 45


def test_a_defect_is_a_small_dark_local_change_of_the_same_surface():
    for index in range(40):
        img, label, kind = inspection_image(seed=0, index=index, size=128)
        if label != "defect":
            continue
        rng = np.random.default_rng([0, index])
        clean = (np.clip(surface(rng, 128), 0, 1) * 255).round()
        changed = clean - np.asarray(img, dtype=np.float64) > 10
        assert kind in ("crack", "patch") and 0 < changed.mean() < 0.05  # darker, in under 5 % of the image
        return
    raise AssertionError("no defect among 40 images")
