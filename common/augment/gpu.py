"""Photometric augmentation of a whole batch on the training device (`--gpu-augment`).

The loader workers decode, crop and flip, and hand over uint8 crops together with the
photometric parameters of every view, drawn in the worker from the per-sample seed
(`draw_params`), so a resumed run sees the same augmentations. Here those parameters are
applied to the batch at once: colour jitter (per-sample factors and order, as
torchvision's ColorJitter draws them), grayscale, Gaussian blur (per-sample sigma) and
normalisation, with solarization last (per-sample on/off). Every op is torchvision's functional op on float images in [0, 1]
(`tests/test_gpu_augment.py` compares them on one image within 1/255); they run on any
device, so the CPU tests check the same code the GPU runs.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from common.data.channels import standardise_per_image

# layout of one view's parameter vector (float32)
JITTER_ON, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # a permutation of 0..3: brightness, contrast, saturation, hue
GRAY_ON, BLUR_ON, SIGMA, SOLARIZE_ON = 9, 10, 11, 12
NOISE_ON, NOISE_SIGMA, NOISE_SEED = 13, 14, 15  # NOISE_SEED: an integer below 2^24, exact in float32
NUM_PARAMS = 16
SOLARIZE_THRESHOLD = 0.5  # in [0, 1]: 128 of 255 on uint8 values, as PIL's ImageOps.solarize (BYOL's 0.5)


@dataclass(frozen=True)
class PhotometricSpec:
    """What a recipe does after the crop: colour jitter (strengths b, c, s, h, applied with
    probability jitter_p), grayscale with probability gray_p (before the jitter when
    gray_first, as MoCo v1), blur with probability blur_p and sigma in blur_sigma (kernel
    blur_kernel; 0 = no blur), solarization with probability solarize_p, then normalisation
    with mean/std."""
    jitter: Tuple[float, float, float, float]
    jitter_p: float
    gray_p: float
    gray_first: bool
    blur_p: float
    blur_sigma: Tuple[float, float]
    blur_kernel: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    solarize_p: float = 0.0
    # full depth (--in-channels other than 3): crops are float stored values, not uint8; only
    # brightness and contrast of the jitter apply, unclipped, contrast per channel
    full_depth: bool = False
    per_image: bool = False  # --channel-norm image: each sample standardised by its own mean and std
    noise_p: float = 0.0  # Gaussian noise added after normalisation, sigma ~ U(noise_sigma)
    noise_sigma: Tuple[float, float] = (0.0, 0.0)


def draw_params(spec: PhotometricSpec) -> torch.Tensor:
    """One view's photometric parameters from torch's global RNG (seeded per sample by the
    loader), drawn as torchvision's RandomApply/ColorJitter/RandomGrayscale would."""
    p = torch.zeros(NUM_PARAMS)
    b, c, s, h = spec.jitter
    p[JITTER_ON] = float(torch.rand(1) < spec.jitter_p)
    p[ORDER] = torch.randperm(4).float()
    p[BRIGHTNESS] = torch.empty(1).uniform_(max(0.0, 1 - b), 1 + b) if b else 1.0
    p[CONTRAST] = torch.empty(1).uniform_(max(0.0, 1 - c), 1 + c) if c else 1.0
    p[SATURATION] = torch.empty(1).uniform_(max(0.0, 1 - s), 1 + s) if s else 1.0
    p[HUE] = torch.empty(1).uniform_(-h, h) if h else 0.0
    p[GRAY_ON] = float(torch.rand(1) < spec.gray_p)
    p[BLUR_ON] = float(spec.blur_kernel > 0 and torch.rand(1) < spec.blur_p)
    p[SIGMA] = torch.empty(1).uniform_(*spec.blur_sigma)
    # drawn last, and only by a recipe that solarizes: the other recipes' draws stay as they were
    p[SOLARIZE_ON] = float(spec.solarize_p > 0 and torch.rand(1) < spec.solarize_p)
    if spec.noise_p > 0:  # likewise drawn only by a recipe with noise
        p[NOISE_ON] = float(torch.rand(1) < spec.noise_p)
        p[NOISE_SIGMA] = torch.empty(1).uniform_(*spec.noise_sigma)
        p[NOISE_SEED] = float(torch.randint(0, 2 ** 24, (1,)))
    return p


