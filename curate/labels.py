"""Labels from the embeddings: suggestions for unlabelled images (a kNN vote of the
labelled ones, with its confidence) and suspected label errors among the labelled ones,
found by Confident Learning (Northcutt et al., 2021) from out-of-fold probabilities. Each
class c has a threshold, the mean probability of c over the images labelled c (its
average self-confidence); an image is confidently of class j when p_j reaches j's
threshold (the largest such j when several do). These counts form the confident joint
C[given, confident class], scaled so each row sums to the class's size. Rule "prune"
(prune by noise rate, cleanlab's default) then flags, for every given class i and other
class j, the round(C[i, j]) images labelled i with the largest margin p_j - p_i, none whose
most probable class is its given one; rule "confident" flags every image confidently of a
class other than its given one (the joint's off-diagonal itself)."""
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from common.eval.knn import knn_search, knn_vote
from common.eval.logreg import PROBE_WD, stratified_folds
from common.log.progress import log

METHODS = ("probe", "knn", "both")
RULES = ("prune", "confident")
# L-BFGS iterations of each fold's probe (common/eval/logreg.py's CV_MAX_ITER): docs/curate.md measures
# it against the former 2,000 minibatches (bench/curate_labels.py)
PROBE_ITERS = 100
CHUNK_ROWS = 65536  # rows standardised and multiplied at once: 65,536 x 2,048 fp32 is 512 MiB
# Below this out-of-fold accuracy (%) of the probabilities used, the flagged images were mostly the
# probabilities' own mistakes: fewer than 3 in 10 were label errors in bench/curate_labels.py (Fashion-MNIST
# with 5 % of the labels flipped, docs/curate.md: a 1-epoch SimCLR checkpoint 73.9 %, precision 26 %, 3.5
# times the flipped share flagged; the recipe's 8 epochs 78.1 %, 32 %, 2.8 times; cahn-hilliard 94 %, 99 %)
WEAK_ACCURACY = 76.0


