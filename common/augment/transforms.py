"""Augmentation building blocks: a pretraining `Recipe` (the methods' own recipes are
moco/augment.py and simclr/augment.py), and the classifier / eval transforms. A recipe
runs whole in the loader workers on PIL images (the CPU path, as fast as the MoCo
authors' loader: uint8 PIL ops, PIL's blur), or split with `--gpu-augment`: crop and flip
in the workers, the photometric ops batched on the device (common/augment/gpu.py)."""
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, ImageFilter
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from common.augment.gpu import NOISE_ON, NOISE_SEED, NOISE_SIGMA, PhotometricSpec, add_noise, draw_params, photometric_one
from common.data.channels import (IMAGENET_MEAN, IMAGENET_STD, RGB, Channels,  # noqa: F401 (IMAGENET_*: re-exported)
                                  StandardisePerImage)
from common.data.datasets import SMALL_CROP_MAX

# ops that need colour: left out of a recipe for --in-channels other than 3 (Recipe.for_channels)
COLOUR_OPS = {"gray": "random grayscale", "solarize": "solarization (defined on [0, 1] intensities)"}


class TwoCropsTransform:
    """Two independent augmentations of one image: the query and the key; with `second`, the
    second view through its own transform (BYOL's asymmetric pair), drawn after the first."""

    def __init__(self, base_transform: Callable, second: Optional[Callable] = None):
        self.base_transform, self.second = base_transform, second or base_transform

    def __call__(self, x) -> List:
        return [self.base_transform(x), self.second(x)]


class MultiViewTransform:
    """Views of one image, view i through transforms[i], drawn in order (DINO's multi-crop:
    2 global + n local crops; two transforms are TwoCropsTransform's pair)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x) -> List:
        return [t(x) for t in self.transforms]


def _to_normalised(channels: Channels) -> List[Callable]:
    """The last step of an eval or classifier transform: PIL -> normalised tensor (RGB), or
    the normalisation of a full-depth tensor with the run's measured statistics."""
    if channels.per_image:
        return [StandardisePerImage()]
    if channels.full_depth:
        return [transforms.Normalize(mean=channels.mean, std=channels.std)]
    return [transforms.ToTensor(), transforms.Normalize(mean=channels.mean, std=channels.std)]


class ToNormalizedTensor:
    """PIL uint8 image -> normalised float tensor in one pass: ToTensor() then Normalize()
    with the ImageNet statistics, without the intermediate [0, 1] tensor (half the float
    work of the two transforms)."""

    def __init__(self, mean: Tuple[float, ...] = IMAGENET_MEAN, std: Tuple[float, ...] = IMAGENET_STD):
        self.shift = torch.tensor(mean).view(-1, 1, 1) * 255
        self.scale = torch.tensor(std).view(-1, 1, 1) * 255

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return pil_to_tensor(img).float().sub_(self.shift).div_(self.scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def blur_kernel_size(crop_size: int) -> int:
    """~10 % of the image side, odd, as in SimCLR (23 at 224 px)."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


class PILGaussianBlur:
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max) through PIL's filter, as the MoCo
    authors' loader does (moco/loader.py): far cheaper than torchvision's GaussianBlur, a float
    convolution on a PIL image (measured: docs/performance.md, the blur per image). sigma is
    drawn from torch's RNG so the per-sample seed fixes it."""

    def __init__(self, sigma: Tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))  # PIL's radius is the standard deviation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


