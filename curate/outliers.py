"""Outliers: images far from everything else. Score "kth": 1 - cosine to the k-th nearest
neighbour. Score "relative" (LOF-style, Breunig et al. 2000): that distance over the median
of the same distance of the image's k nearest neighbours, so an image is judged against the
density around it: a sparse but ordinary region (patterned bags) scores near 1, and a small
group of look-alike foreign images next to a dense region still stands out while the group
has fewer than k / 2 members (the median is then one of the dense region's images, not a
fellow outlier's). With per_class,
neighbours are of the same class only (a dog among cats).

A group of foreign images larger than k / 2 is its own density: main_curate.py therefore ranks
by combined_scores, which adds a group signal (the distance to the neighbour 1 % of the set
away) and the images' pixel statistics to the embedding's score, each as a robust z-score."""
import math
from typing import Dict, List, Optional, Tuple

import torch

from curate.duplicates import kth_distance
from curate.pixels import robust_z
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


GROUP_FRACTION = 0.01  # the group signal's neighbourhood, of the images: past a foreign group of 0.5 %
GROUP_K_MAX = 1000  # its cost bound (N x k neighbours kept)


def group_k(n: int, k: int) -> int:
    """The group signal's k: GROUP_FRACTION of the images, at least --outlier-k, at most n - 1."""
    return max(1, min(n - 1, max(k, min(GROUP_K_MAX, math.ceil(GROUP_FRACTION * n)))))


TWIN = 0.9  # a pixel correlation with another image from which an image is taken as a copy of it, not foreign


def combined_scores(embedding: torch.Tensor, group: Optional[torch.Tensor], stats: Dict[str, torch.Tensor],
                    twin: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[str]]:
    """(score, the signal that gave it) of every row: the largest robust z-score among the
    embedding's outlier score, the group signal (the distance to the group_k-th neighbour: a
    few dozen look-alike foreign images are each other's neighbours, but not 1 % of the set's)
    and each image statistic's (curate/pixels.py). Each signal is judged by its own spread,
    so a noise image (entropy, high frequency), a blank one (contrast) and an image far from the
    rest in the embedding all rise to the top.

    `twin`: each row's best pixel correlation with another row (curate/copies.py). From TWIN
    on, the embedding's score does not count: an image that another image matches on the pixels
    is not foreign to the set, however far a re-encode moved it in the embedding. Among the
    near-identical frames of a simulation a JPEG copy is hundreds of deviations out by the
    density score and buried the noise images; the copies' best correlation was at least 0.92
    and the noise images' at most 0.53 on three real sets (docs/curate.md)."""
    emb = robust_z(embedding, one_sided=True)
    if twin is not None:
        emb = emb.masked_fill(twin >= TWIN, 0.0)
    signals = {"embedding": emb}
    if group is not None:
        signals["group"] = robust_z(group, one_sided=True)
    signals.update(stats)
    names = list(signals)
    z = torch.stack([signals[n] for n in names], 1)
    score, which = z.max(1)
    return score, [names[i] for i in which.tolist()]
