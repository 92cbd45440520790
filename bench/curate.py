"""main_curate.py against ground truth: Fashion-MNIST written as PNG files with planted
problems (exact copies, near-duplicates, train/test copies, flipped labels, foreign
images), precision/recall of every finding for our embeddings (random init, checkpoints
given with --pretrained, ImageNet when cached) and for the peers installed as extras
(imagededup PHash, cleanvision, cleanlab on our out-of-fold probabilities); and probe
accuracy after labelling N images chosen by --select's k-center greedy vs N random ones.

    OMP_NUM_THREADS=1 python bench/curate.py --pretrained none runs/fmnist_moco/checkpoint_last.pth.tar

--write-only writes the planted folder (e.g. to pretrain on it) and stops.
"""
import argparse
import io
import os
import shutil
import sys
import time
from typing import Dict, List, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_curate  # noqa: E402
from bench.util import format_table, save_record  # noqa: E402
from common.data.images import image_folder  # noqa: E402
from common.extras import available  # noqa: E402
from curate.duplicates import file_hash, find_duplicates  # noqa: E402
from curate.items import centre  # noqa: E402
from curate.labels import knn_probs, label_issues, probe_probs  # noqa: E402
from curate.outliers import outlier_scores  # noqa: E402
from curate.search import self_neighbours  # noqa: E402
from curate.select import k_center_greedy, typical_candidates  # noqa: E402

Truth = Dict[str, Set]


def near_copy(img: Image.Image, rng: np.random.Generator) -> bytes:
    """A re-encoded JPEG (q 40-70) of `img` after one or two of: resize 0.8-1.2x, a shift
    of 1-3 px, brightness +-10 %."""
    ops = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
    if 0 in ops:
        s = rng.uniform(0.8, 1.2)
        img = img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BILINEAR)
    if 1 in ops:
        dx, dy = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 4, size=2))
        img = Image.fromarray(np.roll(np.asarray(img), (dy, dx), axis=(0, 1)))
    if 2 in ops:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(40, 71)))
    return buf.getvalue()


def foreign(rng: np.random.Generator, k: int) -> Image.Image:
    """Not a garment: uniform noise, or a digit drawn large (MNIST-like)."""
    if k % 2 == 0:
        return Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    img = Image.new("L", (28, 28), 0)
    d = ImageDraw.Draw(img)
    d.text((8, 4), str(int(rng.integers(10))), fill=255, font_size=20)
    return img


def write_planted(src: str, root: str, n: int, n_test: int, seed: int) -> Tuple[str, Truth, Dict[str, str]]:
    """DATA/train/<class>/ and DATA/val/<class>/ PNGs with the planted problems; returns
    (DATA, ground truth by finding, true class name of every train original by path)."""
    import torchvision
    rng = np.random.default_rng(seed)
    train = torchvision.datasets.FashionMNIST(src, train=True, download=False)
    test = torchvision.datasets.FashionMNIST(src, train=False, download=False)
    classes = [c.replace("/", "-") for c in train.classes]
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
    tr = rng.choice(len(train), n, replace=False)
    flipped = set(rng.choice(n, int(0.05 * n), replace=False).tolist())
    truth: Truth = {"exact": set(), "near": set(), "leak": set(), "flipped": set(), "foreign": set()}
    true_label, paths = {}, []
    for k, i in enumerate(tr):
        img, y = train[int(i)]
        given = int((y + rng.integers(1, 10)) % 10) if k in flipped else y
        p = os.path.join(root, "train", classes[given], f"{k:05d}.png")
        img.save(p)
        paths.append((p, img, given))
        true_label[p] = classes[y]
        if k in flipped:
            truth["flipped"].add(p)
    for k, i in enumerate(rng.choice(len(test), n_test, replace=False)):
        img, y = test[int(i)]
        img.save(os.path.join(root, "val", classes[y], f"t{k:05d}.png"))
    vals = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, "val")) for f in fs)
    for k, j in enumerate(rng.choice(n, int(0.02 * n), replace=False)):
        p, _, given = paths[j]
        q = os.path.join(os.path.dirname(p), f"copy{k:04d}.png")
        shutil.copyfile(p, q)
        truth["exact"].add(frozenset((p, q)))
    for k, j in enumerate(rng.choice(n, int(0.03 * n), replace=False)):
        p, img, given = paths[j]
        q = os.path.join(os.path.dirname(p), f"near{k:04d}.jpg")
        with open(q, "wb") as f:
            f.write(near_copy(img, rng))
        truth["near"].add(frozenset((p, q)))
    for k, j in enumerate(rng.choice(len(vals), int(0.01 * n), replace=False)):
        v = vals[j]
        q = os.path.join(root, "train", os.path.basename(os.path.dirname(v)), f"leak{k:04d}.png")
        shutil.copyfile(v, q)
        truth["leak"].add(frozenset((v, q)))
    for k in range(max(1, int(0.005 * n))):
        q = os.path.join(root, "train", classes[int(rng.integers(10))], f"foreign{k:04d}.png")
        foreign(rng, k).save(q)
        truth["foreign"].add(q)
    return root, truth, true_label


