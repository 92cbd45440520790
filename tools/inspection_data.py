#!/usr/bin/env python
"""A generated inspection-like image set, unlike Fashion-MNIST: grayscale images of a few
hundred pixels that all share one global structure (a grid of lines over a surface, like a
wafer, tiles or a weave), whose instance lives in fine texture, and whose class is a small
local defect: a thin dark crack or a dark patch, on a third of the images (2:1). Written as
PNG files in an ImageFolder (train/ and val/, classes `defect` and `ok`), so benchmarks go
through the scripts' real file-reading path. Seeded: the same command writes the same files.

    python tools/inspection_data.py runs/inspection --images 1700 --size 256 --seed 0
    python main_simclr.py runs/inspection -a resnet18 --recipe small --crop-size 64 ...
"""
import argparse
import os
import sys
from typing import Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSES = ("defect", "ok")
DEFECT_SHARE = 1 / 3  # 2:1, as the inspection set this stands in for


def surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """The shared structure and the instance's fine texture, as floats in [0, 1]: a grid of
    darker lines (period, phase and angle vary a little), a weave of fine sinusoids whose
    frequency and orientation are the instance's own, and sensor noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(-0.05, 0.05)
    u, v = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    period = size / rng.uniform(9, 12)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    width = rng.uniform(1.5, 2.5)
    lines = ((np.abs((u + phase_u) % period - period / 2) < width / 2)
             | (np.abs((v + phase_v) % period - period / 2) < width / 2))
    img = np.full((size, size), rng.uniform(0.45, 0.6), dtype=np.float32) - 0.15 * lines
    for _ in range(2):  # the weave: two fine gratings, the instance's fingerprint
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.25, 0.45)  # cycles per pixel
        img += 0.03 * np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    return img + rng.normal(0, 0.02, size=(size, size)).astype(np.float32)


def add_defect(rng: np.random.Generator, img: np.ndarray) -> str:
    """Darken a thin crack (a random walk 1-2 px wide) or a small patch (an ellipse); returns which."""
    size = img.shape[0]
    margin = size // 8
    cy, cx = rng.uniform(margin, size - margin, size=2)
    if rng.random() < 0.5:
        length, width, depth = int(rng.uniform(0.12, 0.3) * size), rng.uniform(0.6, 1.1), rng.uniform(0.2, 0.35)
        heading = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        crack = np.zeros_like(img, dtype=bool)
        for _ in range(length):
            heading += rng.normal(0, 0.25)
            cy, cx = cy + np.sin(heading), cx + np.cos(heading)
            crack |= (np.abs(y - cy) <= width) & (np.abs(x - cx) <= width)
        img[crack] -= depth
        return "crack"
    ry, rx = rng.uniform(0.02, 0.05, size=2) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    img[inside] -= rng.uniform(0.15, 0.3)
    return "patch"


def inspection_image(seed: int, index: int, size: int) -> Tuple[Image.Image, str, str]:
    """(8-bit grayscale image, class, defect kind or '') of image `index`, from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    img = surface(rng, size)
    defective = rng.random() < DEFECT_SHARE
    kind = add_defect(rng, img) if defective else ""
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels, mode="L"), CLASSES[0] if defective else CLASSES[1], kind


def write_inspection_set(root: str, images: int, size: int, seed: int, val_fraction: float = 0.25) -> dict:
    """Write root/{train,val}/{defect,ok}/NNNNN.png; returns the counts per split and class."""
    counts = {split: {c: 0 for c in CLASSES} for split in ("train", "val")}
    rng = np.random.default_rng([seed, 1 << 30])
    val = set(rng.choice(images, size=int(round(val_fraction * images)), replace=False).tolist())
    for i in range(images):
        img, label, _ = inspection_image(seed, i, size)
        split = "val" if i in val else "train"
        os.makedirs(os.path.join(root, split, label), exist_ok=True)  # no empty folder for a split without images
        img.save(os.path.join(root, split, label, f"{i:05d}.png"))
        counts[split][label] += 1
    return counts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Write the generated inspection-like benchmark set")
    p.add_argument("output", help="folder to write (train/ and val/ class folders)")
    p.add_argument("--images", default=1700, type=int, help="images in all (default: 1700)")
    p.add_argument("--size", default=256, type=int, help="side in pixels (default: 256)")
    p.add_argument("--seed", default=0, type=int, help="the set's seed: another seed, other images")
    p.add_argument("--val-fraction", default=0.25, type=float, help="share held out as val/ (default: 0.25)")
    args = p.parse_args(argv)
    counts = write_inspection_set(args.output, args.images, args.size, args.seed, args.val_fraction)
    print(f"=> {args.output}: " + ", ".join(f"{s} {counts[s]['ok']} ok / {counts[s]['defect']} defect"
                                           for s in counts))
    return counts


if __name__ == "__main__":
    main()