def knn_probs(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, num_classes: int, k: int,
              temperature: float = 0.07, leave_out_self: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Class probabilities (queries x classes, CPU) from the weighted vote of the k nearest
    bank images (exp(cos / T), normalised). leave_out_self: the queries are the bank, and
    each one's own row does not vote (its out-of-fold estimate)."""
    sim, idx = knn_search(bank, query, k + leave_out_self, chunk_size)
    sim, idx = sim.cpu(), idx.cpu()
    if leave_out_self:
        sim = sim.masked_fill(idx == torch.arange(len(query)).unsqueeze(1), float("-inf"))  # weight exp(-inf) = 0
    votes = knn_vote(sim, idx, bank_labels.cpu(), num_classes, k + leave_out_self, temperature)
    return votes / votes.sum(1, keepdim=True).clamp_min(1e-30)


class OutOfFold(NamedTuple):
    """Out-of-fold class probabilities (rows x classes, CPU) and what they cost."""
    probs: torch.Tensor
    passes: int  # evaluations of the loss over a fold's training rows, all folds together
    rows: int  # rows those passes read: the cost, about folds x iters x N


def _loss(feats: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
          mean: torch.Tensor, std: torch.Tensor, chunk_rows: int) -> float:
    """The probe's loss over `rows` (mean cross-entropy + L2), its gradient accumulated into w
    and b a chunk at a time."""
    loss = PROBE_WD * (w ** 2).sum()
    loss.backward()
    total = float(loss.detach())
    for s in range(0, len(rows), chunk_rows):
        r = rows[s:s + chunk_rows]
        part = F.cross_entropy(((feats[r].float() - mean) / std) @ w + b, y[r], reduction="sum") / len(rows)
        part.backward()
        total += float(part.detach())
    return total


def fastest_threads(work: Callable[[], object]) -> int:
    """1 or torch's thread count, whichever runs `work` faster now (the better of two tries
    each). On a 2-core machine that other jobs kept busy, 2 threads waiting on each other at
    every small op made the former minibatch probe 50 times slower than 1 thread and this
    one 3 times (docs/curate.md); on idle cores the threads pay."""
    most = torch.get_num_threads()
    if most == 1:
        return 1
    took: Dict[int, float] = {}
    try:
        for threads in (most, 1, most, 1):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            work()
            took[threads] = min(took.get(threads, float("inf")), time.perf_counter() - start)
    finally:
        torch.set_num_threads(most)
    return min(took, key=took.__getitem__)


def probe_probs(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, seed: int,
                iters: int = PROBE_ITERS, chunk_rows: int = CHUNK_ROWS) -> OutOfFold:
    """Out-of-fold probabilities of a multinomial logistic regression (common/eval/logreg.py's
    probe: L2 on standardised features, full-batch L-BFGS): the rows are dealt into `folds`
    seeded stratified folds and each fold is predicted by a fit on the others, so no image is
    judged by a model that saw its (possibly wrong) label. Each L-BFGS iteration evaluates the
    loss over the fold's rows about once (at most 1.25 times on average: torch's max_eval), so
    the cost is about folds x iters x N x D x C: it follows N, where the former fixed 2,000
    minibatches of 512 per fold did not. Unlike logreg.py's fit, the features stay in their
    fp16 rows, standardised `chunk_rows` at a time in fp32: no fp64 copy of a million rows.
    On the CPU it runs on 1 thread or torch's count, whichever is faster at the start
    (fastest_threads)."""
    n, device = len(feats), feats.device
    fold = stratified_folds(labels.cpu(), folds, seed)
    y = labels.long().to(device)
    # standardised by every labelled row's mean and std: statistics without the labels, so no fold sees
    # its own labels through them; D of them, summed a chunk at a time in fp64
    sums = torch.zeros(feats.shape[1], dtype=torch.float64, device=device)
    squares = torch.zeros_like(sums)
    for s in range(0, n, chunk_rows):
        x = feats[s:s + chunk_rows].double()
        sums, squares = sums + x.sum(0), squares + (x ** 2).sum(0)
    mean = (sums / n).float()
    std = ((squares / n - (sums / n) ** 2).clamp_min(0).sqrt() + 1e-6).float()
    out, passes, seen = torch.zeros(n, num_classes), 0, 0
    most = torch.get_num_threads()
    try:
        for k in range(folds):
            train = (fold != k).nonzero().squeeze(1).to(device)
            held = (fold == k).nonzero().squeeze(1).to(device)
            if not len(held) or not len(train):
                continue
            start = time.time()
            w = torch.zeros(feats.shape[1], num_classes, device=device, requires_grad=True)
            b = torch.zeros(num_classes, device=device, requires_grad=True)
            if k == 0 and device.type == "cpu":
                torch.set_num_threads(fastest_threads(lambda: _loss(feats, train, y, w, b, mean, std, chunk_rows)))
            opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")
            evaluations = [0]

            def closure() -> torch.Tensor:
                opt.zero_grad()
                evaluations[0] += 1
                return torch.tensor(_loss(feats, train, y, w, b, mean, std, chunk_rows))

            opt.step(closure)
            passes += evaluations[0]
            seen += evaluations[0] * len(train)
            with torch.no_grad():
                for s in range(0, len(held), chunk_rows):
                    rows = held[s:s + chunk_rows]
                    out[rows.cpu()] = (((feats[rows].float() - mean) / std) @ w + b).softmax(1).cpu()
            log(f"=> labels: probe fold {k + 1}/{folds}: {len(train)} rows, {evaluations[0]} passes in "
                f"{time.time() - start:.1f} s" + (f" on {torch.get_num_threads()} of {most} thread(s)"
                                                  if device.type == "cpu" else ""))
    finally:
        torch.set_num_threads(most)
    return OutOfFold(out, passes, seen)


def oof_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """% of rows whose most probable class is their given label: out-of-fold, the accuracy the
    probabilities would have on new images labelled as these are (label errors included)."""
    return 100.0 * float((probs.argmax(1) == labels.to(probs.device)).float().mean()) if len(labels) else float("nan")


def strength_notes(accuracy: Dict[str, float], flagged: int, labelled: int) -> List[str]:
    """What the label-error count must be read with: the out-of-fold accuracy of each set of
    probabilities (`accuracy`: name -> %, the last the one that flagged), and a warning when
    that one is below WEAK_ACCURACY."""
    notes = ["out-of-fold accuracy on the given labels: " + ", ".join(f"{name} {acc:.1f} %"
                                                                      for name, acc in accuracy.items())]
    used = list(accuracy.values())[-1]
    if used < WEAK_ACCURACY:
        notes.append(f"WARNING: the out-of-fold accuracy, {used:.1f} %, is below {WEAK_ACCURACY:.0f} %: the {flagged} "
                     f"flagged images ({100.0 * flagged / max(labelled, 1):.1f} % of the labelled) are unreliable, "
                     f"mostly the probabilities' own mistakes (below this level fewer than 3 in 10 flagged images "
                     f"were label errors in docs/curate.md's benchmark); a checkpoint pretrained on these images, or "
                     f"trained longer, or more labelled images would make them stronger")
    return notes


def label_issues(probs: torch.Tensor, labels: torch.Tensor, rule: str = "prune"
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(suspected mask, suggested class, self-confidence p[given]) of labelled rows from
    their out-of-fold `probs`, by Confident Learning's `rule` (see the module)."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {RULES}")
    num_classes = probs.shape[1]
    labels = labels.long()
    self_conf = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    thresholds = torch.stack([probs[labels == c, c].mean() if bool((labels == c).any()) else torch.tensor(1.0)
                              for c in range(num_classes)])
    confident = probs >= thresholds.unsqueeze(0)
    best = probs.masked_fill(~confident, -1.0).argmax(1)
    has = confident.any(1)
    suggested = torch.where(has, best, probs.argmax(1))
    if rule == "confident":
        return has & (best != labels), suggested, self_conf
    joint = torch.zeros(num_classes, num_classes)
    joint.index_put_((labels[has], best[has]), torch.ones(int(has.sum())), accumulate=True)
    sizes = torch.bincount(labels, minlength=num_classes).float()
    joint = joint / joint.sum(1, keepdim=True).clamp_min(1.0) * sizes.unsqueeze(1)  # rows sum to the class sizes
    suspected = torch.zeros(len(labels), dtype=torch.bool)
    for i in range(num_classes):
        rows = (labels == i).nonzero().squeeze(1)
        for j in range(num_classes):
            n = int(round(float(joint[i, j])))
            if j != i and n > 0:
                margin = probs[rows, j] - probs[rows, i]
                suspected[rows[torch.argsort(margin, descending=True, stable=True)[:n]]] = True
    top = probs.argmax(1)
    return suspected & (top != labels), torch.where(suspected, top, suggested), self_conf
