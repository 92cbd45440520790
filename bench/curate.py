"""main_curate.py against ground truth on real images with planted problems, as a user meets
them: exact copies (byte copies), near copies (a JPEG q 40-70 re-encode after a 0.8-1.2x
resize, a shift of up to 2 px and brightness +-10 %), train -> val leaks as such re-encoded
copies (and, as a separate row, as byte copies), flipped labels and uniform-noise images.
Precision / recall of every finding for our embeddings (random init and the checkpoints given)
and, on the same files in the same run, the peers installed as extras (imagededup PHash at its
default distance and at its best, cleanvision; cleanlab on our out-of-fold probabilities).

    PYTHONPATH=/tmp/c_peers OMP_NUM_THREADS=1 python bench/curate.py --data fashion-mnist \\
        --pretrained none runs/fm_simclr/checkpoint_last.pth.tar
    PYTHONPATH=/tmp/c_peers OMP_NUM_THREADS=1 python bench/curate.py --data ising --crop-size 64 \\
        --pretrained none runs/real/ising_simclr_s0/checkpoint_last.pth.tar

(the peers: pip install --target /tmp/c_peers --no-deps imagededup cleanvision cleanlab and their
light dependencies; see docs/curate.md). --write-only writes the planted folder and stops.
"""
import argparse
import csv
import io
import os
import shutil
import sys
import time
from typing import Dict, List, Set, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_curate  # noqa: E402
from bench.util import format_table, save_record  # noqa: E402
from common.extras import available  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
KINDS = ("exact", "near", "leak", "byte leak", "flipped", "noise")


def re_encoded(img: Image.Image, rng: np.random.Generator) -> bytes:
    """A JPEG (q 40-70) of `img` resized 0.8-1.2x, shifted by up to 2 px (edges repeated) and
    brightened or darkened by up to 10 %: how a copy usually comes back (an export, a re-save)."""
    s = rng.uniform(0.8, 1.2)
    img = img.convert("L").resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BILINEAR)
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    a = np.pad(np.asarray(img), 2, mode="edge")
    img = Image.fromarray(a[2 + dy:2 + dy + img.height, 2 + dx:2 + dx + img.width])
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(40, 71)))
    return buf.getvalue()


def source_images(data: str, n: int, n_val: int, seed: int) -> Tuple[List, List, List[str]]:
    """(train [(image, class index)], val [...], class names) of a real set: the Fashion-MNIST
    pool (n train and n_val test images, seeded) or an ImageFolder of ../shared/data."""
    rng = np.random.default_rng(seed)
    if data == "fashion-mnist":
        import torchvision
        tr = torchvision.datasets.FashionMNIST(os.path.join(DATA, data), train=True, download=False)
        te = torchvision.datasets.FashionMNIST(os.path.join(DATA, data), train=False, download=False)
        pick = lambda ds, k: [ds[int(i)] for i in rng.choice(len(ds), k, replace=False)]  # noqa: E731
        return pick(tr, n), pick(te, n_val), [c.replace("/", "-") for c in tr.classes]
    from torchvision.datasets import ImageFolder
    tr, va = ImageFolder(os.path.join(DATA, data, "train")), ImageFolder(os.path.join(DATA, data, "val"))
    load = lambda ds: [(Image.open(p).convert("L"), y) for p, y in ds.samples]  # noqa: E731
    return load(tr), load(va), tr.classes


