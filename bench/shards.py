"""The loader's images/s from an ImageFolder of small JPEGs and from the same images as shards
(`make_shards.py`, read by `--dataset shards`), with 0 and 2 workers, from a cold and a warm
page cache, and the time to the first batch (building the dataset included: the folder's
listing or the shards' headers, each without and with its cache).

The images are real: Fashion-MNIST's 70,000 (train + test), and past that their mirror
images, saved as JPEG (quality 90, 28 px, as a user's folder of small photos would hold them).
Two loads are timed: `read` (the image's bytes only: what the file system serves) and
`views` (decode + SimCLR's two 32 px views: what pretraining asks of the loader).
Cold: every file of the source is dropped from the page cache first
(posix_fadvise DONTNEED after a sync; no root needed); warm: the same pass again.

    OMP_NUM_THREADS=1 python bench/shards.py --data ../shared/data/fashion-mnist --num-images 100000
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import make_shards  # noqa: E402
from bench.util import format_table, median, save_record  # noqa: E402
from common.augment.transforms import MultiViewTransform  # noqa: E402
from common.data.datasets import build_dataset  # noqa: E402
from common.data.images import FileListDataset  # noqa: E402
from common.data.loader import make_loader  # noqa: E402
from common.data.transformed import TransformedDataset  # noqa: E402
from common.distributed.collectives import DistEnv  # noqa: E402
from simclr.augment import simclr_augmentation  # noqa: E402


SOURCES = ("imagefolder", "shards")


def write_folder(src: str, root: str, n: int) -> float:
    import torchvision.datasets as tvd
    t = time.perf_counter()
    parts = [tvd.FashionMNIST(src, train=train, download=False) for train in (True, False)]
    images = np.concatenate([p.data.numpy() for p in parts])
    labels = np.concatenate([p.targets.numpy() for p in parts])
    for c in range(10):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    for i in range(n):
        arr = images[i % len(images)]
        if i >= len(images):
            arr = arr[:, ::-1]
        Image.fromarray(np.ascontiguousarray(arr)).save(os.path.join(root, f"class{labels[i % len(images)]}",
                                                                    f"{i:07d}.jpg"), quality=90)
    return time.perf_counter() - t


def drop_cache(paths: List[str]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_only(dataset, index: int, min_side=None):
    """The image's bytes and label, no decode: what the file system serves."""
    if isinstance(dataset, FileListDataset):
        path, target = dataset.samples[index]
        with open(path, "rb") as f:
            return torch.tensor(len(f.read())), target
    return torch.tensor(len(dataset.read_bytes(index))), dataset.targets[index]


def one_pass(kind: str, data: str, load: str, workers: int, batch: int, limit: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    args = argparse.Namespace(in_channels=None, dataset=kind, data=data, strict_data=False, shuffle_buffer=1000)
    base = build_dataset(args, "pretrain")
    built = time.perf_counter() - t0
    if load == "read":
        ds = TransformedDataset(base, None, read=read_only)
    else:
        ds = TransformedDataset(base, MultiViewTransform([simclr_augmentation(32, blur=False)] * 2), decode_side=32)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    loader, sampler = make_loader(ds, batch, env, workers, seed=0)
    sampler.set_epoch(0)
    seen, first = 0, None
    for _ in loader:
        seen += batch
        if first is None:
            first = time.perf_counter() - t0
        if seen >= limit:
            break
    total = time.perf_counter() - t0
    del loader
    return {"images_per_sec": seen / (total - first + 1e-9) if seen > batch else 0.0, "first_batch_s": first,
            "dataset_s": built, "images": seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/fashion-mnist", help="Fashion-MNIST root (torchvision layout)")
    p.add_argument("--num-images", type=int, default=100_000)
    p.add_argument("--images-per-pass", type=int, default=25_600, help="images timed per pass (after the first batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--loads", nargs="+", default=["read", "views"], choices=("read", "views"))
    p.add_argument("--shard-size", default="20MB")
    p.add_argument("--repeats", type=int, default=3, help="warm passes per source (median)")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--dir", default=None, help="where to write the images (default: a temp folder, removed after)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "shards_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir)
    os.environ["SSL_PRETRAIN_LISTINGS"] = os.path.join(work, "cache")  # the user's own cache is not touched
    folder, shards = os.path.join(work, "folder"), os.path.join(work, "shards")
    results: Dict = {}
    try:
        print(f"=> writing {args.num_images} JPEGs to {folder}", flush=True)
        results["write_folder_s"] = write_folder(args.data, folder, args.num_images)
        t = time.perf_counter()
        make_shards.main([folder, shards, "--shard-size", args.shard_size])
        results["make_shards_s"] = time.perf_counter() - t
        data_of = {"imagefolder": folder, "shards": shards}
        files = {"imagefolder": [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs],
                 "shards": [os.path.join(shards, f) for f in os.listdir(shards)]}
        results["bytes"] = {k: sum(os.path.getsize(f) for f in v) for k, v in files.items()}
        rows, runs = [], []
        for load in args.loads:
            for workers in args.workers:
                # cold once per source; warm passes alternate between the sources (median), so a
                # neighbour's load on the shared CPU falls on both
                passes = [(kind, "cold") for kind in SOURCES] + [(kind, "warm") for _ in range(args.repeats)
                                                                  for kind in SOURCES]
                got: Dict = {}
                for kind, cache in passes:
                    if cache == "cold":
                        drop_cache(files[kind])
                        shutil.rmtree(os.environ["SSL_PRETRAIN_LISTINGS"], ignore_errors=True)
                    r = one_pass(kind, data_of[kind], load, workers, args.batch_size, args.images_per_pass)
                    r.update(load=load, workers=workers, source=kind, cache=cache)
                    runs.append(r)
                    got.setdefault((kind, cache), []).append(r)
                    print(f"=> {load} {kind} -j {workers} {cache}: {r['images_per_sec']:.0f} img/s, first batch "
                          f"{r['first_batch_s']:.2f} s (dataset {r['dataset_s']:.2f} s)", flush=True)
                for (kind, cache), rs in got.items():
                    rows.append([load, workers, kind, cache, len(rs), f"{median([r['images_per_sec'] for r in rs]):.0f}",
                                 f"{median([r['first_batch_s'] for r in rs]):.2f}",
                                 f"{median([r['dataset_s'] for r in rs]):.2f}"])
        results["runs"] = runs
        table = format_table(["load", "workers", "source", "page cache", "passes", "images/s (median)",
                              "first batch s", "dataset s"],
                             rows)
        print(table)
        save_record(args, "shards", torch.device("cpu"), results, table,
                    title=f"{args.num_images} Fashion-MNIST JPEGs: folder vs shards")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
