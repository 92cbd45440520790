"""`--dataset synthetic`: generated, learnable images (the class is the foreground hue),
so tests and demos need no download."""
import colorsys

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.data.channels import pil_full_depth
from common.errors import UserError


class SyntheticPatterns(Dataset):
    """Generated images a network can learn from augmentations alone.

    The class is the hue of the foreground (`num_classes` hues around the colour
    wheel). Everything else is random nuisance: which pattern draws the foreground
    (stripes, rings, checkerboard, disc, ...), its frequency, phase and position,
    saturation, brightness, the grey background and pixel noise. A random-init
    network's features are dominated by that layout, so its kNN accuracy is mediocre;
    contrastive pretraining learns to ignore what crops and flips change and keeps the
    hue, and beats it within ~100 steps on a CPU. That makes a fast, honest test of
    "pretraining learned something" (tests/test_main_moco.py and the probe tests).
    """

    PATTERNS = ("hstripes", "vstripes", "checker", "rings", "dots", "disc", "square", "plus", "xhatch", "triangle")
    MAX_CLASSES = 12

    def __init__(self, size: int = 2000, num_classes: int = 8, image_size: int = 32, seed: int = 0):
        if not 2 <= num_classes <= self.MAX_CLASSES:
            raise UserError(f"--synthetic-classes must be between 2 and {self.MAX_CLASSES}, got {num_classes}")
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed
        self.classes = [f"hue{round(360 * i / num_classes):03d}" for i in range(num_classes)]
        self.targets = [i % num_classes for i in range(size)]
        self.full_depth = 0  # common.data.datasets.read_channels

    def __len__(self) -> int:
        return self.size

    def path(self, index: int) -> str:
        return f"synthetic[{self.seed}:{index}]"

    @staticmethod
    def pattern_mask(rng: np.random.Generator, s: int, name: str) -> np.ndarray:
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        r = np.hypot(y - cy, x - cx)
        freq, phase, size = rng.uniform(2.0, 5.0), rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4)
        wave = lambda t: np.sin(2 * np.pi * freq * t + phase)  # noqa: E731
        if name == "hstripes":
            return wave(y) > 0
        if name == "vstripes":
            return wave(x) > 0
        if name == "checker":
            return (wave(x) > 0) ^ (wave(y) > 0)
        if name == "rings":
            return wave(r) > 0
        if name == "dots":
            return wave(x) * wave(y) > 0.4
        if name == "disc":
            return r < size
        if name == "square":
            d = np.maximum(abs(y - cy), abs(x - cx))
            return (d < size) & (d > size * 0.5)
        if name == "plus":
            return ((abs(y - cy) < size * 0.3) & (abs(x - cx) < size)) | ((abs(x - cx) < size * 0.3) & (abs(y - cy) < size))
        if name == "xhatch":
            return (wave(x + y) > 0.3) | (wave(x - y) > 0.3)
        return (abs(y - cy) < size) & (abs(x - cx) < (y - cy + size) / 2)  # triangle

    def __getitem__(self, index: int):

        label = self.targets[index]
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        mask = self.pattern_mask(rng, s, self.PATTERNS[rng.integers(len(self.PATTERNS))])[..., None]
        hue = (label / self.num_classes + rng.uniform(-0.03, 0.03)) % 1.0
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)), dtype=np.float32)
        bg = np.full(3, rng.uniform(0.0, 0.3), dtype=np.float32)
        img = np.where(mask, fg, bg) + rng.normal(0, 0.05, size=(s, s, 3)).astype(np.float32)
        img = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
        if self.full_depth:  # --in-channels 1: the gray image (another count: one sentence)
            return pil_full_depth(img, self.full_depth, self.path(index)), label
        return img, label