def pr(found: Set, truth: Set) -> Tuple[float, float]:
    hit = len(found & truth)
    return (100.0 * hit / len(found) if found else float("nan"), 100.0 * hit / len(truth) if truth else float("nan"))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pretrained", nargs="+", default=["none"], metavar="CKPT|none|imagenet",
                   help="embeddings to compare (imagenet is skipped with a note when not cached)")
    p.add_argument("--src", default=os.path.join(os.path.dirname(main_curate.__file__), "..", "shared", "data",
                                                 "fashion-mnist"), help="the Fashion-MNIST folder torchvision reads")
    p.add_argument("--root", default="/tmp/curate_bench", help="where the planted PNG folder and the runs go")
    p.add_argument("--n", default=3000, type=int, help="Fashion-MNIST train images (before the planted ones)")
    p.add_argument("--n-test", default=1000, type=int, help="test images (the val split)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--select-n", default=[20, 100, 500], type=int, nargs="+")
    p.add_argument("--select-seeds", default=3, type=int)
    p.add_argument("--probe-steps", default=2000, type=int)
    p.add_argument("--ratios", default=[0.15, 0.2, 0.25, 0.3, 0.4], type=float, nargs="+",
                   help="--dup-ratio values scored (the run lists pairs up to the largest)")
    p.add_argument("--thresholds", default=[0.9, 0.95, 0.98], type=float, nargs="+",
                   help="near-duplicate cosines of --dup-rule cosine scored on the same features (the former rule)")
    p.add_argument("--write-only", action="store_true", help="write the planted folder and stop")
    p.add_argument("--json", default="bench/results/curate.json")
    return p


def read_rows(path: str) -> List[Dict[str, str]]:
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def features(out: str) -> Tuple[torch.Tensor, List[str]]:
    """The run's centred features and the path of each row, as main_curate.py had them."""
    feats, paths = [], []
    for split in ("train", "val"):
        base = image_folder(os.path.join(os.path.dirname(out), "data", split))
        shards = sorted(f for f in os.listdir(os.path.join(out, "embeddings")) if f.startswith(split + "_")
                        and f.endswith(".pt"))
        for name in shards:
            s = torch.load(os.path.join(out, "embeddings", name), weights_only=True)
            feats.append(s["features"])
            paths += [base.path(int(i)) for i in s["index"]]
    return centre(torch.cat(feats)), paths


def score_ours(out: str, truth: Truth, ratios: List[float], train_paths: Set[str]) -> Dict[str, Tuple]:
    pairs = read_rows(os.path.join(out, "duplicates.csv"))
    res = {}
    res["exact"] = pr({frozenset((r["path_a"], r["path_b"])) for r in pairs if r["kind"] == "exact"
                       and r["cross_split"] == "0"}, truth["exact"])
    # the planted leaks are byte copies: scored, like the peers', on the exact cross-split pairs
    res["leak"] = pr({frozenset((r["path_a"], r["path_b"])) for r in pairs if r["cross_split"] == "1"
                      and r["kind"] == "exact"}, truth["leak"])
    for t in ratios:
        res[f"near@{t}"] = pr({frozenset((r["path_a"], r["path_b"])) for r in pairs if r["kind"] == "near"
                               and r["cross_split"] == "0" and float(r["relative"]) <= t}, truth["near"])
    ranked = [r["path"] for r in read_rows(os.path.join(out, "outliers.csv"))]
    res["foreign"] = pr(set(ranked[:len(truth["foreign"])]), truth["foreign"])
    res["flipped"] = pr({r["path"] for r in read_rows(os.path.join(out, "label_errors.csv"))} & train_paths,
                        truth["flipped"])
    return res


def score_former_rules(feats: torch.Tensor, paths: List[str], truth: Truth, thresholds: List[float]
                       ) -> Dict[str, Tuple]:
    """The rules main_curate.py had before, on the same features: near-duplicates at an
    absolute cosine and outliers by the plain 10th-neighbour distance (the former label
    rule, "confident" on the probe's probabilities, is scored in main with the others)."""
    splits = ["val" if "/val/" in p else "train" for p in paths]
    hashes = [file_hash(p) for p in paths]
    sim, idx = self_neighbours(feats, 10)
    res = {}
    for t in thresholds:
        res[f"near cosine@{t}"] = pr({frozenset((paths[p.a], paths[p.b])) for p in find_duplicates(
            sim, idx, hashes, splits, t) if not p.exact and not p.cross_split}, truth["near"])
    ranked = torch.argsort(outlier_scores(feats, 10, neighbours=(sim, idx), score="kth"), descending=True)
    res["foreign kth@10"] = pr({paths[i] for i in ranked[:len(truth["foreign"])].tolist()}, truth["foreign"])
    return res


