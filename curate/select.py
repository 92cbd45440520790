"""What to label next: k-center greedy (farthest-point) selection on the embeddings
(Sener & Savarese, 2018), starting from the images already labelled: each pick is the
pool image farthest from everything labelled or picked so far, so a cluster gets a
second pick only after every cluster has one. Farthest points are often atypical (blurred,
cropped, odd) images, which teach little when few are labelled (Hacohen et al., 2022,
TypiClust): the candidates can be limited to the more typical part of the pool first."""
import math
from typing import List, Tuple

import torch

from common.eval.knn import knn_search
from curate.outliers import outlier_scores

CHUNK = 65536


@torch.no_grad()
def k_center_greedy(feats: torch.Tensor, pool: torch.Tensor, labelled: torch.Tensor, n: int, seed: int,
                    chunk_size: int = 1024) -> Tuple[List[int], List[float]]:
    """`n` rows of `pool` (row indices into feats) in pick order, with each one's cosine
    distance to the nearest labelled-or-picked image when it was picked. Without labelled
    rows the first pick is drawn with `seed`; the rest is deterministic (ties: the lowest
    row)."""
    pool = pool.to(feats.device)
    if len(labelled):
        bank = feats[labelled.to(feats.device)]
        dist = torch.cat([1.0 - knn_search(bank, feats[pool[s:s + CHUNK]], 1, chunk_size)[0][:, 0].float()
                          for s in range(0, len(pool), CHUNK)])
    else:
        dist = torch.full((len(pool),), float("inf"), device=feats.device)
    picks, gaps = [], []
    for _ in range(n):
        if not picks and not len(labelled):
            j = int(torch.randint(len(pool), (1,), generator=torch.Generator().manual_seed(seed)))
        else:
            j = int(dist.argmax())
        picks.append(j)
        gaps.append(float(dist[j]))
        centre = feats[pool[j]].float()
        for s in range(0, len(pool), CHUNK):  # fp16 rows upcast a chunk at a time: no fp32 copy of the pool
            dist[s:s + CHUNK] = torch.minimum(dist[s:s + CHUNK], 1.0 - feats[pool[s:s + CHUNK]].float() @ centre)
        dist[j] = -1.0  # never again, even if rounding leaves it above another's
    return [int(pool[j]) for j in picks], gaps


def typical_candidates(feats: torch.Tensor, pool: torch.Tensor, fraction: float, n: int, k: int,
                       chunk_size: int = 1024) -> torch.Tensor:
    """The `fraction` of `pool` (at least n rows) nearest to its k-th neighbour within the
    pool, in row order: the dense part of the pool, which k-center greedy then covers."""
    if fraction >= 1.0:
        return pool
    scores = outlier_scores(feats[pool.to(feats.device)], k, chunk_size=chunk_size)
    keep = torch.argsort(scores, stable=True)[:max(n, math.ceil(fraction * len(pool)))]
    return pool[keep.sort().values]
