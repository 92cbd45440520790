"""What a probe reports of an evaluation (lincls/train_eval.py's): the per-class and confusion
CSVs, its log lines, its metrics.jsonl record and results.json."""
import argparse
import json
import os
from typing import Dict, List, Optional

from common.distributed.collectives import is_main_process
from common.eval.label_tree import LabelTree
from common.eval.metrics import save_confusion_csv, save_per_class_csv
from common.log.progress import log


def write_report_files(report: Dict, output_dir: str, suffix: str = "") -> None:
    """confusion_matrix{suffix}.csv and per_class{suffix}.csv of one evaluation."""
    if "levels" in report:  # a hierarchy: the files of every level, e.g. per_class_level2.csv
        for level in report["levels"]:
            write_report_files(level, output_dir, f"_level{level['level']}{suffix}")
        return
    save_confusion_csv(report["confusion"], report["class_names"], os.path.join(output_dir, f"confusion_matrix{suffix}.csv"))
    save_per_class_csv(report["per_class"], os.path.join(output_dir, f"per_class{suffix}.csv"))


SUMMARY_KEYS = ("acc1", "acc5", "macro_precision", "macro_recall", "macro_f1", "val_loss")
PATH_KEYS = ("path_acc1", "consistency_rate", "independent_path_acc1", "independent_consistency_rate", "val_loss")


def summary_line(report: Dict) -> str:
    """The report's headline numbers on one log line."""
    if "levels" in report:
        return f"{report['decoding']} decoding: " + "  ".join(f"{k} {report[k]:.2f}" for k in PATH_KEYS)
    return "  ".join(f"{k} {report[k]:.2f}" if k != "acc5" else f"acc5(top-{report['top5_k']}) {report[k]:.2f}"
                     for k in SUMMARY_KEYS)


def level_lines(report: Dict) -> List[str]:
    """One line per level of a hierarchy's report (none for flat labels)."""
    return [f"level {r['level']} ({r['name']}): {summary_line(r)}" for r in report.get("levels", [])]


def summary_record(report: Dict) -> Dict[str, float]:
    """The report's numbers for metrics.jsonl; a hierarchy's per level as level<L>_<key>."""
    if "levels" not in report:
        return {k: report[k] for k in SUMMARY_KEYS}
    return {"acc1": report["acc1"], **{k: report[k] for k in PATH_KEYS},
            **{f"level{r['level']}_{k}": r[k] for r in report["levels"] for k in SUMMARY_KEYS}}


def jsonable(report: Dict) -> Dict:
    """The report with its confusion matrices as lists, for json.dump."""
    if "levels" in report:
        return {**report, "levels": [jsonable(r) for r in report["levels"]]}
    out = {k: v for k, v in report.items() if k not in ("confusion",)}
    out["confusion"] = report["confusion"].tolist()
    return out


def write_results(args: argparse.Namespace, num_train: int, num_classes: int, best_acc1: float, best_epoch: int,
                  report: Dict, tree: Optional[LabelTree]) -> None:
    """results.json (rank 0): the run's setup, best and final metrics."""
    if not is_main_process():
        return
    results = {"arch": args.arch, "pretrained": args.pretrained, "probe": args.probe, "head": args.head,
               "finetune": args.finetune, "trainable_layers": args.trainable_layers,
               "label_fraction": args.label_fraction, "epochs": args.epochs if args.probe == "sgd" else 0,
               "num_train_images": num_train, "num_classes": num_classes,
               "best_acc1": best_acc1, "best_epoch": best_epoch, "final": jsonable(report)}
    if tree is not None:  # best_acc1 is then the whole-path top-1; final.levels has every level's metrics
        results["hierarchy"] = {"level_names": tree.level_names, "classes": tree.classes,
                                "level_weights": args.level_weights, "balance_level": args.balance_level,
                                "balanced_sampling": args.balanced_sampling, "class_weights": args.class_weights}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"=> metrics in {os.path.join(args.output_dir, 'results.json')}")