def pairs_of_sets(sets) -> Set[frozenset]:
    return {frozenset((a, b)) for s in sets for a in s for b in s if a < b}


def score_peers(root: str, truth: Truth, files: List[str]) -> Dict[str, Dict[str, Tuple]]:
    """imagededup PHash and cleanvision on the same files (skipped, with a note, when absent)."""
    peers: Dict[str, Dict[str, Tuple]] = {}
    is_leak = lambda p: ("/val/" in min(p)) != ("/val/" in max(p))  # noqa: E731
    if available("imagededup"):
        from imagededup.methods import PHash
        ph = PHash(verbose=False)
        enc = {f: ph.encode_image(image_file=f) for f in files}
        for dist in (0, 10):
            found = ph.find_duplicates(encoding_map=enc, max_distance_threshold=dist)
            pairs = {frozenset((a, b)) for a, bs in found.items() for b in bs}
            key = "exact" if dist == 0 else "near"
            within = {p for p in pairs if not is_leak(p)}
            peers.setdefault("imagededup PHash", {})[key] = pr(within, truth[key] if dist == 0 else truth["near"])
            if dist == 0:
                peers["imagededup PHash"]["leak"] = pr({p for p in pairs if is_leak(p)}, truth["leak"])
    else:
        print("=> imagededup not installed: its rows are skipped (pip install imagededup)")
    if available("cleanvision"):
        from cleanvision import Imagelab
        lab = Imagelab(filepaths=files)
        lab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
        ex = pairs_of_sets(lab.info["exact_duplicates"]["sets"])
        near = pairs_of_sets(lab.info["near_duplicates"]["sets"]) - ex
        peers["cleanvision"] = {"exact": pr({p for p in ex if not is_leak(p)}, truth["exact"]),
                                "leak": pr({p for p in ex if is_leak(p)}, truth["leak"]),
                                "near": pr({p for p in near if not is_leak(p)}, truth["near"])}
    else:
        print("=> cleanvision not installed: its rows are skipped (pip install cleanvision)")
    return peers