def write_planted(data: str, root: str, n: int, n_val: int, seed: int) -> Tuple[Dict[str, int], Dict[str, Set]]:
    """DATA/train/<class>/ and DATA/val/<class>/ PNGs (JPEGs for re-encoded copies) with the
    planted problems; returns (the source image of every file: copies share their original's,
    the planted files or pairs by kind)."""
    rng = np.random.default_rng(seed)
    train, val, classes = source_images(data, n, n_val, seed)
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
    source: Dict[str, int] = {}
    truth: Dict[str, Set] = {k: set() for k in KINDS}
    n = len(train)
    flipped = set(rng.choice(n, int(0.05 * n), replace=False).tolist())
    originals = []
    for k, (img, y) in enumerate(train):
        given = int((y + rng.integers(1, len(classes))) % len(classes)) if k in flipped else y
        p = os.path.join(root, "train", classes[given], f"{k:05d}.png")
        img.save(p)
        source[p] = k
        originals.append((p, img, given))
        if k in flipped:
            truth["flipped"].add(p)
    vals = []
    for k, (img, y) in enumerate(val):
        p = os.path.join(root, "val", classes[y], f"v{k:05d}.png")
        img.save(p)
        source[p] = n + k
        vals.append((p, img, y))

    def plant(kind: str, pool: List, fraction: float, folder, write) -> None:
        for k, j in enumerate(rng.choice(len(pool), max(1, int(fraction * n)), replace=False)):
            p, img, y = pool[j]
            q = os.path.join(folder(y), f"{kind.replace(' ', '_')}{k:04d}" + (".jpg" if kind in ("near", "leak")
                                                                               else ".png"))
            write(p, img, q)
            source[q] = source[p]
            truth[kind].add(frozenset((p, q)))

    copy = lambda p, img, q: shutil.copyfile(p, q)  # noqa: E731
    reencode = lambda p, img, q: open(q, "wb").write(re_encoded(img, rng))  # noqa: E731
    in_train = lambda y: os.path.join(root, "train", classes[y])  # noqa: E731
    plant("exact", originals, 0.02, in_train, copy)
    plant("near", originals, 0.03, in_train, reencode)
    plant("leak", vals, 0.01, in_train, reencode)
    plant("byte leak", vals, 0.005, in_train, copy)
    w, h = train[0][0].size
    for k in range(max(1, int(0.005 * n))):
        q = os.path.join(root, "train", classes[int(rng.integers(len(classes)))], f"noise{k:04d}.png")
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(q)
        source[q] = -1 - k
        truth["noise"].add(q)
    return source, truth


def pr(found: Set, truth: Set, true_found: int = None) -> Tuple[float, float]:
    """(precision, recall) in %; `true_found`: the found items that are right, where that is not
    `found & truth` (a pair of two copies of one original is right but was not planted as such)."""
    hit = len(found & truth) if true_found is None else true_found
    return (100.0 * hit / len(found) if found else float("nan"),
            100.0 * len(found & truth) / len(truth) if truth else float("nan"))


def pairs_pr(found: Set[frozenset], planted: Set[frozenset], source: Dict[str, int]) -> Tuple[float, float]:
    """A found pair is right when both files come from one original; a planted pair is found when
    its copy is paired with its original or with another copy of it."""
    right = sum(1 for p in found if len({source.get(f, f) for f in p}) == 1)
    by_file = {}
    for p in found:
        for f in p:
            by_file.setdefault(f, set()).update(p)
    hit = {q for q in planted if any(source.get(g) == source.get(min(q)) for f in q for g in by_file.get(f, set()) - {f})}
    return (100.0 * right / len(found) if found else float("nan"), 100.0 * len(hit) / len(planted))


