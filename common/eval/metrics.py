"""Classification metrics: top-k accuracy, confusion matrix, per-class and macro
precision / recall / F1, and their CSV files. Pure tensor math on logits and labels;
main_lincls.py, main_knn.py and bench/ all report through these functions. Also the
pretraining runs' retrieval top-1 (retrieval_acc1: does each row find its own pair in the batch?)."""
import csv
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> List[float]:
    """Top-k accuracy in percent for each k. k is clipped to the number of classes
    (top-5 of a 3-class problem is top-3, i.e. 100%), as a 2-class run would otherwise fail."""
    num_classes = output.shape[1]
    ks = [min(k, num_classes) for k in topk]
    with torch.no_grad():
        pred = output.topk(max(ks), dim=1).indices  # (N, maxk), best first
        correct = pred == target.view(-1, 1)
        n = max(target.shape[0], 1)
        return [100.0 * correct[:, :k].any(dim=1).float().sum().item() / n for k in ks]


@torch.no_grad()
def retrieval_acc1(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """% of queries whose own key (same row) is the most cosine-similar key of the batch
    (chance: 100/N), as a device tensor (no host sync: the step loop reads it with the meters).
    queries, keys: NxC, row i of both from image i (distillation: student projection, teacher
    feature)."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(keys.float(), dim=1).T  # NxN
    return (sim.argmax(dim=1) == torch.arange(sim.shape[0], device=sim.device)).float().mean() * 100.0


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class (sklearn's convention)."""
    pred, target = pred.long().view(-1).cpu(), target.long().view(-1).cpu()
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def precision_recall_f1(confusion: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support from a confusion matrix.

    A ratio with an empty denominator (a class never predicted, or absent from the
    labels) is 0, as sklearn's zero_division=0; F1 of a class is 0 when P + R = 0."""
    confusion = confusion.double()
    tp = confusion.diag()
    predicted = confusion.sum(dim=0)  # column sums: how often each class was predicted
    support = confusion.sum(dim=1)    # row sums: how many samples each class has
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long()}


def classification_report(logits: torch.Tensor, target: torch.Tensor,
                          class_names: Optional[Sequence[str]] = None) -> Dict:
    """Everything main_lincls.py reports for one evaluation, in percent.

    Macro averages are unweighted means over all C classes (sklearn's average='macro'
    with labels=range(C)), so a class the model never predicts pulls them down."""
    num_classes = logits.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    logits, target = logits.float().cpu(), target.long().cpu()
    acc1, acc5 = accuracy(logits, target, topk=(1, 5))
    confusion = confusion_matrix(logits.argmax(dim=1), target, num_classes)
    prf = precision_recall_f1(confusion)
    per_class = [{"class": names[c], "precision": 100.0 * prf["precision"][c].item(),
                  "recall": 100.0 * prf["recall"][c].item(), "f1": 100.0 * prf["f1"][c].item(),
                  "support": int(prf["support"][c])} for c in range(num_classes)]
    return {
        "acc1": acc1, "acc5": acc5, "top5_k": min(5, num_classes), "num_samples": int(target.shape[0]),
        "macro_precision": 100.0 * prf["precision"].mean().item(),
        "macro_recall": 100.0 * prf["recall"].mean().item(),
        "macro_f1": 100.0 * prf["f1"].mean().item(),
        "per_class": per_class, "confusion": confusion, "class_names": names,
    }


def save_confusion_csv(confusion: torch.Tensor, class_names: Sequence[str], path: str) -> None:
    """CSV with a header row of predicted classes and one row per true class."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted"] + list(class_names))
        for name, row in zip(class_names, confusion.tolist()):
            w.writerow([name] + row)


def save_per_class_csv(per_class: List[Dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        for row in per_class:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
