#!/usr/bin/env python
"""main_curate.py's label errors and --select on real embeddings: how good is the
out-of-fold probe (the former 5 folds x 2,000 SGD minibatches of 512 against the L-BFGS
logistic regression), how precise are the flagged labels at each out-of-fold accuracy (where
the weak-probe warning belongs), and does --select beat random picks?

    # FM: 10,000 Fashion-MNIST train images as PNGs in FM/train/<class>/, the 10,000 test images in FM/val/
    python main_simclr.py FM_POOL -a resnet18 --no-small-images --recipe small --epochs 8 --seed 0 -j 1 \\
        --output-dir /tmp/fm_simclr      # FM_POOL/train: the same 10,000 train images; 19 min on 2 busy cores
    OMP_NUM_THREADS=1 python bench/curate_labels.py --cache /tmp/feats \\
        --embed fm_none FM none 32 --embed fm_e1 FM /tmp/fm_simclr/checkpoint_0001.pth.tar - \\
        --embed fm_e8 FM /tmp/fm_simclr/checkpoint_last.pth.tar - \\
        --embed ch_none ../shared/data/cahn-hilliard none 64 \\
        --embed ch_e3 ../shared/data/cahn-hilliard runs/real/cahn-hilliard_simclr_s0/checkpoint_last.pth.tar - \\
        --parts select --json bench/results/curate_select_cpu.json
    # the labels part also on epochs 2 and 4 (--embed fm_e2 ..., fm_e4 ...) and both probe budgets:
    #   --parts labels --probe-iters 50 100 --json bench/results/curate_labels_cpu.json

Each --embed NAME DATA CKPT CROP is embedded once by main_curate.py itself (--findings labels
--label-method knn, into CACHE/run_NAME; CKPT none: a random-init resnet18 with the ImageNet stem;
CROP -: the checkpoint's) and cached as CACHE/NAME.pt (centred features, labels, split). DATA is a
labelled folder with train/ and val/.

Labels: on the train split, --flip (5 %) of the labels moved to another class (seeded, --seeds
draws), then out-of-fold probabilities of the probe(s), the leave-one-out kNN vote (k 20) and
their mean, each through Confident Learning (prune by noise rate): the out-of-fold accuracy
against the given (noisy) labels, what main_curate.py reports, the flagged share and precision /
recall of the flips. Selection: N (--select-n) of the train split as a pool with nothing
labelled (or --select-labelled random ones), chosen by each method, labelled with their true
labels; the test accuracy of a logistic regression (common/eval/logreg.py) on the val split,
--select-seeds draws.
"""
import argparse
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_curate  # noqa: E402
from bench.util import format_table, save_record  # noqa: E402
from common.data.images import image_folder  # noqa: E402
from common.eval.logreg import fit_logistic_regression, logistic_regression_accuracy  # noqa: E402
from curate.items import centre  # noqa: E402
from curate.labels import knn_probs, label_issues, oof_accuracy, probe_probs  # noqa: E402
from curate.select import k_center_greedy, typical_candidates, typiclust  # noqa: E402

LABEL_K = main_curate.get_args_parser().get_default("label_k")
OUTLIER_K = main_curate.get_args_parser().get_default("outlier_k")


