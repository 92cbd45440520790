#!/usr/bin/env python
"""Write an ImageFolder or a csv manifest into tar shards (WebDataset layout), for reading
from object stores and network disks as a few large files instead of millions of small ones.

    python make_shards.py /data/imagenet /data/imagenet-shards --split train              # ~1 GB shards
    python make_shards.py /data/imagenet /data/imagenet-shards --split val
    python make_shards.py train.csv shards/ --shard-size 500MB --no-shuffle

Reads DATA as the training scripts do (--dataset imagefolder: DATA/<split>/ beside the other
split, or a folder of class folders for train; --dataset csv: train.csv, or a folder holding
train.csv and val.csv). Writes OUT/<split>-000000.tar, ... (each sample KEY.<ext>, the image
file's bytes unchanged, and KEY.cls, its class index) and, last, OUT/<split>.index.json: the
shards with their sample counts and byte sizes, the label map and the source. Every shard is
then read back and checked (sample count, each image's sha256 against its source file's,
each class). Never overwrites: a split OUT already holds is refused. docs/shards.md.
"""
import argparse
import os
import time

from common.cli import ArgumentParser, switch
from common.data.datasets import build_dataset
from common.data.images import FileListDataset
from common.data.shards import (check_shards, existing, human_size, index_name, make_index, order, parse_size,
                                write_index, write_shards)
from common.errors import UserError, reason, report_user_errors
from common.log.progress import format_seconds

PRINT_EVERY_S = 10.0  # a progress line at most this often (and the last one)


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Write an ImageFolder or a csv manifest into tar shards (WebDataset layout) "
                                   "with an index, and check them")
    p.add_argument("data", metavar="DATA", help="the image folder or csv manifest, as the training scripts take it")
    p.add_argument("out", metavar="OUT", help="folder to write the shards and the index into (created if missing)")
    p.add_argument("--dataset", default=None, choices=("imagefolder", "csv"),
                   help="what DATA is (default: csv when DATA is a .csv file, else imagefolder)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="which split of DATA to write")
    p.add_argument("--shard-size", default="1GB", type=size_arg, metavar="SIZE",
                   help="largest size of a shard: 1GB, 500MB, 256MiB or bytes (default: 1GB; a larger image is a "
                        "shard alone)")
    p.add_argument("--seed", default=0, type=int, help="seed of the shuffle of the samples across the shards")
    switch(p, "--shuffle", default=True,
           help="write the samples in a seeded random order (--no-shuffle: in the listing's order, class by class)")
    switch(p, "--check", default=True, help="re-read every shard after writing and compare it with the source")
    return p


def source(data: str, dataset: str, split: str) -> FileListDataset:
    """The split's listing through the training scripts' build_dataset (image_folder or csv_manifest)."""
    try:
        ds = build_dataset(argparse.Namespace(dataset=dataset, data=data, download=False, in_channels=None), split)
    except OSError as e:
        raise UserError(f"cannot read {data!r} ({reason(e)}); pass a readable image folder or csv manifest") from None
    if ds is None:
        raise UserError(f"{data!r} has no {split} split (for an image folder: {os.path.join(data, split)} beside "
                        f"{os.path.join(data, 'train')}; for csv: {split}.csv beside train.csv)")
    assert isinstance(ds, FileListDataset), type(ds)
    if not ds.samples:
        raise UserError(f"{data!r} lists no images for the {split} split; nothing to write")
    return ds


class Lines:
    """`=> OUT: 1200/5000 images (24%), 3 shard(s), 1.20 GB, 410 img/s, 48.3 MB/s, eta 0:01:23`,
    at most every PRINT_EVERY_S seconds and at the end."""

    def __init__(self, out: str):
        self.out, self.t0, self.last = out, time.time(), 0.0

    def __call__(self, done: int, total: int, written: int, shards: int) -> None:
        now = time.time()
        if done < total and now - self.last < PRINT_EVERY_S:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        print(f"=> {self.out}: {done}/{total} images ({100 * done / total:.0f}%), {shards} shard(s), "
              f"{human_size(written)}, {done / elapsed:.0f} img/s, {written / elapsed / 1e6:.1f} MB/s, "
              f"eta {format_seconds((total - done) * elapsed / max(done, 1))}", flush=True)


@report_user_errors
def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    dataset = args.dataset or ("csv" if args.data.lower().endswith(".csv") and os.path.isfile(args.data)
                               else "imagefolder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"OUT {args.out!r} is a file; pass a folder for the shards")
    try:
        found = existing(args.out, args.split)
    except OSError as e:
        raise UserError(f"cannot list OUT {args.out!r} ({reason(e)}); pass a folder you can read and write") from None
    if found:
        raise UserError(f"{args.out} already holds {args.split} shards or their index ({', '.join(found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}); make_shards.py never overwrites: remove them or pass "
                        f"another OUT")
    ds = source(args.data, dataset, args.split)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {args.out!r} ({reason(e)}); pass a folder you can write to") from None
    seed = args.seed if args.shuffle else None
    ordered = [ds.samples[i] for i in order(len(ds.samples), seed)]
    print(f"=> {args.data}: {len(ordered)} {args.split} images in {len(ds.classes)} class(es) -> {args.out}, "
          f"shards of at most {human_size(args.shard_size)} (or one image), " +
          (f"shuffled with seed {seed}" if seed is not None else "in the listing's order"), flush=True)
    shards, digests = write_shards(ordered, args.out, args.split, args.shard_size, Lines(args.out))
    labels = [t for _, t in ordered]
    if args.check:
        t0 = time.time()
        try:
            check_shards(args.out, shards, labels, digests)
        except UserError as e:
            raise UserError(f"{e}; no index was written: remove {os.path.join(args.out, args.split)}-*.tar and run "
                            f"again") from None
        print(f"=> checked {len(shards)} shard(s): {len(ordered)} samples, each image's sha256 and class as in the "
              f"source ({format_seconds(time.time() - t0)})", flush=True)
    index = make_index(shards, args.split, ds.classes, labels, args.data, dataset, seed)
    path = write_index(args.out, args.split, index)
    print(f"=> {path}: {len(shards)} shard(s), {index['samples']} samples, {human_size(index['bytes'])}, "
          f"{len(ds.classes)} class(es)" + (f", {index['unlabelled']} unlabelled" if index["unlabelled"] else "")
          + ("" if args.check else " (not checked: --no-check)"), flush=True)
    assert os.path.basename(path) == index_name(args.split)


if __name__ == "__main__":
    main()
