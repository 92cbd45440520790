"""SimCLR's augmentation recipe (Chen et al., 2020, appendix A)."""
from typing import Optional

from common.augment.transforms import Recipe


def simclr_augmentation(crop_size: int = 224, strength: float = 1.0, blur: bool = True,
                        crop_min: Optional[float] = None, gray_images: bool = False,
                        crop_max: float = 1.0) -> Recipe:
    """SimCLR augmentation: crop crop_min-1 (None: 0.08), colour distortion of strength s, grayscale 0.2,
    blur 0.5 (SimCLR turns blur off for CIFAR-sized images: pass blur=False); gray_images:
    brightness and contrast only (Recipe.for_gray_images)."""
    s = strength
    ops = ("crop", "flip", "jitter", "gray") + (("blur",) if blur else ())
    r = Recipe(crop_size, crop_min or 0.08, ops, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), crop_max=crop_max)
    return r.for_gray_images() if gray_images else r
