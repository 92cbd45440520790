#!/usr/bin/env python
"""Images/s of the pretraining input pipeline: decode + two augmented views, through the
product's loader (common.data.loader.make_loader: persistent workers, prefetch, per-sample
seeded augmentation), per worker count: the MoCo authors' loader (the baseline of every
ratio), the scripts' CPU path, the loader half of --gpu-augment (decode, crop, flip,
uint8 out: its photometric half runs on the GPU, timed by bench/throughput.py), our
recipe with torchvision's float blur (as it was) and a transforms.v2 tensor path.

    python bench/dataloader.py --source jpeg --image-size 500 375 --crop-size 224 --workers 0 1 2
    python bench/dataloader.py --source fashion-mnist --data ../shared/data/fashion-mnist --crop-size 32

--source jpeg writes --num-images random-texture JPEGs (ImageNet-like size) to a temporary
folder, so decoding is measured too; synthetic generates images in the workers; fashion-
mnist reads the IDX files. Compare the printed images/s with the GPU step rate from
bench/throughput.py: the loader keeps up when its rate with the workers you have is higher.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.util import format_table, median, save_record, write_jpegs  # noqa: E402
from common.augment import transforms as augment  # noqa: E402
from common.augment.gpu_decode import EncodedViews, collate_encoded, read_sample  # noqa: E402
from common.data.datasets import build_dataset  # noqa: E402
from common.data.images import image_folder  # noqa: E402
from common.data.loader import make_loader  # noqa: E402
from common.data.synthetic import SyntheticPatterns  # noqa: E402
from common.data.transformed import TransformedDataset, load_sample  # noqa: E402
from common.distributed.collectives import DistEnv  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402
from moco.augment import moco_v2  # noqa: E402
from simclr.augment import simclr_augmentation  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Input pipeline throughput (decode + two-view augmentation)")
    p.add_argument("--source", default="jpeg", choices=("jpeg", "synthetic", "fashion-mnist", "mnist"))
    p.add_argument("--data", default="", help="dataset root for --source fashion-mnist/mnist")
    p.add_argument("--image-size", default=[500, 375], type=int, nargs="+", metavar="W [H]",
                   help="width and height of generated JPEGs (ImageNet's typical 500x375), or one side")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument("--num-images", default=256, type=int, help="images per timed pass")
    p.add_argument("-b", "--batch-size", default=32, type=int)
    p.add_argument("--workers", nargs="+", default=[0, 1, 2], type=int, help="loader worker counts to compare")
    p.add_argument("--recipes", nargs="+", default=["mocov2", "simclr"], choices=("mocov2", "simclr"))
    p.add_argument("--paths", nargs="+", default=["reference", "pil", "gpu_split"], choices=list(PATHS),
                   help="reference: facebookresearch/moco's loader (PIL ops, PIL blur); pil: the scripts' CPU path; "
                        "gpu_split: the loader half of --gpu-augment (decode, crop, flip, uint8 out); "
                        "torchvision_blur: ours with torchvision's float GaussianBlur (before the fix); "
                        "tensor_v2: transforms.v2 on uint8 tensors; gpu_decode: the loader half of --gpu-decode "
                        "(read bytes and header, draw crops; no pixel decoded)")
    p.add_argument("--repeats", default=3, type=int, help="timed passes per setting (median)")
    p.add_argument("--json", default="runs/bench/dataloader.json")
    return p


# ---------------------------------------------------------------- pipelines

class ReferenceBlur:
    """facebookresearch/moco's moco/loader.py GaussianBlur, verbatim in behaviour: sigma from
    Python's `random`, PIL's filter."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        import random

        from PIL import ImageFilter
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))