def read_rows(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def unplanted(path: str) -> bool:
    """A file of the real set as it was (not a copy, a leak or a noise image written by write_planted)."""
    return os.path.basename(path)[:1].isdigit() or os.path.basename(path)[:2] == "v0"


def unplanted_pairs(out: str, source: Dict[str, int]) -> List[Tuple[str, str]]:
    """The near pairs at the default --copy-ratio whose two files are both of the real set as it
    was, from two of its images: by the planting false, by eye mostly one photograph twice."""
    return [(r["path_a"], r["path_b"]) for r in read_rows(os.path.join(out, "duplicates.csv"))
            if r["kind"] == "near" and float(r["relative"]) <= main_curate.COPY_RATIO
            and unplanted(r["path_a"]) and unplanted(r["path_b"]) and source[r["path_a"]] != source[r["path_b"]]]


def pairs_png(pairs: List[Tuple[str, str]], path: str, side: int = 84, per_row: int = 4) -> None:
    """A grid of image pairs side by side (nearest-neighbour enlarged to `side` px), for the docs."""
    rows = (len(pairs) + per_row - 1) // per_row
    sheet = Image.new("L", (per_row * (2 * side + 12), max(rows, 1) * (side + 8)), 255)
    for k, (a, b) in enumerate(pairs):
        x, y = (k % per_row) * (2 * side + 12), (k // per_row) * (side + 8)
        for j, f in enumerate((a, b)):
            sheet.paste(Image.open(f).convert("L").resize((side, side), Image.NEAREST), (x + 2 + j * (side + 2), y + 4))
    sheet.save(path)


def is_leak(p: frozenset) -> bool:
    return len({"/val/" in f for f in p}) == 2


def score_ours(out: str, truth: Dict[str, Set], source: Dict[str, int], ratios: List[float]) -> Dict[str, Tuple]:
    """Every finding's P/R; near copies and re-encoded leaks at each --copy-ratio of `ratios`
    (the run listed pairs up to the largest), the default's as "near" and "leak"."""
    pairs = read_rows(os.path.join(out, "duplicates.csv"))
    found = lambda kind, cross, ratio=1.0: {frozenset((r["path_a"], r["path_b"])) for r in pairs  # noqa: E731
                                            if r["kind"] == kind and r["cross_split"] == str(int(cross))
                                            and float(r["relative"]) <= ratio}
    res = {"exact": pairs_pr(found("exact", False), truth["exact"], source),
           "near": pairs_pr(found("near", False, main_curate.COPY_RATIO), truth["near"], source),
           "leak": pairs_pr(found("near", True, main_curate.COPY_RATIO), truth["leak"], source),
           "byte leak": pairs_pr(found("exact", True), truth["byte leak"], source)}
    for ratio in ratios:
        res[f"near@{ratio}"] = pairs_pr(found("near", False, ratio), truth["near"], source)
        res[f"leak@{ratio}"] = pairs_pr(found("near", True, ratio), truth["leak"], source)
    # the false pairs of two files nothing was planted in: the set's own near-identical images
    res["unplanted pairs"] = len(unplanted_pairs(out, source))
    ranked = [r["path"] for r in read_rows(os.path.join(out, "outliers.csv"))]
    top1 = set(ranked[:max(1, len(ranked) // 100)])
    res["noise"] = pr(set(ranked[:len(truth["noise"])]), truth["noise"])
    res["noise in top 1 %"] = 100.0 * len(top1 & truth["noise"]) / len(truth["noise"])
    train = {p for p in source if "/train/" in p}
    if os.path.isfile(os.path.join(out, "label_errors.csv")):
        res["flipped"] = pr({r["path"] for r in read_rows(os.path.join(out, "label_errors.csv"))} & train,
                            truth["flipped"])
    return res


def score_peers(files: List[str], truth: Dict[str, Set], source: Dict[str, int]) -> Dict[str, Dict]:
    """imagededup PHash (default distance 10, and the best distance by F1 of near + leak) and
    cleanvision on the same files (skipped, with a note, when absent)."""
    peers: Dict[str, Dict] = {}
    if available("imagededup"):
        from imagededup.methods import PHash
        ph = PHash(verbose=False)
        enc = {f: ph.encode_image(image_file=f) for f in files}
        by_dist = {}
        for dist in range(0, 17, 2):
            got = ph.find_duplicates(encoding_map=enc, max_distance_threshold=dist)
            pairs = {frozenset((a, b)) for a, bs in got.items() for b in bs}
            byte = {p for p in pairs if len({source.get(f) for f in p}) == 1}  # for the exact row only
            by_dist[dist] = {"near": pairs_pr({p for p in pairs if not is_leak(p)}, truth["near"], source),
                             "leak": pairs_pr({p for p in pairs if is_leak(p)}, truth["leak"], source),
                             "exact": pairs_pr({p for p in pairs if not is_leak(p)} if dist == 0 else byte,
                                               truth["exact"], source)}
        f1 = lambda r: np.nan_to_num(2 * r[0] * r[1] / max(r[0] + r[1], 1e-9))  # noqa: E731
        best = max(by_dist, key=lambda d: f1(by_dist[d]["near"]) + f1(by_dist[d]["leak"]))
        peers["imagededup PHash, distance 10 (default)"] = by_dist[10]
        peers[f"imagededup PHash, distance {best} (best here)"] = by_dist[best]
    else:
        print("=> imagededup not installed: its rows are skipped")
    if available("cleanvision"):
        from cleanvision import Imagelab
        lab = Imagelab(filepaths=files)
        lab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
        sets = lambda key: {frozenset((a, b)) for s in lab.info[key]["sets"] for a in s for b in s if a < b}  # noqa
        ex, near = sets("exact_duplicates"), sets("near_duplicates")
        near -= ex
        peers["cleanvision"] = {"exact": pairs_pr({p for p in ex if not is_leak(p)}, truth["exact"], source),
                                "byte leak": pairs_pr({p for p in ex if is_leak(p)}, truth["byte leak"], source),
                                "near": pairs_pr({p for p in near if not is_leak(p)}, truth["near"], source),
                                "leak": pairs_pr({p for p in near if is_leak(p)}, truth["leak"], source)}
    else:
        print("=> cleanvision not installed: its rows are skipped")
    return peers


def cleanlab_row(root: str, out: str, truth: Dict[str, Set]) -> Tuple[float, float]:
    """cleanlab's find_label_issues on the probabilities main_curate.py's defaults use (the
    out-of-fold probe and kNN vote, averaged) of the run in `out`: its features from the
    embedding shards, its labels from the folders."""
    from cleanlab.filter import find_label_issues
    from torchvision.datasets import ImageFolder
    from curate.items import centre
    from curate.labels import knn_probs, probe_probs
    defaults = main_curate.get_args_parser().parse_args([root, "--pretrained", "none"])
    feats, paths, labels = [], [], []
    for split in ("train", "val"):
        ds = ImageFolder(os.path.join(root, split))
        for name in sorted(f for f in os.listdir(os.path.join(out, "embeddings")) if f.startswith(split + "_")
                           and f.endswith(".pt")):
            shard = torch.load(os.path.join(out, "embeddings", name), weights_only=True)
            feats.append(shard["features"])
            paths += [ds.samples[i][0] for i in shard["index"].tolist()]
            labels += [ds.samples[i][1] for i in shard["index"].tolist()]
    x, y = centre(torch.cat(feats)), torch.tensor(labels)
    classes = int(y.max()) + 1
    probs = (probe_probs(x, y, classes, defaults.probe_folds, defaults.seed, defaults.probe_iters).probs
             + knn_probs(x, y, x, classes, defaults.label_k, leave_out_self=True)) / 2
    mask = find_label_issues(y.numpy(), probs.numpy())
    return pr({p for p, m in zip(paths, mask) if m and "/train/" in p}, truth["flipped"])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "cahn-hilliard", "ising"),
                   help="the real set of ../shared/data the problems are planted in")
    p.add_argument("--pretrained", nargs="+", default=["none"], metavar="CKPT|none",
                   help="embeddings to compare (none: a random-init resnet18)")
    p.add_argument("--crop-size", default=32, type=int, help="the crop main_curate.py embeds at")
    p.add_argument("--root", default="/tmp/curate_bench", help="where the planted folder and the runs go")
    p.add_argument("--n", default=10000, type=int, help="Fashion-MNIST train images (the other sets: all)")
    p.add_argument("--n-val", default=2000, type=int, help="Fashion-MNIST test images, the val split")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--ratios", default=[0.2, 0.3, 0.4, 0.5], type=float, nargs="+",
                   help="--copy-ratio values scored (the run lists pairs up to the largest)")
    p.add_argument("--curate-args", default="", help="more main_curate.py flags, e.g. '--copy-ratio 0.4'")
    p.add_argument("--no-peers", action="store_true", help="no imagededup and cleanvision rows (cleanlab's stays)")
    p.add_argument("--write-only", action="store_true", help="write the planted folder and stop")
    p.add_argument("--json", default="", help="default: bench/results/curate_<data>.json")
    p.add_argument("--unplanted-png", default="", metavar="PATH",
                   help="also draw the first random-init run's near pairs of two unplanted images (at most 24)")
    return p


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        return f"{v:.0f}"
    return f"{v[0]:.0f} / {v[1]:.0f}"


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    args.json = args.json or f"bench/results/curate_{args.data}.json"
    t0 = time.time()
    root = os.path.join(args.root, args.data, "data")
    source, truth = write_planted(args.data, root, args.n, args.n_val, args.seed)
    print(f"=> planted in {root}: " + ", ".join(f"{len(v)} {k}" for k, v in truth.items()), flush=True)
    if args.write_only:
        return
    files = sorted(source)
    results: Dict[str, Dict] = {}
    ran: List[str] = []  # the output folders of the runs that finished
    for name in args.pretrained:
        out = os.path.join(args.root, args.data, "run_" + (os.path.basename(os.path.dirname(name)) or name))
        argv = [root, "--pretrained", name, "--crop-size", str(args.crop_size), "-j", "0", "--output-dir", out,
                "-p", "1000", "--resume", "--copy-ratio", str(max(args.ratios))] + args.curate_args.split()  # the planted files are the same for a seed:
        # a rerun reuses the embeddings and writes every finding anew
        if name == "none":
            argv += ["-a", "resnet18", "--no-small-images"]  # the network of the checkpoints compared
        t = time.time()
        try:
            main_curate.main(argv)
        except SystemExit as e:
            print(f"=> {name}: skipped (main_curate.py exited {e.code})")
            continue
        label = "ours, random init" if name == "none" else \
            f"ours, checkpoint {os.path.basename(os.path.dirname(os.path.abspath(name)))}"
        results[label] = score_ours(out, truth, source, args.ratios)
        ran.append(out)
        if args.unplanted_png and name == "none":
            pairs_png(unplanted_pairs(out, source)[:24], args.unplanted_png)
        results[label]["seconds"] = time.time() - t
        print(f"=> {label}: " + ", ".join(f"{k} {fmt(v)}" for k, v in results[label].items()), flush=True)
    peers = {} if args.no_peers else score_peers(files, truth, source)
    if available("cleanlab") and results and "flipped" in list(results.values())[-1]:  # cheap: kept with --no-peers
        # the last run that finished: the checkpoint's probabilities when one is given
        peers["cleanlab find_label_issues, our probabilities"] = {"flipped": cleanlab_row(root, ran[-1], truth)}
    head = ["method", "exact P/R", "near P/R", "re-encoded leak P/R", "byte leak P/R", "noise top-K P/R",
            "noise in top 1 %", "flipped P/R", "near pairs of two unplanted images", "s"]
    rows = [[name, fmt(r.get("exact")), fmt(r.get("near")), fmt(r.get("leak")), fmt(r.get("byte leak")),
             fmt(r.get("noise")), fmt(r.get("noise in top 1 %")), fmt(r.get("flipped")), fmt(r.get("unplanted pairs")),
             fmt(r.get("seconds"))]
            for name, r in {**results, **peers}.items()]
    sweep = format_table(["embedding"] + [f"near / leak P/R @ {t}" for t in args.ratios],
                         [[n] + [f"{fmt(r[f'near@{t}'])}; {fmt(r[f'leak@{t}'])}" for t in args.ratios]
                          for n, r in results.items()])
    text = format_table(head, rows) + "\n\n" + sweep + f"\n\n{len(files)} images; total {time.time() - t0:.0f} s"
    print(text)
    save_record(args, "curate", torch.device("cpu"), {"ours": results, "peers": peers}, text,
                truth={k: len(v) for k, v in truth.items()})


if __name__ == "__main__":
    main()