# ---------------------------------------------------------------- torchvision's functional ops, batched
# x: (N, 3, H, W) float in [0, 1]; factors: (N,)

def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W), ITU-R 601-2 luma as torchvision and PIL."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (_per_sample(f) * x + (1 - _per_sample(f)) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_grayscale(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Shift the hue by f (in turns, -0.5..0.5) through HSV, as torchvision's tensor op."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    v = maxc
    # HSV -> RGB
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * fr)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - fr))).clamp(0, 1)
    i = i.unsqueeze(1)
    # per channel, pick one of six candidates by the hue sector i (torchvision's table)
    channels = [torch.stack(c, dim=1).gather(1, i) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return torch.cat(channels, dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (torchvision's
    gaussian_blur with kernel_size and that sigma)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """x -> 1 - x where x >= SOLARIZE_THRESHOLD (torchvision's solarize on [0, 1] images; on
    uint8 values the same pixels as PIL's ImageOps.solarize at 128)."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# ---------------------------------------------------------------- the same ops on full-depth channels
# x: (N, C, H, W) float stored values (16-bit, bands): no [0, 1] range to clip to

def scale_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x * _per_sample(f)


def band_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Each channel blended with its own mean (bands differ in range; for one channel this
    is torchvision's contrast, unclipped)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return _per_sample(f) * x + (1 - _per_sample(f)) * mean


_BAND_JITTER_OPS = (scale_brightness, band_contrast)


def add_noise(x: torch.Tensor, sigma: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """x + sigma * N(0, 1), each sample's field drawn from its own seed (so a resumed run, or
    the CPU path, draws the same field on the same device type)."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        g = torch.Generator(device=x.device).manual_seed(int(seeds[i]))
        out[i] = torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
    return x + _per_sample(sigma) * out


def _index(mask: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """Indices where the CPU `mask` holds, on `device`; None when there are none. The
    parameters stay on the CPU for this: deciding on the GPU would sync the host with it
    (nonzero / an empty check) several times per view and stall the queued step."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def _apply_at(x: torch.Tensor, idx: Optional[torch.Tensor], fn, *per_sample: torch.Tensor) -> None:
    """fn applied in place to the samples `idx` of x (the others are left exactly as they are)."""
    if idx is not None:
        x[idx] = fn(x[idx], *(p[idx] for p in per_sample))


def photometric(images: torch.Tensor, params: torch.Tensor, spec: PhotometricSpec,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 crops (N, 3, H, W) on the device and their parameters (N, NUM_PARAMS) on the
    CPU -> normalised float images on the device: jitter (per-sample factors and order),
    grayscale, blur, solarization, normalisation, noise. With spec.full_depth: float crops
    (N, C, H, W) of stored values (_full_depth)."""
    dev = images.device
    if spec.full_depth:
        return _full_depth(images, params, spec, dtype)
    x = images.to(dtype).div_(255)  # a new tensor: the ops below work on it in place
    factors = params.to(dev, non_blocking=True).to(dtype)
    gray = _index(params[:, GRAY_ON] > 0, dev)
    to_gray = lambda v: rgb_to_grayscale(v).expand_as(v)  # noqa: E731
    if spec.gray_first:
        _apply_at(x, gray, to_gray)
    on = params[:, JITTER_ON] > 0
    order = params[:, ORDER].long()
    for pos in range(4):  # the op at position pos of each sample's own order
        for op in range(4):
            _apply_at(x, _index(on & (order[:, pos] == op), dev), _JITTER_OPS[op], factors[:, BRIGHTNESS + op])
    if not spec.gray_first:
        _apply_at(x, gray, to_gray)
    if spec.blur_kernel > 0:
        _apply_at(x, _index(params[:, BLUR_ON] > 0, dev), lambda v, s: gaussian_blur(v, s, spec.blur_kernel),
                  factors[:, SIGMA])
    if spec.solarize_p > 0:
        _apply_at(x, _index(params[:, SOLARIZE_ON] > 0, dev), solarize)
    return _normalise_and_noise(x, params, factors, spec)


def _normalise_and_noise(x: torch.Tensor, params: torch.Tensor, factors: torch.Tensor,
                         spec: PhotometricSpec) -> torch.Tensor:
    dev, c = x.device, x.shape[1]
    if spec.per_image:
        x = standardise_per_image(x)
    else:
        mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, c, 1, 1).to(dev, non_blocking=True)
        std = torch.tensor(spec.std, dtype=x.dtype).view(1, c, 1, 1).to(dev, non_blocking=True)
        x = x.sub_(mean).div_(std)
    noisy = (params[:, NOISE_ON] > 0).nonzero().squeeze(1) if spec.noise_p > 0 else None
    if noisy is not None and noisy.numel():  # the seeds stay on the CPU: reading them does not sync
        idx = noisy.to(dev)
        x[idx] = add_noise(x[idx], factors[idx, NOISE_SIGMA], params[noisy, NOISE_SEED])
    return x


def photometric_one(crop: torch.Tensor, params: torch.Tensor, spec: PhotometricSpec) -> torch.Tensor:
    """_full_depth() of one (C, H, W) crop, the loader worker's CPU path: the same op functions
    on the same parameters, read as numbers instead of through the batch's masks (a tenth of
    the overhead per sample; tests/test_channels.py holds the two paths equal)."""
    p = params.tolist()
    x = crop.to(torch.float32, copy=True)[None]
    if p[JITTER_ON] > 0:
        for op in p[ORDER]:  # saturation and hue (2, 3) have no meaning here
            if op < 2:
                x = _BAND_JITTER_OPS[int(op)](x, params[BRIGHTNESS + int(op)].view(1))
    if spec.blur_kernel > 0 and p[BLUR_ON] > 0:
        x = gaussian_blur(x, params[SIGMA].view(1), spec.blur_kernel)
    return _normalise_and_noise(x, params[None], params[None], spec)[0]


def _full_depth(images: torch.Tensor, params: torch.Tensor, spec: PhotometricSpec,
                dtype: torch.dtype) -> torch.Tensor:
    """photometric() for float crops of stored values: brightness and contrast (in each
    sample's drawn order), blur, normalisation with the measured statistics, noise."""
    dev = images.device
    x = images.to(dtype, copy=True)
    factors = params.to(dev, non_blocking=True).to(dtype)
    on = params[:, JITTER_ON] > 0
    order = params[:, ORDER].long()
    for pos in range(4):
        for op in range(2):  # saturation and hue (ops 2, 3) have no meaning here
            _apply_at(x, _index(on & (order[:, pos] == op), dev), _BAND_JITTER_OPS[op], factors[:, BRIGHTNESS + op])
    if spec.blur_kernel > 0:
        _apply_at(x, _index(params[:, BLUR_ON] > 0, dev), lambda v, s: gaussian_blur(v, s, spec.blur_kernel),
                  factors[:, SIGMA])
    return _normalise_and_noise(x, params, factors, spec)


class ViewsToDevice:
    """The loader's views of one batch -> normalised float tensors on the device. A view
    is either a float tensor (CPU augmentation) or [uint8 crops, parameters]
    (`--gpu-augment`: the photometric part runs here, batched). `spec`: one for every view, or
    one per view (BYOL's asymmetric pair)."""

    def __init__(self, device: torch.device, channels_last: bool = False,
                 spec: Union[None, PhotometricSpec, Sequence[PhotometricSpec]] = None):
        self.device, self.channels_last, self.spec = device, channels_last, spec

    def __call__(self, views: Sequence) -> Tuple[torch.Tensor, ...]:
        out = []
        for i, v in enumerate(views):
            if isinstance(v, (list, tuple)):
                images, params = v
                spec = self.spec if isinstance(self.spec, PhotometricSpec) else self.spec[i]
                x = photometric(images.to(self.device, non_blocking=True), params, spec)
            else:
                x = v.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return tuple(out)
