"""What main_knn.py reports of a kNN evaluation: log lines, TensorBoard scalars,
knn_results.json and the per-class CSVs (per level of a label tree)."""
import argparse
import csv
import json
import os
from typing import Dict, List, Optional

from common.eval.label_tree import LabelTree
from common.eval.metrics import save_per_class_csv
from common.log.progress import log
from common.log.tensorboard import TensorBoardLog


def report_knn(results: Dict, classes: List[str], info: Dict, args: argparse.Namespace, tree: Optional[LabelTree],
               tensorboard: TensorBoardLog) -> None:
    """knn_evaluate's results to the log, TensorBoard and OUTPUT_DIR's files; `info` (the
    run's setup) heads knn_results.json."""
    if tree is None:
        log_knn(results, classes, args.knn_t, whitened=bool(args.whiten))
        for k, r in results.items():
            tensorboard.scalars({"top1": r["top1"], f"top{min(5, r['k_used'])}": r["top5"]}, 0, f"knn_k{k}")
    else:
        for level, (name, r) in enumerate(zip(tree.level_names, results["levels"])):
            log_knn(r, tree.classes[level], args.knn_t, f" level {level + 1} ({name})", bool(args.whiten))
            for k, rk in r.items():
                tensorboard.scalars({"top1": rk["top1"], f"top{min(5, rk['k_used'])}": rk["top5"]}, 0,
                                    f"knn_level{level + 1}_k{k}")
        for k, p in results["path"].items():
            log(f"=> kNN k={k} whole path: top-1 {p['path_top1']:.2f}  consistency {p['consistency_rate']:.2f} "
                f"(predicted class under the predicted parent)")
    write_knn_files(results, classes, info, args.output_dir, tree)
    log(f"=> kNN results in {os.path.join(args.output_dir, 'knn_results.json')} and knn_per_class.csv")


def log_knn(results: Dict, classes: List[str], temperature: float, title: str = "", whitened: bool = False) -> None:
    """Top-1/top-5 per k, then per-class recall (the 5 worst and 5 best of many classes), and
    a warning where kNN says little of the features (knn/evaluate.py majority_vote)."""
    for k, r in results.items():
        clipped = f" (only {r['k_used']} training images)" if r["k_used"] < k else ""
        log(f"=> kNN{title} k={k}{clipped} T={temperature}: top-1 {r['top1']:.2f}  top-{r['top5_k']} {r['top5']:.2f}  "
            f"mean per-class recall {r['macro_recall']:.2f}")
    flagged = {k: r["majority_vote"] for k, r in results.items() if r["majority_vote"]}
    if flagged:
        k, v = next(iter(flagged.items()))
        fix = ("more labelled images, or main_lincls.py --probe logreg, which weighs the directions by the labels"
               if whitened else "--whiten 64 (docs/knn.md, \"Whitened kNN\"), or main_lincls.py --probe logreg")
        log(f"WARNING: kNN{title} at k={', '.join(map(str, flagged))} says little of the features: at k={k} top-1 "
            f"{100 * v['top1']:.1f} against {100 * v['majority_share']:.1f} for always answering "
            f"'{v['majority_class']}', and '{v['class']}' gets {100 * v['predicted_share']:.0f}% of the votes for "
            f"{100 * v['val_share']:.0f}% of the labels. The neighbours follow what the images differ by most "
            f"(brightness, a background), not the classes; try {fix}")
    ks = list(results)
    rows = list(range(len(classes)))
    if len(classes) > 20:  # a 1000-class table helps nobody in a terminal: the extremes, all in the CSV
        order = sorted(rows, key=lambda c: results[ks[0]]["per_class"][c]["recall"])
        rows = order[:5] + order[-5:]
        log(f"=> per-class recall{title}, 5 worst and 5 best classes at k={ks[0]} (all in knn_per_class*.csv):")
    else:
        log(f"=> per-class recall{title}:")
    width = max(len(classes[c]) for c in rows)
    log(f"   {'class':<{width}}  support  " + "  ".join(f"k={k:<5}" for k in ks))
    for c in rows:
        support = results[ks[0]]["per_class"][c]["support"]
        log(f"   {classes[c]:<{width}}  {support:>7}  " + "  ".join(f"{results[k]['per_class'][c]['recall']:6.2f}"
                                                             for k in ks))


def write_knn_files(results: Dict, classes: List[str], info: Dict, output_dir: str,
                    tree: Optional[LabelTree] = None) -> None:
    """knn_results.json and the per-class CSVs (knn_per_class_level<L>*.csv for each level of a tree)."""
    if tree is None:
        out = {**info, "knn": write_per_class_files(results, classes, output_dir)}
    else:
        out = {**info, "levels": [{"level": level + 1, "name": name,
                                   "knn": write_per_class_files(r, tree.classes[level], output_dir, f"_level{level + 1}")}
                                  for level, (name, r) in enumerate(zip(tree.level_names, results["levels"]))],
               "path": {str(k): v for k, v in results["path"].items()}}
    with open(os.path.join(output_dir, "knn_results.json"), "w") as f:
        json.dump(out, f, indent=1)


def write_per_class_files(results: Dict, classes: List[str], output_dir: str, suffix: str = "") -> Dict:
    """knn_per_class{suffix}.csv (every k side by side) and knn_per_class{suffix}_k{K}.csv;
    returns the results without per-class rows, per-class recall by name, for the JSON."""
    os.makedirs(output_dir, exist_ok=True)
    ks = list(results)
    with open(os.path.join(output_dir, f"knn_per_class{suffix}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "support"] + [f"recall_k{k}" for k in ks] + [f"precision_k{k}" for k in ks])
        for c, name in enumerate(classes):
            pc = [results[k]["per_class"][c] for k in ks]
            w.writerow([name, pc[0]["support"]] + [f"{p['recall']:.4f}" for p in pc]
                       + [f"{p['precision']:.4f}" for p in pc])
    for k in ks:
        save_per_class_csv(results[k]["per_class"], os.path.join(output_dir, f"knn_per_class{suffix}_k{k}.csv"))
    return {str(k): {key: v for key, v in r.items() if key != "per_class"}
            | {"per_class_recall": {p["class"]: p["recall"] for p in r["per_class"]}}
            for k, r in results.items()}
