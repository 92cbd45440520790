"""Context-encoder inputs (Pathak et al., 2016): random square patches blanked out of an
image; the target is the image itself. Drawn from torch's global RNG, which the loader
seeds per sample (common/data/transformed.py), so the same sample in the same epoch gets the
same patches on any number of workers and after a resume, and new ones every epoch."""
from typing import List, Union

import torch
from PIL import Image
from torchvision import transforms

from common.data.channels import RGB, Channels


def random_patches(height: int, width: int, num_patches: int, patch_size: int) -> torch.Tensor:
    """A 1 x H x W bool mask, True inside `num_patches` squares of side `patch_size` placed
    uniformly at random (they may overlap)."""
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    tops = torch.randint(0, height - patch_size + 1, (num_patches,))
    lefts = torch.randint(0, width - patch_size + 1, (num_patches,))
    for t, l in zip(tops.tolist(), lefts.tolist()):
        mask[:, t:t + patch_size, l:l + patch_size] = True
    return mask


class InpaintingPair:
    """PIL image -> [masked image, image, mask]: the image resized to crop x crop (as the
    tutorial does), as a float tensor in [0, 1]; the masked copy is 0 inside the patches.

    With `channels` at full depth (--in-channels other than 3) the image is a (C, H, W) tensor
    of stored values, resized and kept in those units (ContextEncoder normalises it); the
    masked copy holds each channel's mean inside the patches, 0 once normalised: a stored 0
    can lie many standard deviations below a 16-bit band's values."""

    def __init__(self, crop_size: int, num_patches: int, patch_size: int, flip: bool = True,
                 channels: Channels = RGB):
        ops = [transforms.Resize((crop_size, crop_size))] + ([transforms.RandomHorizontalFlip()] if flip else [])
        self.image = transforms.Compose(ops if channels.full_depth else ops + [transforms.ToTensor()])
        self.fill = torch.tensor(channels.mean).view(-1, 1, 1) if channels.full_depth else None
        self.crop_size, self.num_patches, self.patch_size = crop_size, num_patches, patch_size

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> List[torch.Tensor]:
        x = self.image(img)
        mask = random_patches(self.crop_size, self.crop_size, self.num_patches, self.patch_size)
        if self.fill is not None:
            return [torch.where(mask, self.fill, x), x, mask]
        return [x.masked_fill(mask, 0.0), x, mask]
