"""Outliers: images far from everything else, scored by 1 - cosine to their k-th nearest
neighbour (with per_class, the k-th nearest of the same class: a dog among cats)."""
from typing import Optional

import torch

from curate.search import self_neighbours


def outlier_scores(feats: torch.Tensor, k: int, labels: Optional[torch.Tensor] = None, index: str = "torch",
                   chunk_size: int = 1024, neighbours: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - cosine to the k-th other image, per row (CPU, fp32); higher is more isolated.
    With `labels`, neighbours are searched within the row's class (-1: the unlabelled
    rows among themselves); a class with k or fewer images scores against its last one.
    `neighbours`: the cosines of a self_neighbours search of all rows with at least k + 1
    columns, reused when there are no labels (one N x k search serves duplicates too)."""
    if labels is None and neighbours is not None and neighbours.shape[1] > min(k, len(feats) - 1):
        return 1.0 - neighbours[:, min(k, neighbours.shape[1] - 1)].float()
    scores = torch.zeros(len(feats))
    groups = [torch.arange(len(feats))] if labels is None else [
        (labels == c).nonzero().squeeze(1) for c in labels.unique().tolist()]
    for rows in groups:
        if len(rows) < 2:
            scores[rows] = 2.0  # alone in its class: as far as cosine goes
            continue
        sim, _ = self_neighbours(feats[rows.to(feats.device)], k, index, chunk_size)
        scores[rows] = 1.0 - sim[:, min(k, sim.shape[1] - 1)].float()
    return scores