def embedding(name: str, data: str, ckpt: str, crop: str, cache: str) -> Dict[str, torch.Tensor]:
    """CACHE/NAME.pt, written from a main_curate.py run's embedding shards the first time."""
    path = os.path.join(cache, name + ".pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    out = os.path.join(cache, "run_" + name)
    argv = [data, "--pretrained", ckpt, "-j", "0", "-p", "1000", "--findings", "labels", "--label-method", "knn",
            "--output-dir", out, "--resume"]
    argv += ["-a", "resnet18", "--no-small-images"] if ckpt == "none" else []
    argv += ["--crop-size", crop] if crop != "-" else []
    try:
        main_curate.main(argv)
    except SystemExit as e:
        if e.code:
            raise
    feats, labels, split = [], [], []
    for k, part in enumerate(("train", "val")):
        targets = image_folder(os.path.join(data, part)).targets  # a shard holds features and dataset indices
        for f in sorted(x for x in os.listdir(os.path.join(out, "embeddings")) if x.startswith(part + "_")
                        and x.endswith(".pt")):
            s = torch.load(os.path.join(out, "embeddings", f), weights_only=True)
            feats.append(s["features"])
            labels.append(torch.tensor([targets[i] for i in s["index"].tolist()], dtype=torch.long))
            split.append(torch.full((len(s["index"]),), k))
    record = {"feats": centre(torch.cat(feats).cpu()), "labels": torch.cat(labels), "split": torch.cat(split)}
    os.makedirs(cache, exist_ok=True)
    torch.save(record, path)
    return record


def flip(labels: torch.Tensor, classes: int, rate: float, seed: int) -> torch.Tensor:
    """`labels` with round(rate x N) of them, seeded, moved to a uniformly drawn other class."""
    g = torch.Generator().manual_seed(1000 + seed)
    rows = torch.randperm(len(labels), generator=g)[:round(rate * len(labels))]
    given = labels.clone()
    given[rows] = (labels[rows] + torch.randint(1, classes, (len(rows),), generator=g)) % classes
    return given


def former_probe_probs(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, seed: int,
                       steps: int = 2000, batch_size: int = 512) -> torch.Tensor:
    """curate/labels.py's probe before issue 40, verbatim: AdamW on 2,000 minibatches of 512 per
    fold, whatever the number of images."""
    n, device = len(feats), feats.device
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(n, generator=g) % folds
    out = torch.zeros(n, num_classes)
    y = labels.to(device)
    scale = feats.shape[1] ** 0.5
    for k in range(folds):
        train, held = (fold != k).nonzero().squeeze(1), (fold == k).nonzero().squeeze(1)
        probe = torch.nn.Linear(feats.shape[1], num_classes).to(device)
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(steps):
            rows = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=g)].to(device)
            loss = F.cross_entropy(probe(feats[rows].float() * scale), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out[held] = probe(feats[held].float() * scale).softmax(1)
    return out


def logreg64_probs(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, seed: int,
                   iters: int) -> torch.Tensor:
    """The same out-of-fold folds fitted by common/eval/logreg.py itself (fp64 copies of the rows)."""
    from common.eval.logreg import stratified_folds
    fold = stratified_folds(labels, folds, seed)
    out = torch.zeros(len(feats), num_classes)
    x = feats.double()
    for k in range(folds):
        w, b = fit_logistic_regression(x[fold != k], labels[fold != k], num_classes, max_iter=iters)
        out[fold == k] = (x[fold == k] @ w + b).softmax(1).float()
    return out


def pr(mask: torch.Tensor, truth: torch.Tensor) -> List[float]:
    hit = int((mask & truth).sum())
    return [100.0 * hit / max(int(mask.sum()), 1), 100.0 * hit / max(int(truth.sum()), 1)]


def label_bench(emb: Dict[str, torch.Tensor], args: argparse.Namespace) -> Dict[str, Dict]:
    """Per seed and method: out-of-fold accuracy (given and true labels), flagged %, P/R, seconds."""
    train = emb["split"] == 0
    x, y = emb["feats"][train], emb["labels"][train]
    classes = int(emb["labels"].max()) + 1
    res: Dict[str, Dict] = {}
    for seed in range(args.seeds):
        given = flip(y, classes, args.flip, seed)
        truth = given != y
        probs, secs = {}, {}
        t = time.time()
        probs["knn"] = knn_probs(x, given, x, classes, LABEL_K, leave_out_self=True)
        secs["knn"] = time.time() - t
        for iters in args.probe_iters:
            t = time.time()
            probs[f"lbfgs{iters}"] = probe_probs(x, given, classes, 5, seed, iters).probs
            secs[f"lbfgs{iters}"] = time.time() - t
        if seed < args.former_seeds:
            t = time.time()
            probs["former"] = former_probe_probs(x, given, classes, 5, seed)
            secs["former"] = time.time() - t
        if seed < args.logreg64_seeds:
            t = time.time()
            probs["logreg64"] = logreg64_probs(x, given, classes, 5, seed, args.probe_iters[0])
            secs["logreg64"] = time.time() - t
        for name in [n for n in probs if n != "knn"]:
            probs[f"{name}+knn"] = (probs[name] + probs["knn"]) / 2
        for name, p in probs.items():
            flagged = label_issues(p, given, "prune")[0]
            r = res.setdefault(name, {"acc_given": [], "acc_true": [], "flagged_pct": [], "P": [], "R": [],
                                      "seconds": []})
            r["acc_given"].append(oof_accuracy(p, given))
            r["acc_true"].append(oof_accuracy(p, y))
            r["flagged_pct"].append(100.0 * float(flagged.float().mean()))
            precision, recall = pr(flagged, truth)
            r["P"].append(precision)
            r["R"].append(recall)
            r["seconds"].append(secs.get(name, secs.get(name.split("+")[0], 0.0) + secs["knn"]))
        print(f"   seed {seed}: " + ", ".join(f"{n} acc {res[n]['acc_given'][-1]:.1f} P/R {res[n]['P'][-1]:.0f}/"
                                            f"{res[n]['R'][-1]:.0f}" for n in probs), flush=True)
    return res


def select_bench(emb: Dict[str, torch.Tensor], args: argparse.Namespace) -> Dict[str, Dict]:
    """Test accuracy of a logistic regression on the N picks of each method (and the
    --select-labelled random images they start from), per N and seed."""
    feats, labels = emb["feats"], emb["labels"]
    train, test = (emb["split"] == 0).nonzero().squeeze(1), (emb["split"] == 1).nonzero().squeeze(1)
    classes = int(labels.max()) + 1
    start = args.select_labelled
    methods = {
        "random": lambda n, s, lab, pool: pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(s))[:n]],
        "typical k-center": lambda n, s, lab, pool: torch.tensor(k_center_greedy(
            feats, typical_candidates(feats, pool, 0.5, n, OUTLIER_K), lab, n, s)[0]),
        "k-center": lambda n, s, lab, pool: torch.tensor(k_center_greedy(feats, pool, lab, n, s)[0]),
        # TypiClust itself: min(labelled + N, 500) clusters, a cluster's later picks its next most typical images
        "typiclust": lambda n, s, lab, pool: torch.tensor(typiclust(feats, pool, lab, n, s, repeats="typical")[0]),
        "typiclust N clusters": lambda n, s, lab, pool: torch.tensor(typiclust(
            feats, pool, lab, n, s, clusters=start + n, repeats="typical")[0]),
        # main_curate.py's: a cluster's later picks (or its first beside labelled images) at random
        "typiclust random repeats": lambda n, s, lab, pool: torch.tensor(typiclust(feats, pool, lab, n, s)[0]),
    }
    res: Dict[str, Dict] = {}
    for n in args.select_n:
        for seed in range(args.select_seeds):
            order = (torch.randperm(len(train), generator=torch.Generator().manual_seed(500 + seed)) if start
                     else torch.arange(len(train)))
            lab, pool = train[order[:start]], train[order[start:]]
            for name in args.select_methods:
                if ((name == "typiclust N clusters" and start + n <= 500)
                        or (name == "typiclust random repeats" and not start and n <= 500)):
                    continue  # the same picks as typiclust's: one per cluster, none labelled
                t = time.time()
                rows = methods[name](n, seed, lab, pool)
                took = time.time() - t
                assert len(set(rows.tolist())) == n and bool(torch.isin(rows, pool).all())
                rows = torch.cat([lab, rows])
                acc = logistic_regression_accuracy(feats[rows].float(), labels[rows], feats[test].float(),
                                                   labels[test], classes)
                r = res.setdefault(f"{name}@{n}", {"acc": [], "seconds": [], "classes_covered": []})
                r["acc"].append(acc)
                r["seconds"].append(took)
                r["classes_covered"].append(len(set(labels[rows].tolist())))
            print(f"   N {n} seed {seed}: " + ", ".join(f"{m} {res[f'{m}@{n}']['acc'][-1]:.1f}"
                                                      for m in args.select_methods if f"{m}@{n}" in res), flush=True)
    return res


