"""JPEG decoding, crop and flip on the training device (`--gpu-decode`).

With `--gpu-augment` the loader workers still decode every JPEG and resize two crops of
it with PIL; on a fast GPU (`--compile`) 15 cores cannot keep up (about 2,000 images/s
for 500x375 JPEGs on an H200 host). Here the workers only read the file's bytes, parse
its header for the size, and draw every view's crop box, flip and photometric
parameters from the per-sample seed, exactly the draws the `--gpu-augment` worker makes
(so a resumed run sees the same augmentations, and the two paths the same crops). The
device then decodes the batch at once (`torchvision.io.decode_jpeg`: nvJPEG, on the
hardware JPEG engine of an A100/H100/H200), cuts and resizes the crops (bilinear with
antialiasing, torchvision's tensor `resized_crop`), flips, and hands the uint8 crops to
`common.augment.gpu.photometric`.

Files nvJPEG should not get (PNG and other formats, CMYK, an EXIF rotation) are decoded
by the worker as before and sent whole; the device crops them the same way. The same
code runs on a CPU device (decode_jpeg's libjpeg path), which is what the tests check.
"""
import io
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from common.augment.gpu import draw_params, photometric
from common.augment.transforms import Recipe
from common.data.images import FileListDataset, decode_image
from common.data.shard_reader import ShardDataset
from common.data.subsets import SubsetDataset
from common.errors import UserError

# layout of one view's geometry vector: the crop box in source pixels, and the flip
TOP, LEFT, HEIGHT, WIDTH, FLIP = range(5)
# decoded images of at most this many samples are held at once: a batch of 256 phone
# photos (4000x3000) would otherwise take gigabytes of device memory before the crops
DECODE_CHUNK = 64
_EXIF_ORIENTATION = 0x0112


@dataclass
class EncodedImage:
    """A JPEG file's bytes and its size, as the worker reads them (no pixel decoded)."""
    data: bytes
    width: int
    height: int


def read_for_device(path: str, min_side: Optional[int] = None) -> Union[EncodedImage, Image.Image]:
    """The file's bytes when the device can decode it as it stands (a baseline or
    progressive JPEG in RGB or grayscale without an EXIF rotation); otherwise the image
    decoded here by `pil_loader` (EXIF rotation, 16-bit, CMYK, other formats)."""
    with open(path, "rb") as f:
        return bytes_for_device(f.read(), min_side)


def bytes_for_device(data: bytes, min_side: Optional[int] = None) -> Union[EncodedImage, Image.Image]:
    """read_for_device for an image's bytes already read (a file's, or a member of a shard)."""
    img = Image.open(io.BytesIO(data))  # reads the header only
    if img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
        return EncodedImage(data, *img.size)
    return decode_image(io.BytesIO(data), min_side)


def read_sample(dataset, index: int, min_side: Optional[int] = None):
    """(read_for_device(path), target) for image files and shards; other datasets (in memory,
    generated) give their PIL image, which goes to the device whole."""
    if isinstance(dataset, FileListDataset):
        path, target = dataset.samples[index]
        return read_for_device(path, min_side), target
    if isinstance(dataset, ShardDataset):  # the JPEG's bytes straight from the shard
        return bytes_for_device(dataset.read_bytes(index), min_side), dataset.targets[index]
    if isinstance(dataset, SubsetDataset):
        return read_sample(dataset.base, dataset.indices[index], min_side)
    return dataset[index]


def per_view(recipe: Union[Recipe, Tuple[Recipe, Recipe]], num_views: int) -> List[Tuple[Recipe, object]]:
    """(recipe, its PhotometricSpec) for each of `num_views` views: the one recipe for all, or
    a pair's own per view."""
    recipes = [recipe] * num_views if isinstance(recipe, Recipe) else list(recipe)
    if len(recipes) != num_views or len({r.crop_size for r in recipes}) != 1:
        raise ValueError(f"{num_views} views need one recipe each, of one crop size: {recipes}")
    return [(r, r.spec()) for r in recipes]


