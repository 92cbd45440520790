"""Outliers: images far from everything else. Score "kth": 1 - cosine to the k-th nearest
neighbour. Score "relative" (LOF-style, Breunig et al. 2000): that distance over the median
of the same distance of the image's k nearest neighbours, so an image is judged against the
density around it: a sparse but ordinary region (patterned bags) scores near 1, and a small
group of look-alike foreign images next to a dense region still stands out while the group
has fewer than k / 2 members (the median is then one of the dense region's images, not a
fellow outlier's). With per_class,
neighbours are of the same class only (a dog among cats)."""
from typing import Optional, Tuple

import torch

from curate.duplicates import kth_distance
from curate.search import self_neighbours

SCORES = ("relative", "kth")


def _score(sim: torch.Tensor, idx: torch.Tensor, k: int, score: str) -> torch.Tensor:
    kd = kth_distance(sim, idx, k)
    if score == "kth":
        return kd
    others = idx.masked_fill(idx == torch.arange(len(idx)).unsqueeze(1), -1)
    # the k nearest others of each row (self left out, wherever ties put it)
    order = (others < 0).float().argsort(dim=1, stable=True)[:, :min(k, idx.shape[1] - 1)]
    around = kd[others.gather(1, order)].median(1).values
    return kd / around.clamp_min(1e-6)


def outlier_scores(feats: torch.Tensor, k: int, labels: Optional[torch.Tensor] = None, index: str = "torch",
                   chunk_size: int = 1024, neighbours: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   score: str = "kth") -> torch.Tensor:
    """Per row (CPU, fp32), higher is more isolated: `score` "kth" (1 - cosine to the k-th
    other image) or "relative" (that over its k neighbours' median of it; see the module).
    With `labels`, neighbours are searched within the row's class (-1: the unlabelled rows
    among themselves); a class with k or fewer images scores against its last one.
    `neighbours`: (cosine, row) of a self_neighbours search of all rows with at least k + 1
    columns, reused when there are no labels (one N x k search serves duplicates too)."""
    if score not in SCORES:
        raise ValueError(f"score {score!r} is not one of {SCORES}")
    if labels is None and neighbours is not None and neighbours[0].shape[1] > min(k, len(feats) - 1):
        return _score(neighbours[0], neighbours[1], k, score)
    scores = torch.zeros(len(feats))
    groups = [torch.arange(len(feats))] if labels is None else [
        (labels == c).nonzero().squeeze(1) for c in labels.unique().tolist()]
    for rows in groups:
        if len(rows) < 2:
            scores[rows] = 2.0 if score == "kth" else 1.0  # alone in its class: as far as cosine goes
            continue
        sim, idx = self_neighbours(feats[rows.to(feats.device)], k, index, chunk_size)
        scores[rows] = _score(sim, idx, k, score)
    return scores