def ms(xs: List[float], digits: int = 1) -> str:
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs):.{digits}f}" if len(xs) > 1 else f"{xs[0]:.{digits}f}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--embed", nargs=4, action="append", required=True, metavar=("NAME", "DATA", "CKPT", "CROP"),
                   help="an embedding: NAME, a labelled folder (train/, val/), a checkpoint or none, a crop or -")
    p.add_argument("--cache", default="/tmp/curate_labels", help="where the embeddings are cached (NAME.pt)")
    p.add_argument("--parts", nargs="+", default=["labels", "select"], choices=("labels", "select"))
    p.add_argument("--flip", default=0.05, type=float, help="share of the train labels moved to another class")
    p.add_argument("--seeds", default=3, type=int, help="draws of the flipped labels (and of the probe's folds)")
    p.add_argument("--probe-iters", default=[100], type=int, nargs="+", help="L-BFGS iterations per fold scored")
    p.add_argument("--former-seeds", default=3, type=int, help="draws scored with the former SGD probe (slow)")
    p.add_argument("--logreg64-seeds", default=1, type=int,
                   help="draws scored with common/eval/logreg.py's fp64 fit itself (the first --probe-iters)")
    p.add_argument("--select-n", default=[50, 200, 1000], type=int, nargs="+")
    p.add_argument("--select-seeds", default=3, type=int)
    p.add_argument("--select-labelled", default=0, type=int, metavar="L",
                   help="start from L random train images already labelled (seeded per draw), as main_curate.py "
                        "does with DATA's labels; the probe trains on them and the picks")
    p.add_argument("--select-methods", nargs="+", default=["random", "typical k-center", "k-center", "typiclust",
                                                           "typiclust N clusters", "typiclust random repeats"],
                   help="typiclust: TypiClust's own (min(N, 500) clusters, repeats the next most typical); N "
                        "clusters: one cluster per pick; random repeats: a cluster's later picks drawn at random "
                        "(differ from typiclust at N > 500)")
    p.add_argument("--json", default="bench/results/curate_labels.json")
    return p


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    t0 = time.time()
    results: Dict[str, Dict] = {}
    for name, data, ckpt, crop in args.embed:
        emb = embedding(name, data, ckpt, crop, args.cache)
        print(f"=> {name}: {int((emb['split'] == 0).sum())} train, {int((emb['split'] == 1).sum())} val images, "
              f"D = {emb['feats'].shape[1]}", flush=True)
        results[name] = {}
        if "labels" in args.parts:
            results[name]["labels"] = label_bench(emb, args)
        if "select" in args.parts:
            results[name]["select"] = select_bench(emb, args)
    tables = []
    if "labels" in args.parts:
        rows = [[e, m, ms(r["acc_given"]), ms(r["acc_true"]), ms(r["flagged_pct"]), ms(r["P"], 0), ms(r["R"], 0),
                 f"{np.mean(r['seconds']):.1f}"]
                for e, res in results.items() for m, r in res["labels"].items()]
        tables.append(format_table(["embedding", "probabilities", "OOF acc % (given labels)", "OOF acc % (true)",
                                    "flagged %", "precision %", "recall %", "seconds"], rows))
    if "select" in args.parts:
        ways = [m for m in args.select_methods]
        rows = [[e] + [ms(res["select"][f"{m}@{n}"]["acc"]) if f"{m}@{n}" in res["select"] else "—"
                       for n in args.select_n for m in ways] for e, res in results.items()]
        tables.append(format_table(["embedding"] + [f"{m} N={n}" for n in args.select_n for m in ways], rows))
    text = "\n\n".join(tables + [f"total {time.time() - t0:.0f} s"])
    print(text)
    save_record(args, "curate_labels", torch.device("cpu"), results, text)


if __name__ == "__main__":
    main()
