#!/usr/bin/env python
"""Hierarchical classification on Fashion-MNIST: one frozen backbone with a head
per level (main_lincls.py --hierarchy-depth 2) against a network trained from scratch for
each level, at 100 % and 10 % of the labels, with and without oversampling. Precision,
recall, F1 (macro) and accuracy per level on the test images, as the industrial comparison
reports them, plus whole-path accuracy and the consistency rate (predicted type under the
predicted family).

    python bench/hierarchy.py ../shared/data/fashion-mnist \\
        --pretrained runs/bench_quality_inpaint/simclr/checkpoint_last.pth.tar --method simclr

The natural grouping: tops (T-shirt, pullover, coat, shirt), footwear (sandal, sneaker, ankle
boot), other (trouser, dress, bag). The training images are drawn imbalanced like a product
catalogue: class sizes fall geometrically from --max-per-class to 1/--imbalance of it, the
order of the classes drawn with --seed; the test images are class-balanced. They are written
as PNG files in nested folders with a csv (`path,family,type`) for the hierarchy, and one flat
csv per level for the per-level networks (same files, same order, so --label-subset hands
every method the same labelled images). Every training run is the product's own
main_lincls.py, called through its main(argv). Writes OUTPUT_DIR/hierarchy.json (or --json).
"""
import argparse
import csv
import json
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.datasets as tvd  # noqa: E402
from PIL import Image  # noqa: E402

from bench.quality import probe_batch, run_script  # noqa: E402
from bench.util import format_table, save_record  # noqa: E402
from common.augment import transforms as augment  # noqa: E402
from common.data.images import csv_manifest  # noqa: E402
from common.data.transformed import TransformedDataset  # noqa: E402
from common.errors import UserError, report_user_errors  # noqa: E402
from common.eval.features import extract_features  # noqa: E402
from common.eval.label_tree import LabelTree, consistency_rate, path_accuracy  # noqa: E402
from common.nets.models import build_backbone  # noqa: E402

# Fashion-MNIST's label order, as folder-safe names, and the two-level grouping
TYPES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FAMILY = {"tshirt": "tops", "pullover": "tops", "coat": "tops", "shirt": "tops", "sandal": "footwear",
          "sneaker": "footwear", "ankle_boot": "footwear", "trouser": "other", "dress": "other", "bag": "other"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fashion-MNIST two-level benchmark: heads per level on one frozen backbone "
                                            "vs a supervised network per level")
    p.add_argument("data", metavar="DIR", help="folder holding FashionMNIST/raw/ (e.g. ../shared/data/fashion-mnist)")
    p.add_argument("--pretrained", required=True, help="a MoCo v2 / SimCLR checkpoint (resnet18, ImageNet stem, 32 px)")
    p.add_argument("--method", default="simclr", help="name of the --pretrained backbone in the table")
    p.add_argument("--max-per-class", default=500, type=int, help="training images of the largest class")
    p.add_argument("--imbalance", default=20.0, type=float, help="largest / smallest class size in training")
    p.add_argument("--test-per-class", default=200, type=int)
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1])
    p.add_argument("--probe-epochs", default=10, type=int, help="epochs of the heads on the frozen backbones")
    p.add_argument("--probe-lr", default=0.1, type=float, help="heads' SGD lr (with --head-bn: standardised features)")
    p.add_argument("--sup-epochs", default=10, type=int, help="epochs of each supervised-from-scratch network")
    p.add_argument("-b", "--batch-size", default=64, type=int)
    p.add_argument("-j", "--workers", default=0, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--output-dir", default="runs/bench_hierarchy")
    p.add_argument("--json", default=None, help="result file (default: OUTPUT_DIR/hierarchy.json)")
    return p


def write_data(args: argparse.Namespace, out: str) -> Dict[str, int]:
    """PNGs in out/images/{train,val}/<family>/<type>/, out/tree/{train,val}.csv
    (`path,family,type`) and out/{family,type}/{train,val}.csv (`path,label`), all listing
    the same files in the same order with absolute paths. Returns the training class sizes."""
    try:
        train, test = tvd.FashionMNIST(args.data, train=True), tvd.FashionMNIST(args.data, train=False)
    except RuntimeError as e:
        raise UserError(f"Fashion-MNIST was not found under {args.data!r} ({e}); pass the folder that holds "
                        f"FashionMNIST/raw/ (e.g. ../shared/data/fashion-mnist)")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(TYPES))  # which type gets the most images
    sizes = {TYPES[c]: int(round(args.max_per_class * args.imbalance ** (-rank / (len(TYPES) - 1))))
             for rank, c in enumerate(order)}
    for split, ds in (("train", train), ("val", test)):
        rows = []
        labels = ds.targets.numpy()
        for c, name in enumerate(TYPES):
            n = sizes[name] if split == "train" else args.test_per_class
            folder = os.path.join(out, "images", split, FAMILY[name], name)
            os.makedirs(folder, exist_ok=True)
            for i in sorted(rng.choice(np.flatnonzero(labels == c), n, replace=False).tolist()):
                path = os.path.abspath(os.path.join(folder, f"{i}.png"))
                Image.fromarray(ds.data[i].numpy()).save(path)
                rows.append((path, FAMILY[name], name))
        for layout, header, cells in (("tree", ("path", "family", "type"), lambda r: r),
                                      ("family", ("path", "label"), lambda r: r[:2]),
                                      ("type", ("path", "label"), lambda r: (r[0], r[2]))):
            os.makedirs(os.path.join(out, layout), exist_ok=True)
            with open(os.path.join(out, layout, f"{split}.csv"), "w", newline="") as f:
                csv.writer(f).writerows([header] + [cells(r) for r in rows])
    return sizes


