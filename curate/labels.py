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
from typing import Tuple

import torch
import torch.nn.functional as F

from common.eval.knn import knn_search, knn_vote

METHODS = ("probe", "knn", "both")
RULES = ("prune", "confident")


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


def probe_probs(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, seed: int,
                steps: int = 2000, batch_size: int = 512) -> torch.Tensor:
    """Out-of-fold class probabilities (CPU) of a linear softmax probe: the rows are cut
    into `folds` seeded folds and each fold is predicted by a probe trained for `steps`
    minibatches on the others, so no image is judged by a model that saw its (possibly
    wrong) label. The cost is steps x batch whatever the number of images."""
    n, device = len(feats), feats.device
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(n, generator=g) % folds
    out = torch.zeros(n, num_classes)
    y = labels.to(device)
    # unit-length rows have entries ~1/sqrt(D): scaled to ~1 so the probe's lr suits any width
    scale = feats.shape[1] ** 0.5
    for k in range(folds):
        train, held = (fold != k).nonzero().squeeze(1), (fold == k).nonzero().squeeze(1)
        if not len(held) or not len(train):
            continue
        probe = torch.nn.Linear(feats.shape[1], num_classes).to(device)
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(steps):
            rows = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=g)].to(device)
            loss = F.cross_entropy(probe(feats[rows].float() * scale), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            for s in range(0, len(held), 65536):
                rows = held[s:s + 65536]
                out[rows] = probe(feats[rows.to(device)].float() * scale).softmax(1).cpu()
    return out


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
