"""How long does listing an ImageFolder of N files take without the listing cache (the
first scan, common/data/images.py) and with it (common/data/listing.py)?

Creates N empty `.jpg` files in K class folders under a temp folder (the listing reads names
only), sets the folders' mtimes an hour back (a folder changed within seconds of a scan is
not cached), then times:
  scan         the walk alone (what every script paid before the cache)
  cold         image_folder with no cache file: the walk plus writing the cache
  warm         image_folder with the cache: one stat per folder plus reading the file
and the same folder as a csv manifest of all its files (csv_manifest: cold reads the csv and
stats every file, warm is the cache hit).
The OS's own directory cache is warm in every case (the files were just created; dropping it
needs root): on a cold disk or a network file system the walk costs more and the cache the same.

    OMP_NUM_THREADS=1 python bench/listing.py                  # 200k files, 100 classes
    OMP_NUM_THREADS=1 python bench/listing.py --num-files 1000000
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.util import format_table, median, save_record  # noqa: E402
from common.data import images, listing  # noqa: E402


def make_folder(root: str, n: int, k: int) -> float:
    t = time.perf_counter()
    for c in range(k):
        os.makedirs(os.path.join(root, f"class{c:04d}"))
    for i in range(n):
        os.close(os.open(os.path.join(root, f"class{i % k:04d}", f"img{i:08d}.jpg"), os.O_WRONLY | os.O_CREAT, 0o644))
    old = time.time() - 3600
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (old, old))
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-files", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="times of each measurement (median reported)")
    p.add_argument("--dir", default=None, help="where to create the folder (default: a temp folder, removed after)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "listing_cpu.json"))
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-listing-", dir=args.dir)
    os.environ["XDG_CACHE_HOME"] = os.path.join(work, "cache")  # the user's own cache is not touched
    root = os.path.join(work, "data")
    try:
        print(f"=> creating {args.num_files} empty files in {args.classes} class folders under {root}", flush=True)
        create_s = make_folder(root, args.num_files, args.classes)
        print(f"=> created in {create_s:.1f} s", flush=True)
        csv_path = os.path.join(root, "all.csv")
        with open(csv_path, "w") as f:
            f.write("path,label\n")
            f.writelines(f"class{i % args.classes:04d}/img{i:08d}.jpg,c{i % args.classes:04d}\n"
                         for i in range(args.num_files))
        old = time.time() - 3600
        os.utime(csv_path, (old, old))
        os.utime(root, (old, old))
        t = {k: [] for k in ("scan", "cold", "warm", "mtime_check", "csv_cold", "csv_warm")}

        def timed(key, fn):
            t0 = time.perf_counter()
            out = fn()
            t[key].append(time.perf_counter() - t0)
            print(f"   {key}: {t[key][-1]:.3f} s", flush=True)
            return out

        for _ in range(args.repeats):
            found = timed("scan", lambda: images._scan(root, time.time()))
            want, dirs = (found.samples, found.classes), found.watched
            del found
        for _ in range(args.repeats):
            for key in (root, csv_path):
                if os.path.exists(listing.cache_path(key)):
                    os.remove(listing.cache_path(key))
            for kind in ("cold", "warm"):
                ds = timed(kind, lambda: images.image_folder(root))
                assert (ds.samples, ds.classes) == want, f"{kind}: the listing differs from the scan"
            timed("mtime_check", lambda: listing.mtimes(root, listing.prefix_of(root), dirs))
            ds = timed("csv_cold", lambda: images.csv_manifest(csv_path))
            want_csv = (ds.samples, ds.classes)
            ds = timed("csv_warm", lambda: images.csv_manifest(csv_path))
            assert (ds.samples, ds.classes) == want_csv, "the cached csv listing differs from the read"
        m = {k: median(v) for k, v in t.items()}
        size = os.path.getsize(listing.cache_path(root))
        results = {"num_files": args.num_files, "classes": args.classes, "create_s": create_s,
                   **{f"{k}_s": v for k, v in m.items()}, "cache_bytes": size,
                   "speedup_warm_vs_scan": m["scan"] / m["warm"], "speedup_csv": m["csv_cold"] / m["csv_warm"], "all": t}
        table = format_table(["listing", "seconds (median)"], [
            ["ImageFolder, scan only (no cache)", f"{m['scan']:.3f}"],
            ["ImageFolder, cold: scan + write the cache", f"{m['cold']:.3f}"],
            ["ImageFolder, warm: cache hit", f"{m['warm']:.3f}"],
            [f"  of which the mtime check ({len(dirs)} folders)", f"{m['mtime_check']:.4f}"],
            ["csv manifest, cold: read + a stat per file + write the cache", f"{m['csv_cold']:.3f}"],
            ["csv manifest, warm: cache hit", f"{m['csv_warm']:.3f}"]])
        print(table)
        print(f"=> cache file {size / 1e6:.1f} MB; warm is {results['speedup_warm_vs_scan']:.1f}x faster than the "
              f"scan, {results['speedup_csv']:.1f}x for the csv")
        save_record(args, "listing", torch.device("cpu"), results, table,
                    title=f"listing {args.num_files} files in {args.classes} class folders")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