INTERPOLATION = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation as an ordered list of ops ("crop", "flip", "jitter", "gray",
    "blur", "solarize": inverts the pixels at or above 128 of 255; it must follow the colour ops,
    as the batched path applies it last). Called on a PIL image it runs the whole recipe in the loader worker (the CPU
    path). `split()` gives the `--gpu-augment` path: crop and flip in the worker, which
    returns the uint8 crop and its photometric parameters, and `spec()` for the batched
    photometric ops on the training device (common/augment/gpu.py). Flips commute with the
    photometric ops, so both paths draw from the same distribution."""
    crop_size: int
    crop_min: float
    ops: Tuple[str, ...]
    jitter: Tuple[float, float, float, float]
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    crop_max: float = 1.0
    solarize_p: float = 0.0
    noise_p: float = 0.0  # "noise": Gaussian noise of sigma ~ U(noise_sigma), in normalised units
    noise_sigma: Tuple[float, float] = (0.0, 0.1)
    channels: Channels = RGB  # what the images are (for_channels) and how they are normalised
    interpolation: str = "bilinear"  # of the crop's resize: "bicubic" as DINO's repo resizes

    def _op(self, name: str) -> Callable:
        if name == "crop":
            return transforms.RandomResizedCrop(self.crop_size, scale=(self.crop_min, self.crop_max),
                                                interpolation=INTERPOLATION[self.interpolation])
        if name == "flip":
            return transforms.RandomHorizontalFlip()
        if name == "jitter":
            jitter = transforms.ColorJitter(*self.jitter)
            return jitter if self.jitter_p >= 1 else transforms.RandomApply([jitter], p=self.jitter_p)
        if name == "gray":
            return transforms.RandomGrayscale(p=self.gray_p)
        if name == "solarize":  # PIL's ImageOps.solarize: 255 - x for x >= 128
            return transforms.RandomSolarize(threshold=128, p=self.solarize_p)
        return transforms.RandomApply([PILGaussianBlur(self.blur_sigma)], p=self.blur_p)

    @functools.cached_property
    def _pil(self) -> Callable:
        if self.channels.full_depth:  # tensors: crop and flip, then the batched path's ops on one sample
            return FullDepthViews(self)
        tail = [ToNormalizedTensor(self.channels.mean, self.channels.std)]
        if "noise" in self.ops:
            tail.append(NoiseAfterNormalising(self.spec()))
        return transforms.Compose([self._op(o) for o in self.ops if o != "noise"] + tail)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self._pil(img)

    def for_channels(self, channels: Channels) -> Tuple["Recipe", List[str]]:
        """This recipe for `channels`: RGB as it is; for another count the crops, flip,
        brightness, contrast, blur and noise, without the colour ops (saturation, hue, random
        grayscale, solarization). Returns (recipe, what was left out and why) for the log."""
        if not channels.full_depth:
            return dataclasses.replace(self, channels=channels), []
        dropped = [COLOUR_OPS[o] for o in self.ops if o in COLOUR_OPS]
        b, c, sat, hue = self.jitter
        if "jitter" in self.ops and (sat or hue):
            dropped.insert(0, "saturation and hue jitter")
        return dataclasses.replace(self, ops=tuple(o for o in self.ops if o not in COLOUR_OPS), jitter=(b, c, 0.0, 0.0),
                                   channels=channels), dropped

    def spec(self) -> PhotometricSpec:
        """The photometric part, for common.augment.gpu.photometric."""
        ops = self.ops
        if "solarize" in ops and any(ops.index(o) > ops.index("solarize") for o in ("jitter", "gray", "blur")
                                     if o in ops):
            raise ValueError(f"solarize must follow the colour ops and the blur (the batched path's order): {ops}")
        return PhotometricSpec(jitter=self.jitter, jitter_p=self.jitter_p if "jitter" in ops else 0.0,
                               gray_p=self.gray_p if "gray" in ops else 0.0,
                               gray_first="gray" in ops and "jitter" in ops and ops.index("gray") < ops.index("jitter"),
                               blur_p=self.blur_p, blur_sigma=self.blur_sigma,
                               blur_kernel=blur_kernel_size(self.crop_size) if "blur" in ops else 0,
                               mean=self.channels.mean, std=self.channels.std,
                               solarize_p=self.solarize_p if "solarize" in ops else 0.0,
                               full_depth=self.channels.full_depth, per_image=self.channels.per_image,
                               noise_p=self.noise_p if "noise" in ops else 0.0, noise_sigma=self.noise_sigma)

    def describe(self) -> str:
        """The recipe in one line for the log, e.g. `crop 0.08-1, jitter (0.4, 0.4, 0.2, 0.1) p 0.8,
        gray p 0.2, blur p 1, flip`."""
        words = {"crop": f"crop {self.crop_size} px of {self.crop_min:g}-{self.crop_max:g}"
                         + (f" ({self.interpolation})" if self.interpolation != "bilinear" else ""), "flip": "flip",
                 "jitter": f"jitter ({', '.join(f'{v:g}' for v in self.jitter)}) p {self.jitter_p:g}",
                 "gray": f"gray p {self.gray_p:g}", "blur": f"blur p {self.blur_p:g}",
                 "solarize": f"solarize p {self.solarize_p:g}",
                 "noise": f"noise {self.noise_sigma[0]:g}-{self.noise_sigma[1]:g} std p {self.noise_p:g}"}
        where = "" if not self.channels.full_depth else f" ({self.channels.count} channel(s) at full depth)"
        return ", ".join(words[o] for o in self.ops) + where

    def for_gray_images(self) -> "Recipe":
        """The recipe for grayscale images: the same crops, brightness and contrast (and
        solarization, defined on intensity); no saturation or hue jitter and no random
        grayscale, which leave a gray image as it was."""
        b, c, _, _ = self.jitter
        return dataclasses.replace(self, ops=tuple(o for o in self.ops if o != "gray"), jitter=(b, c, 0.0, 0.0))

    def decode_side(self) -> int:
        """Shortest side a JPEG may be decoded at (PIL draft) without starving the smallest
        random crop (area crop_min of the image) of pixels: crop / sqrt(crop_min)."""
        return int(math.ceil(self.crop_size / math.sqrt(self.crop_min)))

    def split(self) -> "GeometricPart":
        return GeometricPart(self)


# what a two-view script trains with: one recipe for both views, or one per view (BYOL's pair)
Views = Union[Recipe, Tuple[Recipe, Recipe]]


def view_pair(views: Views) -> Tuple[Recipe, Recipe]:
    """(first view's recipe, second view's recipe)."""
    return (views, views) if isinstance(views, Recipe) else (views[0], views[1])


def views_for(views: Views, channels: Channels) -> Tuple[Views, List[str]]:
    """`views` for the run's channels (Recipe.for_channels) and what was left out of them."""
    first, second = view_pair(views)
    (a, dropped), (b, _) = first.for_channels(channels), second.for_channels(channels)
    return (a if isinstance(views, Recipe) else (a, b)), dropped