def flags(args: argparse.Namespace, data: str, out: str, n_labelled: int) -> List[str]:
    return [data, "--dataset", "csv", "-a", "resnet18", "--no-small-images", "--crop-size", "32",
            "-j", str(args.workers), "--seed", str(args.seed), "-b", str(probe_batch(n_labelled, args.batch_size)),
            "--cos", "--output-dir", out, "--overwrite", "-p", "1000"] + ([] if torch.cuda.is_available() else ["--cpu"])


def level_rows(final: Dict) -> List[Dict[str, float]]:
    """Macro P / R / F1 and top-1 of each level from a results.json's final report."""
    levels = final["levels"] if "levels" in final else [final]
    return [{"precision": r["macro_precision"], "recall": r["macro_recall"], "f1": r["macro_f1"],
             "accuracy": r["acc1"]} for r in levels]


@torch.no_grad()
def predictions(ckpt_path: str, val_csv: str, device: torch.device) -> torch.Tensor:
    """Test-set predictions of a supervised main_lincls.py network (its checkpoint)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    classes = ckpt["classes"]
    model = build_backbone("resnet18", num_classes=len(classes), small_images=False)
    model.load_state_dict({k[len("module."):]: v for k, v in ckpt["state_dict"].items()})
    dataset = TransformedDataset(csv_manifest(val_csv, classes), augment.eval_transform(32))
    logits, _ = extract_features(model.to(device), dataset, 256, device, normalize=False)
    return logits.argmax(dim=1).cpu()


@report_user_errors
def main(argv=None) -> Dict:
    args = get_args_parser().parse_args(argv)
    args.json = args.json or os.path.join(args.output_dir, "hierarchy.json")
    import main_lincls

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()
    data = os.path.join(args.output_dir, "data")
    sizes = write_data(args, data)
    n_train = sum(sizes.values())
    print(f"=> Fashion-MNIST, 2 levels: {n_train} training images (largest class {max(sizes.values())}, smallest "
          f"{min(sizes.values())}), {10 * args.test_per_class} test images", flush=True)
    runs: Dict[str, Dict] = {}
    seconds: Dict[str, float] = {}
    subsets: Dict[float, str] = {}

    # one frozen backbone, a head per level (trained together, the backbone run once per batch)
    for name, ckpt in ((args.method, args.pretrained), ("random_init", "none")):
        for f in args.fractions:
            for oversample in (False, True):
                key = f"{name}|{f:g}|{'on' if oversample else 'off'}"
                out = os.path.join(args.output_dir, f"heads_{name}_{f:g}_{'over' if oversample else 'plain'}")
                n = n_train if f >= 1 else round(n_train * f)
                argv = flags(args, os.path.join(data, "tree"), out, n) + [
                    "--hierarchy-depth", "2", "--pretrained", ckpt, "--head-bn", "--lr", str(args.probe_lr),
                    "--epochs", str(args.probe_epochs), "--label-fraction", str(f)] + (
                    ["--balanced-sampling"] if oversample else [])
                print(f"=> {key}: heads per level ...", flush=True)
                seconds[key] = run_script(main_lincls, argv, os.path.join(out, "log.txt"))
                # the same heads decoded top-down: each type restricted to the predicted family
                run_script(main_lincls, flags(args, os.path.join(data, "tree"), out + "_consistent", n) + [
                    "--hierarchy-depth", "2", "--evaluate", "--consistent", "--resume",
                    os.path.join(out, "checkpoint_last.pth.tar")], os.path.join(out + "_consistent", "log.txt"))
                final = json.load(open(os.path.join(out, "results.json")))["final"]
                consistent = json.load(open(os.path.join(out + "_consistent", "evaluation.json")))
                runs[key] = {"method": name, "fraction": f, "oversampling": oversample, "levels": level_rows(final),
                             "path_acc1": final["path_acc1"], "consistency_rate": final["consistency_rate"],
                             "consistent_path_acc1": consistent["path_acc1"],
                             "consistent_levels": level_rows(consistent)}
                if f < 1:
                    subsets[f] = os.path.join(out, "label_subset.json")

    # the known approach: a network per level, trained from scratch on the same labelled images
    tree = LabelTree([(FAMILY[t], t) for t in TYPES], ["family", "type"])
    for f in args.fractions:
        for oversample in (False, True):
            key = f"supervised per level|{f:g}|{'on' if oversample else 'off'}"
            preds, levels = {}, []
            for level in ("family", "type"):
                out = os.path.join(args.output_dir, f"supervised_{level}_{f:g}_{'over' if oversample else 'plain'}")
                n = n_train if f >= 1 else round(n_train * f)
                argv = flags(args, os.path.join(data, level), out, n) + [
                    "--pretrained", "none", "--finetune", "--backbone-lr-scale", "1", "--lr", "0.1", "--wd", "5e-4",
                    "--epochs", str(args.sup_epochs)] + (["--label-subset", subsets[f]] if f < 1 else []) + (
                    ["--balanced-sampling"] if oversample else [])
                print(f"=> {key}: {level} network ...", flush=True)
                seconds[f"{key}|{level}"] = run_script(main_lincls, argv, os.path.join(out, "log.txt"))
                levels += level_rows(json.load(open(os.path.join(out, "results.json")))["final"])
                classes = torch.load(os.path.join(out, "checkpoint_last.pth.tar"), map_location="cpu",
                                     weights_only=True)["classes"]
                # class index of the flat network -> the tree's index at that level
                to_tree = torch.tensor([tree.classes[0 if level == "family" else 1].index(
                    c if level == "family" else f"{FAMILY[c]}/{c}") for c in classes])
                preds[level] = to_tree[predictions(os.path.join(out, "checkpoint_last.pth.tar"),
                                                   os.path.join(data, level, "val.csv"), device)]
            truth_type = torch.tensor([tree.leaves.index(f"{FAMILY[t]}/{t}") for t in TYPES
                                       for _ in range(args.test_per_class)])
            pair = [preds["family"], preds["type"]]
            runs[key] = {"method": "supervised per level", "fraction": f, "oversampling": oversample,
                         "levels": levels, "consistency_rate": consistency_rate(pair, tree),
                         "path_acc1": path_accuracy(pair, [tree.level_targets(truth_type, 0), truth_type])}
    seconds["total"] = time.time() - t_start

    header = ["method", "labels", "oversampling", "level", "precision", "recall", "F1", "accuracy"]
    rows = [[r["method"], f"{r['fraction'] * 100:g} %", "yes" if r["oversampling"] else "no", level]
            + [f"{lv[k]:.1f}" for k in ("precision", "recall", "f1", "accuracy")]
            for r in runs.values() for level, lv in zip(("family", "type"), r["levels"])]
    table = format_table(header, rows)
    path_header = ["method", "labels", "oversampling", "whole path", "consistency", "whole path, --consistent"]
    path_rows = [[r["method"], f"{r['fraction'] * 100:g} %", "yes" if r["oversampling"] else "no",
                  f"{r['path_acc1']:.1f}", f"{r['consistency_rate']:.1f}",
                  f"{r['consistent_path_acc1']:.1f}" if "consistent_path_acc1" in r else "n/a"] for r in runs.values()]
    path_table = format_table(path_header, path_rows)
    print(f"\nFashion-MNIST, family / type, test set (macro P/R/F1, top-1, %), {seconds['total'] / 60:.1f} min on "
          f"{device}\n{table}\n\n{path_table}", flush=True)
    return save_record(args, "hierarchy", device, runs, table, train_class_sizes=sizes, num_train=n_train,
                       num_test=10 * args.test_per_class, seconds=seconds, path_table=path_table)


if __name__ == "__main__":
    main()
