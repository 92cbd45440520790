"""MoCo's augmentation recipes: v1 (InstDisc's) and v2 ("aug-plus")."""
from typing import Optional

from common.augment.transforms import Recipe


def moco_v1(crop_size: int = 224, crop_min: Optional[float] = None, gray_images: bool = False,
            crop_max: float = 1.0) -> Recipe:
    """MoCo v1 / InstDisc augmentation (crop_min None: 0.2): grayscale, then jitter 0.4 always
    (gray_images: brightness and contrast only, Recipe.for_gray_images)."""
    r = Recipe(crop_size, crop_min or 0.2, ("crop", "gray", "jitter", "flip"), jitter=(0.4, 0.4, 0.4, 0.4),
               jitter_p=1.0, crop_max=crop_max)
    return r.for_gray_images() if gray_images else r


def moco_v2(crop_size: int = 224, blur: bool = True, strength: float = 1.0,
            crop_min: Optional[float] = None, gray_images: bool = False, crop_max: float = 1.0) -> Recipe:
    """MoCo v2 "aug-plus": SimCLR-like colour jitter (scaled by `strength`) and blur, crop scale
    crop_min-1 (None: 0.2); gray_images: brightness and contrast only (Recipe.for_gray_images)."""
    s = strength
    ops = ("crop", "jitter", "gray") + (("blur",) if blur else ()) + ("flip",)
    r = Recipe(crop_size, crop_min or 0.2, ops, jitter=(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s), crop_max=crop_max)
    return r.for_gray_images() if gray_images else r