def reference_recipe(recipe: str, crop: int) -> Callable:
    """The MoCo authors' main_moco.py --aug-plus pipeline (torchvision PIL ops + their PIL
    blur); for simclr the same ops with SimCLR's strengths and order."""
    from torchvision import transforms as T
    normalize = T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    blur = [T.RandomApply([ReferenceBlur()], p=0.5)] if crop > 64 else []
    if recipe == "mocov2":
        ops = [T.RandomResizedCrop(crop, scale=(0.2, 1.0)),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)] + blur + \
              [T.RandomHorizontalFlip()]
    else:
        ops = [T.RandomResizedCrop(crop, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)] + blur
    return T.Compose(ops + [T.ToTensor(), normalize])


def torchvision_blur_recipe(recipe: str, crop: int) -> Callable:
    """Our recipe as it was before the PIL blur: torchvision's GaussianBlur (a float
    convolution on the PIL image, ~50 ms at 224 px) in place of PIL's filter."""
    from torchvision import transforms as T
    r = our_recipe(recipe, crop)

    def swap(t):
        if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], augment.PILGaussianBlur):
            return T.RandomApply([T.GaussianBlur(augment.blur_kernel_size(crop), sigma=r.blur_sigma)], p=r.blur_p)
        return t
    return T.Compose([swap(t) for t in r._pil.transforms])


def our_recipe(recipe: str, crop: int) -> augment.Recipe:
    """Exactly what main_moco.py --aug-plus / main_simclr.py build."""
    if recipe == "mocov2":
        return moco_v2(crop, blur=crop > 64)
    return simclr_augmentation(crop, blur=crop > 64)


