"""kNN evaluation of embedded splits: top-1/top-5 and per-class recall for every --knn-k,
from one neighbour search (common/eval/knn.py), per level of a label tree."""
import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from common.eval.knn import knn_search, knn_vote, top_n, vote_accuracy
from common.eval.label_tree import LabelTree, consistency_rate, path_accuracy
from common.eval.metrics import classification_report


def knn_evaluate(train_f: torch.Tensor, train_l: torch.Tensor, val_f: torch.Tensor, val_l: torch.Tensor,
                 classes: List[str], args: argparse.Namespace, tree: Optional[LabelTree] = None) -> Dict:
    """Top-1/top-5 and per-class recall for every k, from one search with the largest k.
    With a label tree: the same for every level ({"levels": [results of level 1, ...]}),
    the neighbours voting with their class at that level, plus per k the consistency rate
    and whole-path top-1 of the levels' decisions ({"path": {k: ...}})."""
    ks = sorted(set(args.knn_k))
    top_sim, top_idx = knn_search(train_f, val_f, max(ks), args.chunk_size, args.train_chunk_size)
    if tree is None:
        return knn_reports(top_sim, top_idx, train_l, val_l, classes, ks, args.knn_t)[0]
    levels, preds = [], []
    for level, names in enumerate(tree.classes):
        results, scores = knn_reports(top_sim, top_idx, tree.level_targets(train_l, level),
                                      tree.level_targets(val_l, level), names, ks, args.knn_t)
        levels.append(results)
        preds.append({k: s.argmax(dim=1) for k, s in scores.items()})
    targets = [tree.level_targets(val_l, level) for level in range(tree.depth)]
    path = {k: {"path_top1": path_accuracy([p[k] for p in preds], targets),
                "consistency_rate": consistency_rate([p[k] for p in preds], tree)} for k in ks}
    return {"levels": levels, "path": path}


def knn_reports(top_sim: torch.Tensor, top_idx: torch.Tensor, train_l: torch.Tensor, val_l: torch.Tensor,
                classes: List[str], ks: Sequence[int], temperature: float) -> Tuple[Dict, Dict]:
    """({k: top-1/top-5, per-class recall}, {k: vote scores}) for one set of labels. "top5"
    is over the top5_k = min(5, k, classes) best-voted classes, as DINO's knn_classifier:
    k neighbours vote for at most k classes."""
    results, scores = {}, {}
    for k in ks:
        k_used = min(k, top_idx.shape[1])
        scores[k] = knn_vote(top_sim, top_idx, train_l, len(classes), k, temperature)
        report = classification_report(scores[k], val_l, classes)
        n = top_n(k_used, len(classes))
        results[k] = {"k": k, "k_used": k_used, "top1": report["acc1"], "top5": vote_accuracy(scores[k], val_l, n)[1],
                      "top5_k": n, "macro_recall": report["macro_recall"], "per_class": report["per_class"],
                      "majority_vote": majority_vote(scores[k].argmax(dim=1), val_l, classes)}
    return results, scores


# kNN answering one class for nearly everything while the labels are mixed, or scoring no
# better than always answering the commonest class, is the neighbours following something
# other than the classes; measured on the inspection set (docs/knn.md, "Whitened kNN")
ONE_CLASS_SHARE = 0.95
ONE_CLASS_GAP = 0.15
MAJORITY_MARGIN = 0.01


def majority_vote(pred: torch.Tensor, val_l: torch.Tensor, classes: List[str]) -> Optional[Dict]:
    """None, or when kNN's predictions say little of the features: {"class", "predicted_share",
    "val_share"} for the most-predicted class (its share of the predictions and of the labels),
    {"top1", "majority_class", "majority_share"} for the accuracy against always answering the
    commonest val class. Flagged when one class gets >= ONE_CLASS_SHARE of the predictions while
    holding at most ONE_CLASS_GAP less of the labels, or when top-1 is within MAJORITY_MARGIN of
    the commonest class's share. Shares are fractions."""
    if len(pred) == 0 or len(classes) < 2:
        return None
    pred, val_l = pred.long().cpu(), val_l.long().cpu()
    predicted = (torch.bincount(pred, minlength=len(classes)).float() / len(pred)).tolist()
    labelled = (torch.bincount(val_l, minlength=len(classes)).float() / len(val_l)).tolist()
    c, m = max(range(len(classes)), key=predicted.__getitem__), max(range(len(classes)), key=labelled.__getitem__)
    top1 = (pred == val_l).float().mean().item()
    one_sided = predicted[c] >= ONE_CLASS_SHARE and labelled[c] <= predicted[c] - ONE_CLASS_GAP
    if not one_sided and top1 > labelled[m] + MAJORITY_MARGIN:
        return None
    return {"class": classes[c], "predicted_share": predicted[c], "val_share": labelled[c],
            "top1": top1, "majority_class": classes[m], "majority_share": labelled[m]}
