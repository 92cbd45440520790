"""Augmentation recipes: MoCo v1, MoCo v2 ("aug-plus"), SimCLR, and the eval transform."""
from typing import Callable, List, Optional

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TwoCropsTransform:
    """Two independent augmentations of one image: the query and the key."""

    def __init__(self, base_transform: Callable):
        self.base_transform = base_transform

    def __call__(self, x) -> List:
        return [self.base_transform(x), self.base_transform(x)]


def _normalize() -> transforms.Normalize:
    return transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _blur(crop_size: int) -> transforms.GaussianBlur:
    # kernel ~10% of the image side, odd, as in SimCLR; sigma range as in MoCo v2
    k = max(3, int(0.1 * crop_size) // 2 * 2 + 1)
    return transforms.GaussianBlur(kernel_size=k, sigma=(0.1, 2.0))


def moco_v1(crop_size: int = 224, crop_min: Optional[float] = None) -> transforms.Compose:
    """MoCo v1 / InstDisc augmentation (crop_min None: 0.2)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(crop_min or 0.2, 1.0)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        _normalize(),
    ])


def moco_v2(crop_size: int = 224, blur: bool = True, strength: float = 1.0,
            crop_min: Optional[float] = None) -> transforms.Compose:
    """MoCo v2 "aug-plus": SimCLR-like colour jitter (scaled by `strength`) and blur, crop scale
    crop_min-1 (None: 0.2)."""
    s = strength
    ops = [
        transforms.RandomResizedCrop(crop_size, scale=(crop_min or 0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ]
    if blur:
        ops.append(transforms.RandomApply([_blur(crop_size)], p=0.5))
    ops += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), _normalize()]
    return transforms.Compose(ops)


def simclr(crop_size: int = 224, strength: float = 1.0, blur: bool = True,
           crop_min: Optional[float] = None) -> transforms.Compose:
    """SimCLR augmentation: crop crop_min-1 (None: 0.08), colour distortion of strength s, grayscale 0.2,
    blur 0.5 (SimCLR turns blur off for CIFAR-sized images: pass blur=False)."""
    s = strength
    ops = [
        transforms.RandomResizedCrop(crop_size, scale=(crop_min or 0.08, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ]
    if blur:
        ops.append(transforms.RandomApply([_blur(crop_size)], p=0.5))
    ops += [transforms.ToTensor(), _normalize()]
    return transforms.Compose(ops)


def train_classifier(crop_size: int = 224) -> transforms.Compose:
    """Supervised training augmentation for the linear probe (as in facebookresearch/moco)."""
    ops = [transforms.RandomResizedCrop(crop_size)] if crop_size > 64 else \
        [transforms.Resize(crop_size), transforms.RandomCrop(crop_size, padding=crop_size // 8)]
    return transforms.Compose(ops + [transforms.RandomHorizontalFlip(), transforms.ToTensor(), _normalize()])


def eval_transform(crop_size: int = 224) -> transforms.Compose:
    """Resize to crop/0.875 then centre crop (256 -> 224 for ImageNet); small images just resize."""
    resize = int(round(crop_size / 0.875)) if crop_size > 64 else crop_size
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop_size),
                               transforms.ToTensor(), _normalize()])
