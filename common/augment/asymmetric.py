"""BYOL's asymmetric pair of views (Grill et al., 2020, table 6), which moco-v3 uses too (its
main_moco.py augmentation1 / augmentation2) and DINO for its two global crops."""
from typing import Optional, Tuple

from common.augment.transforms import Recipe


def byol_views(crop_size: int = 224, blur: bool = True, strength: float = 1.0, crop_min: Optional[float] = None,
               gray_images: bool = False, crop_max: float = 1.0, interpolation: str = "bilinear"
               ) -> Tuple[Recipe, Recipe]:
    """(view 1, view 2): both crop crop_min-1 (None: 0.08), flip, colour jitter (0.4, 0.4, 0.2, 0.1)
    x `strength` with p 0.8, grayscale p 0.2; view 1 Gaussian blur always and no solarization,
    view 2 blur p 0.1 and solarization p 0.2. `blur` False (small crops, as SimCLR's CIFAR
    recipe) drops the blur of both; gray_images: Recipe.for_gray_images (solarization kept);
    `interpolation`: the crops' resize (DINO's are bicubic)."""
    s = strength
    ops = ("crop", "jitter", "gray") + (("blur",) if blur else ())
    common = dict(crop_min=crop_min or 0.08, jitter=(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s), crop_max=crop_max,
                  interpolation=interpolation)
    first = Recipe(crop_size, ops=ops + ("flip",), blur_p=1.0, **common)
    second = Recipe(crop_size, ops=ops + ("solarize", "flip"), blur_p=0.1, solarize_p=0.2, **common)
    return (first.for_gray_images(), second.for_gray_images()) if gray_images else (first, second)