def tensor_v2_recipe(recipe: str, crop: int) -> Callable:
    """The same recipe with transforms.v2 on a uint8 tensor (PIL -> tensor first, float
    only at the end); a candidate for a faster CPU path."""
    from torchvision.transforms import v2
    s = 1.0
    if recipe == "mocov2":
        ops = [v2.RandomResizedCrop(crop, scale=(0.2, 1.0), antialias=True),
               v2.RandomApply([v2.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8),
               v2.RandomGrayscale(p=0.2)]
        if crop > 64:
            ops.append(v2.RandomApply([v2.GaussianBlur(augment.blur_kernel_size(crop), sigma=(0.1, 2.0))], p=0.5))
        ops.append(v2.RandomHorizontalFlip())
    else:
        ops = [v2.RandomResizedCrop(crop, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
               v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
               v2.RandomGrayscale(p=0.2)]
        if crop > 64:
            ops.append(v2.RandomApply([v2.GaussianBlur(augment.blur_kernel_size(crop), sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose([v2.PILToTensor()] + ops + [v2.ToDtype(torch.float32, scale=True),
                                                  v2.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])


# name -> (view transform builder, decodes large JPEGs at reduced size?)
PATHS = {
    "pil": (our_recipe, True),  # the scripts' CPU path
    "gpu_split": (lambda r, c: our_recipe(r, c).split(), True),  # --gpu-augment's worker half
    "reference": (reference_recipe, False),  # facebookresearch/moco's loader
    "torchvision_blur": (torchvision_blur_recipe, False),  # ours before the PIL blur
    "tensor_v2": (tensor_v2_recipe, False),
    # --gpu-decode's worker half (read the bytes and the header, draw both views' boxes and
    # parameters); the decode itself runs on the device, in bench/throughput.py's step
    "gpu_decode": (lambda r, c: EncodedViews(our_recipe(r, c)), True),
}


class DecodeOnly:
    """Decode (and convert to a tensor) without augmentation: the floor of any pipeline."""

    def __call__(self, img):
        from torchvision.transforms.functional import pil_to_tensor
        return pil_to_tensor(img)


def build_source(args: argparse.Namespace, tmp: str):
    if args.source == "jpeg":
        width, height = (args.image_size * 2)[:2]
        write_jpegs(tmp, args.num_images, width, height)
        return image_folder(tmp)
    if args.source == "synthetic":
        return SyntheticPatterns(args.num_images, 8, args.image_size[0])
    ds = build_dataset(argparse.Namespace(in_channels=None, dataset=args.source, data=args.data, download=False), "pretrain")
    if len(ds) > args.num_images:
        from common.data.subsets import SubsetDataset
        ds = SubsetDataset(ds, range(args.num_images))
    return ds


def time_loader(base, transform: Callable, workers: int, args: argparse.Namespace,
                decode_side: Optional[int] = None, encoded: bool = False) -> List[float]:
    """Images/s of `repeats` passes over the dataset through the product's loader, after
    one untimed pass that starts the (persistent) workers. `encoded`: the --gpu-decode
    loader (file bytes read, list collation)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False,
                  local_world_size=1)
    ds = TransformedDataset(base, transform, decode_side=decode_side, read=read_sample if encoded else load_sample)
    loader, sampler = make_loader(ds, args.batch_size, env, workers, seed=0, drop_last=False,
                                  collate_fn=collate_encoded if encoded else None)
    rates = []
    for epoch in range(args.repeats + 1):
        sampler.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for _, labels in loader:
            n += labels.shape[0]
        if epoch > 0:
            rates.append(n / (time.perf_counter() - t0))
    del loader  # stops the persistent workers
    return rates


@report_user_errors
def main(argv=None) -> Dict:
    args = get_args_parser().parse_args(argv)
    if args.source in ("fashion-mnist", "mnist") and not args.data:
        raise UserError(f"--source {args.source} needs --data, the folder that holds its raw/ files")
    if args.num_images < args.batch_size:
        raise UserError(f"--num-images {args.num_images} is less than one batch of {args.batch_size}; raise it")
    tmp = tempfile.mkdtemp(prefix="bench_dataloader_")
    try:
        base = build_source(args, tmp)
        settings = [("decode_only", "-", "decode_only", DecodeOnly(), None)]
        for recipe in args.recipes:
            side = our_recipe(recipe, args.crop_size).decode_side()
            for path in args.paths:
                build, drafts = PATHS[path]
                tf = build(recipe, args.crop_size)
                settings.append((f"{recipe}/{path}", recipe, path,
                                 tf if path == "gpu_decode" else augment.TwoCropsTransform(tf), side if drafts else None))
        results = []
        for name, recipe, path, tf, side in settings:
            for w in args.workers:
                rates = time_loader(base, tf, w, args, decode_side=side, encoded=path == "gpu_decode")
                rec = {"setting": name, "recipe": recipe, "path": path, "workers": w,
                       "images_per_s": median(rates), "all_repeats": rates}
                results.append(rec)
                print(f"   {name:<26} workers {w}: {rec['images_per_s']:8.1f} img/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    baseline = "reference" if "reference" in args.paths else args.paths[0]
    for rec in results:  # vs the baseline path (the MoCo authors' loader) of the same recipe and worker count
        ref = next((r for r in results if r["recipe"] == rec["recipe"] and r["path"] == baseline
                    and r["workers"] == rec["workers"]), None)
        rec["ratio_vs_reference"] = rec["images_per_s"] / ref["images_per_s"] if ref else None
    header = ["pipeline"] + [f"{w} workers img/s" for w in args.workers]
    rows = []
    for name, *_ in settings:
        recs = {r["workers"]: r for r in results if r["setting"] == name}
        rows.append([name] + [f"{recs[w]['images_per_s']:.0f}" + (
            f" ({recs[w]['ratio_vs_reference']:.2f}x)" if recs[w]["ratio_vs_reference"] and recs[w]["path"] != baseline
            else "") for w in args.workers])
    title = (f"{args.source} {'x'.join(map(str, args.image_size)) if args.source in ('jpeg', 'synthetic') else 28} px -> "
             f"{args.crop_size} px crops, two views per image, batch {args.batch_size}, {args.num_images} images")
    table = format_table(header, rows)
    print(f"\n{title}\n{table}\n(images/s counts images, each giving two views; (x) = vs {baseline} "
          f"with the same workers)", flush=True)
    return save_record(args, "dataloader", torch.device("cpu"), results, table, title)


if __name__ == "__main__":
    main()