def probe_accuracy(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
                   steps: int = 300) -> float:
    scale = xtr.shape[1] ** 0.5  # as curate.labels.probe_probs scales its inputs
    xtr, xte = xtr * scale, xte * scale
    probe = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(probe(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float((probe(xte).argmax(1) == yte).float().mean())


def selection(feats: torch.Tensor, paths: List[str], true_label: Dict[str, str], args) -> Dict[str, List[float]]:
    """Probe accuracy on the val split after labelling N pool images: k-center vs random."""
    classes = sorted(os.listdir(os.path.join(args.root, "data", "val")))
    pool = torch.tensor([i for i, p in enumerate(paths) if p in true_label])
    ypool = torch.tensor([classes.index(true_label[paths[i]]) for i in pool.tolist()])
    val = torch.tensor([i for i, p in enumerate(paths) if "/val/" in p])
    yval = torch.tensor([classes.index(os.path.basename(os.path.dirname(paths[i]))) for i in val.tolist()])
    x = feats.float()
    outlier_k = main_curate.get_args_parser().get_default("outlier_k")  # the neighbourhood --select-typical uses
    out = {}
    for n in args.select_n:
        for seed in range(args.select_seeds):
            pos = {int(r): k for k, r in enumerate(pool.tolist())}
            chosen = {}
            for name, fraction in (("k-center", 1.0), ("k-center typical", main_curate.get_args_parser()
                                                       .get_default("select_typical"))):
                picks, _ = k_center_greedy(feats, typical_candidates(feats, pool, fraction, n, outlier_k), torch.zeros(
                    0, dtype=torch.long), n, seed)
                chosen[name] = torch.tensor([pos[r] for r in picks])
            chosen["random"] = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
            for name, rows in chosen.items():
                torch.manual_seed(seed)
                out.setdefault(f"{name}@{n}", []).append(
                    probe_accuracy(x[pool[rows]], ypool[rows], x[val], yval))
    return out


def fmt(v: Tuple[float, float]) -> str:
    return "—" if v is None else f"{v[0]:.0f} / {v[1]:.0f}"


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    t0 = time.time()
    root, truth, true_label = write_planted(args.src, os.path.join(args.root, "data"), args.n, args.n_test, args.seed)
    print(f"=> planted in {root}: " + ", ".join(f"{len(v)} {k}" for k, v in truth.items()), flush=True)
    if args.write_only:
        return
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
    train_paths = {f for f in files if "/train/" in f}
    results: Dict[str, Dict] = {}
    probs_for_cleanlab = None
    for name in args.pretrained:
        out = os.path.join(args.root, "run_" + (os.path.basename(os.path.dirname(name)) or name))
        argv = [root, "--pretrained", name, "--crop-size", "32", "-j", "0", "--output-dir", out, "-p", "1000",
                "--dup-ratio", str(max(args.ratios)), "--probe-steps", str(args.probe_steps),
                "--resume"]  # a rerun reuses the embeddings, rewriting the findings
        if name in ("none", "imagenet"):
            argv += ["-a", "resnet18", "--no-small-images"]  # the network of the checkpoints compared
        t = time.time()
        try:
            main_curate.main(argv)
        except SystemExit as e:
            print(f"=> {name}: skipped (main_curate.py exited {e.code})")
            continue
        label = {"none": "ours, random init", "imagenet": "ours, ImageNet resnet18"}.get(
            name, f"ours, checkpoint {os.path.basename(os.path.dirname(os.path.abspath(name)))}")
        results[label] = score_ours(out, truth, args.ratios, train_paths)
        results[label]["seconds"] = time.time() - t
        feats, paths = features(out)
        results[label].update(score_former_rules(feats, paths, truth, args.thresholds))
        results[label]["select"] = selection(feats, paths, true_label, args)
        # the probabilities main_curate.py's defaults used (same seed, same rows: train then val)
        classes = sorted(os.listdir(os.path.join(root, "val")))
        y = torch.tensor([classes.index(os.path.basename(os.path.dirname(p))) for p in paths])
        probe = probe_probs(feats, y, 10, 5, 0, args.probe_steps)
        knn = knn_probs(feats, y, feats, 10, main_curate.get_args_parser().get_default("label_k"), leave_out_self=True)
        probs = {"probe": probe, "knn": knn, "both": (probe + knn) / 2}
        flagged = lambda mask: pr({p for p, m in zip(paths, mask.tolist()) if m and p in train_paths},  # noqa: E731
                                  truth["flipped"])
        for how, pp in probs.items():
            for rule in ("prune", "confident"):
                results[label][f"flipped {how} {rule}"] = flagged(label_issues(pp, y, rule)[0])
        if name not in ("none", "imagenet") or probs_for_cleanlab is None:
            probs_for_cleanlab = (label, paths, y, probs)
    peers = score_peers(root, truth, files)
    if available("cleanlab") and probs_for_cleanlab is not None:
        from cleanlab.filter import find_label_issues
        label, paths, y, probs = probs_for_cleanlab
        for how in ("probe", main_curate.get_args_parser().get_default("label_method")):
            mask = find_label_issues(y.numpy(), probs[how].numpy())
            peers[f"cleanlab find_label_issues ({label}, {how} probs)"] = {
                "flipped": pr({p for p, m in zip(paths, mask) if m and p in train_paths}, truth["flipped"])}
    rows = []
    t_default = main_curate.DUP_RATIO
    for name, r in {**results, **peers}.items():
        near = r.get(f"near@{t_default}", r.get("near"))
        rows.append([name, fmt(r.get("exact")), fmt(near), fmt(r.get("leak")), fmt(r.get("foreign")),
                     fmt(r.get("flipped"))])
    table = format_table(["method", "exact dup P/R", "near dup P/R", "train/val leak P/R", "foreign (top-K) P/R",
                          "flipped labels P/R"], rows)
    sweep = format_table(["embedding"] + [f"near P/R @ ratio {t}" for t in args.ratios]
                         + [f"@ cos {t}" for t in args.thresholds],
                         [[n] + [fmt(r[f"near@{t}"]) for t in args.ratios]
                          + [fmt(r[f"near cosine@{t}"]) for t in args.thresholds] for n, r in results.items()])
    rules = [f"flipped {how} {rule}" for how in ("probe", "knn", "both") for rule in ("prune", "confident")]
    former = format_table(["embedding", "foreign kth@10 (former)"] + rules,
                          [[n, fmt(r["foreign kth@10"])] + [fmt(r[k]) for k in rules] for n, r in results.items()])
    ways = ("k-center typical", "k-center", "random")
    sel = format_table(["embedding"] + [f"{m} N={n}" for n in args.select_n for m in ways],
                       [[n] + [f"{np.mean(r['select'][f'{m}@{k}']):.1f} ± {np.std(r['select'][f'{m}@{k}']):.1f}"
                               for k in args.select_n for m in ways] for n, r in results.items()])
    text = "\n\n".join([table, sweep, former, sel, f"total {time.time() - t0:.0f} s"])
    print(text)
    save_record(args, "curate", torch.device("cpu"), {"ours": results, "peers": peers}, text,
                truth={k: len(v) for k, v in truth.items()})


if __name__ == "__main__":
    main()
