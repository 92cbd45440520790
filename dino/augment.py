"""DINO's multi-crop views (facebookresearch/dino's DataAugmentationDINO): two global crops,
BYOL's asymmetric pair (view 1 always blurred, view 2 blurred 10 % and solarized 20 %) at
`--global-crops-scale`, and `--local-crops-number` small crops at `--local-crops-scale`,
blurred half the time. Every crop is resized bicubically, as DINO's RandomResizedCrop(...,
interpolation=Image.BICUBIC) does (the repo's other recipes keep torchvision's bilinear default)."""
from typing import List, Tuple

from common.augment.asymmetric import byol_views
from common.augment.transforms import Recipe


def local_crop_size(crop_size: int) -> int:
    """DINO's local crop side for a global one: 96 px for 224 (3/7), on a multiple of 8 so every
    patch size up to 8 tiles it (32 px -> 16 px)."""
    return max(8, int(round(crop_size * 3 / 7 / 8)) * 8)


def dino_views(crop_size: int, local_size: int, n_local: int, global_scale: Tuple[float, float],
               local_scale: Tuple[float, float], blur: bool = True, strength: float = 1.0,
               gray_images: bool = False) -> List[Recipe]:
    """[global 1, global 2] + n_local x [local]: colour jitter (0.4, 0.4, 0.2, 0.1) x `strength`
    p 0.8, grayscale p 0.2, flip everywhere; `blur` False (small crops) drops every blur."""
    s = strength
    firsts = byol_views(crop_size, blur=blur, strength=s, crop_min=global_scale[0], gray_images=gray_images,
                        crop_max=global_scale[1], interpolation="bicubic")
    local = Recipe(local_size, crop_min=local_scale[0], crop_max=local_scale[1],
                   ops=("crop", "jitter", "gray") + (("blur",) if blur else ()) + ("flip",),
                   jitter=(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s), blur_p=0.5, interpolation="bicubic")
    return list(firsts) + [local.for_gray_images() if gray_images else local] * n_local