class EncodedViews:
    """The loader-worker half of `--gpu-decode`: for an EncodedImage or a PIL image, the
    payload (the JPEG's bytes, or the decoded image as a uint8 (3, H, W) tensor), and for
    each of `num_views` views its geometry (FLIP + 1 values: crop box, flip) and its
    photometric parameters, drawn in the order the `--gpu-augment` worker
    (common.augment.transforms.GeometricPart) draws them for the same seed. `recipe`: one
    for every view, or a pair, one per view (BYOL's asymmetric views)."""

    def __init__(self, recipe: Union[Recipe, Tuple[Recipe, Recipe]], num_views: int = 2):
        self.recipes = per_view(recipe, num_views)
        self.num_views, self.ratio = num_views, (3.0 / 4.0, 4.0 / 3.0)

    def __call__(self, img: Union[EncodedImage, Image.Image]) -> List[torch.Tensor]:
        if isinstance(img, EncodedImage):
            payload = torch.frombuffer(bytearray(img.data), dtype=torch.uint8)
            width, height = img.width, img.height
        else:
            payload = transforms.functional.pil_to_tensor(img.convert("RGB"))
            width, height = img.size
        # torchvision's own RandomResizedCrop draw needs only the size: a zero-stride stand-in
        shape_only = torch.empty(1, 1, 1).expand(3, height, width)
        geometry = torch.zeros(self.num_views, FLIP + 1, dtype=torch.int64)
        params = []
        for v, (recipe, spec) in enumerate(self.recipes):
            scale = (recipe.crop_min, recipe.crop_max)
            geometry[v, :FLIP] = torch.tensor(transforms.RandomResizedCrop.get_params(shape_only, scale, self.ratio))
            geometry[v, FLIP] = int("flip" in recipe.ops and torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw
            params.append(draw_params(spec))
        return [payload, geometry, torch.stack(params)]


def collate_encoded(samples: Sequence[Tuple[List[torch.Tensor], int]]):
    """Batches of EncodedViews samples (run in the loader worker): the JPEG bytes of the
    batch in one flat tensor with their offsets, because a tensor per file would cost a
    shared-memory file and descriptor each on the way to the main process; the images
    the workers decoded in a list (their sizes differ); the geometry and parameters
    stacked. `payloads` undoes the packing."""
    views, targets = zip(*samples)
    payloads = [v[0] for v in views]
    jpeg = [i for i, p in enumerate(payloads) if p.dim() == 1]
    whole = [i for i, p in enumerate(payloads) if p.dim() == 3]
    data = torch.cat([payloads[i] for i in jpeg]) if jpeg else torch.empty(0, dtype=torch.uint8)
    offsets = torch.tensor([0] + [payloads[i].numel() for i in jpeg], dtype=torch.int64).cumsum(0)
    packed = [data, offsets, torch.tensor(jpeg, dtype=torch.int64), [payloads[i] for i in whole],
              torch.tensor(whole, dtype=torch.int64)]
    return [packed, torch.stack([v[1] for v in views]), torch.stack([v[2] for v in views])], \
        default_collate(list(targets))


def payloads(packed: Sequence) -> List[torch.Tensor]:
    """collate_encoded's packing -> one payload per sample, in batch order: a 1-D view of
    its JPEG bytes or its decoded (3, H, W) image."""
    data, offsets, jpeg, whole, whole_index = packed
    out: List[Optional[torch.Tensor]] = [None] * (len(jpeg) + len(whole))
    bounds = offsets.tolist()
    for k, i in enumerate(jpeg.tolist()):
        out[i] = data[bounds[k]:bounds[k + 1]]
    for img, i in zip(whole, whole_index.tolist()):
        out[i] = img
    return out


def check_device_decoding(device: torch.device) -> None:
    """Stop with one sentence when this torchvision cannot decode JPEGs on `device`
    (a build without nvJPEG), before any worker starts."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buf, format="JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], mode=ImageReadMode.RGB,
                    device=device)
    except RuntimeError as e:
        raise UserError(f"this torchvision cannot decode JPEGs on {device} ({str(e).splitlines()[0]}); "
                        f"drop --gpu-decode (the workers then decode, with --gpu-augment)")


_side_streams = {}


def _decode_on(device: torch.device, encoded: List[torch.Tensor]) -> List[torch.Tensor]:
    """decode_jpeg on `device`, safe to use on the current stream. nvJPEG writes its output
    on a stream of its own; allocated on the current stream, that output could reuse
    memory the current stream's queued kernels (the previous step) still read or write.
    Allocating it on a side stream keeps the two apart; the current stream then waits for
    the decode, and the images are marked as used there so their memory is not handed to
    the next decode before that stream is done with them."""
    if device.type != "cuda":
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    current = torch.cuda.current_stream(device)
    side = _side_streams.setdefault(device, torch.cuda.Stream(device))
    with torch.cuda.stream(side):
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(side)
    for img in images:
        img.record_stream(current)
    return images


def _decode(payloads: Sequence[torch.Tensor], device: torch.device, strict: bool) -> List[torch.Tensor]:
    """uint8 (3, H, W) images on `device`: the JPEG bytes (1-D payloads) decoded there in
    one call, the images the workers decoded (3-D) copied. A JPEG that fails to decode is
    replaced by another image of the batch, with a warning (as the CPU path skips an
    unreadable file), or stops the run with --strict-data."""
    out: List[Optional[torch.Tensor]] = [None] * len(payloads)
    encoded = [i for i, p in enumerate(payloads) if p.dim() == 1]
    for i, p in enumerate(payloads):
        if p.dim() == 3:
            out[i] = p.to(device, non_blocking=True)
    if encoded:
        try:
            for i, img in zip(encoded, _decode_on(device, [payloads[i] for i in encoded])):
                out[i] = img
        except RuntimeError:  # one bad file fails the whole call: find it
            for i in encoded:
                try:
                    out[i] = _decode_on(device, [payloads[i]])[0]
                except RuntimeError as e:
                    if strict:
                        raise UserError(f"cannot decode a JPEG of this batch ({str(e).splitlines()[0]}); fix or "
                                        f"remove the file, or drop --strict-data to skip unreadable images")
                    print(f"warning: skipping a JPEG the device cannot decode ({str(e).splitlines()[0]})",
                          file=sys.stderr, flush=True)
    good = [img for img in out if img is not None]
    if not good:
        raise UserError("no JPEG of a batch could be decoded; check the data folder, or drop --gpu-decode")
    return [img if img is not None else good[i % len(good)] for i, img in enumerate(out)]


def resized_crops(images: Sequence[torch.Tensor], geometry: torch.Tensor, size: int,
                  mode: str = "bilinear") -> torch.Tensor:
    """uint8 (3, H_i, W_i) images and their (N, FLIP + 1) geometry -> uint8 (N, 3, size, size)
    crops: each box resized with antialiasing, `mode` the recipe's interpolation (bilinear:
    torchvision's tensor resized_crop), then flipped where FLIP says so."""
    device = images[0].device
    out = torch.empty(len(images), 3, size, size, device=device)
    for i, (img, (top, left, height, width, _)) in enumerate(zip(images, geometry.tolist())):
        region = img[:, top:top + height, left:left + width].unsqueeze(0).float()
        out[i] = F.interpolate(region, size=(size, size), mode=mode, antialias=True, align_corners=False)[0]
    flip = geometry[:, FLIP].nonzero().squeeze(1)
    if flip.numel():
        flip = flip.to(device)
        out[flip] = out[flip].flip(-1)
    # PIL's crops are uint8: round as it does, so both paths feed photometric() the same way
    return out.round_().clamp_(0, 255).to(torch.uint8)


class DecodeToDevice:
    """The loader's batch of EncodedViews samples -> one normalised float tensor per view
    on the device: decode, crop, flip, then the photometric ops (common.augment.gpu); `recipe`:
    one for every view, or a pair, one per view."""

    def __init__(self, recipe: Union[Recipe, Tuple[Recipe, Recipe]], device: torch.device,
                 channels_last: bool = False, strict: bool = False):
        pair = not isinstance(recipe, Recipe)
        self.specs = [spec for _, spec in per_view(recipe, 2)] if pair else None  # None: one spec for all views
        first = recipe[0] if pair else recipe
        self.spec, self.size, self.device, self.mode = first.spec(), first.crop_size, device, first.interpolation
        self.channels_last, self.strict = channels_last, strict

    def __call__(self, batch: Sequence) -> Tuple[torch.Tensor, ...]:
        packed, geometry, params = batch
        samples = payloads(packed)
        num_views = geometry.shape[1]
        crops: List[List[torch.Tensor]] = [[] for _ in range(num_views)]
        for start in range(0, len(samples), DECODE_CHUNK):
            images = _decode(samples[start:start + DECODE_CHUNK], self.device, self.strict)
            for v in range(num_views):
                crops[v].append(resized_crops(images, geometry[start:start + DECODE_CHUNK, v], self.size, self.mode))
        out = []
        for v in range(num_views):
            x = photometric(torch.cat(crops[v]), params[:, v], self.specs[v] if self.specs else self.spec)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return tuple(out)