def with_noise(views: Views, strength: float) -> Views:
    """--noise S: every view adds Gaussian noise with probability 0.5, sigma ~ U(0, S), after
    normalisation (the last op of both the CPU and the batched path)."""
    if strength <= 0:
        return views

    def noisy(r: Recipe) -> Recipe:
        ops = r.ops if "noise" in r.ops else r.ops + ("noise",)
        return dataclasses.replace(r, ops=ops, noise_p=0.5, noise_sigma=(0.0, strength))
    first, second = view_pair(views)
    return noisy(first) if isinstance(views, Recipe) else (noisy(first), noisy(second))


def two_views(views: Views) -> TwoCropsTransform:
    """The CPU path's transform of an image into its two views."""
    first, second = view_pair(views)
    return TwoCropsTransform(first, second)


def views_decode_side(views: Views) -> int:
    """The shortest side both views' crops need (Recipe.decode_side)."""
    return max(r.decode_side() for r in view_pair(views))


class GeometricPart:
    """The loader-worker half of `--gpu-augment`: crop and flip on the PIL image, then the
    uint8 crop (no float work) and the view's photometric parameters, drawn here from the
    per-sample seed so resume stays exact. A full-depth image (a float tensor) gives its
    float crop."""

    def __init__(self, recipe: Recipe):
        self.spec = recipe.spec()
        self.geometric = transforms.Compose([recipe._op(o) for o in recipe.ops if o in ("crop", "flip")])

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> List[torch.Tensor]:
        crop = self.geometric(img)
        return [crop if isinstance(crop, torch.Tensor) else pil_to_tensor(crop), draw_params(self.spec)]


class FullDepthViews:
    """A recipe on a full-depth (C, H, W) tensor in the loader worker: GeometricPart, then the
    `--gpu-augment` path's photometric ops on this one sample, so both paths run the same code
    on the same per-sample draws."""

    def __init__(self, recipe: Recipe):
        self.part = GeometricPart(recipe)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            raise TypeError("a full-depth recipe takes (C, H, W) tensors; read the images with --in-channels")
        crop, params = self.part(img)
        return photometric_one(crop, params, self.part.spec)


class NoiseAfterNormalising:
    """The noise op of an RGB recipe on the CPU path: drawn and added as photometric() does."""

    def __init__(self, spec: PhotometricSpec):
        self.spec = spec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        params = draw_params(self.spec)
        if params[NOISE_ON] > 0:
            x = add_noise(x[None], params[NOISE_SIGMA].view(1), params[NOISE_SEED].view(1))[0]
        return x


def train_classifier(crop_size: int = 224, channels: Channels = RGB) -> transforms.Compose:
    """Supervised training augmentation for the linear probe (as in facebookresearch/moco)."""
    ops = [transforms.RandomResizedCrop(crop_size)] if crop_size > SMALL_CROP_MAX else \
        [transforms.Resize(crop_size), transforms.RandomCrop(crop_size, padding=crop_size // 8)]
    return transforms.Compose(ops + [transforms.RandomHorizontalFlip()] + _to_normalised(channels))


def train_classifier_decode_side(crop_size: int = 224) -> int:
    """Shortest side train_classifier needs of a decoded image (JPEG draft): its smallest
    RandomResizedCrop takes 8 % of the image; small crops are a plain resize."""
    return int(math.ceil(crop_size / math.sqrt(0.08))) if crop_size > SMALL_CROP_MAX else crop_size


def eval_decode_side(crop_size: int = 224) -> int:
    """Shortest side eval_transform needs of a decoded image: its Resize target."""
    return int(round(crop_size / 0.875)) if crop_size > SMALL_CROP_MAX else crop_size


def eval_transform(crop_size: int = 224, channels: Channels = RGB) -> transforms.Compose:
    """Resize to crop/0.875 then centre crop (256 -> 224 for ImageNet); small images just resize."""
    resize = int(round(crop_size / 0.875)) if crop_size > SMALL_CROP_MAX else crop_size
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop_size)] + _to_normalised(channels))
