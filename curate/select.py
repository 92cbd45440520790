"""What to label next: k-center greedy (farthest-point) selection on the embeddings
(Sener & Savarese, 2018), starting from the images already labelled: each pick is the
pool image farthest from everything labelled or picked so far, so a cluster gets a
second pick only after every cluster has one. Farthest points are often atypical (blurred,
cropped, odd) images, which teach little when few are labelled (Hacohen et al., 2022,
TypiClust): the candidates can be limited to the more typical part of the pool first."""
import math
from typing import Dict, List, Optional, Tuple

import torch

from common.eval.knn import knn_search
from curate.outliers import outlier_scores

CHUNK = 65536
KMEANS_ITERS = 50  # Lloyd passes at most; stops earlier once no row changes cluster
TYPICAL_K = 20  # TypiClust's neighbours for typicality (its K_NN)
MAX_CLUSTERS = 500  # TypiClust's cap (its MAX_NUM_CLUSTERS): k-means' cost is rows x clusters x D a pass
MIN_CLUSTER = 5  # TypiClust's MIN_CLUSTER_SIZE: smaller clusters are picked from last
METHODS = ("typiclust", "k-center")  # --select-method; the first is the default (docs/curate.md measures both)


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



@torch.no_grad()
def kmeans(feats: torch.Tensor, rows: torch.Tensor, k: int, seed: int, iters: int = KMEANS_ITERS,
           chunk: int = CHUNK) -> torch.Tensor:
    """The cluster (0 .. k-1) of each of `rows` (indices into feats) by Lloyd's k-means on the
    unit-length features from a seeded k-means++ start (Arthur & Vassilvitskii, 2007). The
    start and each pass cost len(rows) x k x D multiply-adds, `chunk` rows at a time: nothing
    of size rows x k is kept."""
    rows = rows.to(feats.device)
    n, k = len(rows), min(k, len(rows))
    g = torch.Generator().manual_seed(seed)
    centres = torch.empty(k, feats.shape[1], device=feats.device)
    centres[0] = feats[rows[int(torch.randint(n, (1,), generator=g))]].float()
    dist = torch.full((n,), float("inf"), device=feats.device)
    for c in range(1, k):  # the next centre drawn with probability proportional to the squared distance
        for s in range(0, n, chunk):
            d = (feats[rows[s:s + chunk]].float() - centres[c - 1]).pow(2).sum(1)
            dist[s:s + chunk] = torch.minimum(dist[s:s + chunk], d)
        weights = dist.clamp_min(0).double().cpu()
        pick = (int(torch.multinomial(weights, 1, generator=g)) if float(weights.sum()) > 0
                else int(torch.randint(n, (1,), generator=g)))  # every row on a centre: copies only
        centres[c] = feats[rows[pick]].float()
    assign = torch.full((n,), -1, dtype=torch.long, device=feats.device)
    for _ in range(iters):
        norms = centres.pow(2).sum(1)
        new = torch.cat([(norms - 2.0 * feats[rows[s:s + chunk]].float() @ centres.T).argmin(1)
                         for s in range(0, n, chunk)])
        if bool((new == assign).all()):
            break
        assign = new
        sums = torch.zeros_like(centres)
        for s in range(0, n, chunk):
            sums.index_add_(0, assign[s:s + chunk], feats[rows[s:s + chunk]].float())
        counts = torch.bincount(assign, minlength=k).float().unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)  # an emptied centre stays put
    return assign


@torch.no_grad()
def typicality(feats: torch.Tensor, rows: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """1 / (mean Euclidean distance to the k nearest other rows + 1e-5) of each of `rows`
    among themselves: TypiClust's typicality, high in the dense middle of a cluster."""
    k = min(k, len(rows) - 1)
    if k < 1:
        return torch.ones(len(rows))
    x = feats[rows.to(feats.device)]
    sim, _ = knn_search(x, x, k + 1, chunk_size)  # itself first (cosine 1)
    dist = (2.0 - 2.0 * sim[:, 1:].float().clamp(max=1.0)).sqrt()  # unit vectors: |a - b|^2 = 2 - 2 cos
    return (1.0 / (dist.mean(1) + 1e-5)).cpu()


@torch.no_grad()
def typiclust(feats: torch.Tensor, pool: torch.Tensor, labelled: torch.Tensor, n: int, seed: int,
              k: int = TYPICAL_K, clusters: Optional[int] = None, repeats: str = "random", chunk_size: int = 1024
              ) -> Tuple[List[int], List[float]]:
    """`n` rows of `pool` by TypiClust (Hacohen et al., 2022), with each one's typicality in
    its cluster: the labelled and pool images are cut by seeded k-means into `clusters`
    clusters (default TypiClust's: labelled + n, at most MAX_CLUSTERS); each pick goes to the
    cluster holding the fewest labelled-or-picked images (the largest first on ties), so
    every cluster gets one pick before any gets a second. A cluster's first pick is its most
    typical unpicked pool image (typicality within the cluster, `k` neighbours): its centre
    of mass, not its edge. Later picks in a cluster that already holds one (past 500 picks,
    or beside labelled images) are drawn at random among its unpicked images (`repeats`
    "random", seeded): its next most typical image (TypiClust's own, "typical") sits beside
    the first and lost to random picks at N = 1,000 (docs/curate.md), as did one cluster
    per pick. Clusters of at most MIN_CLUSTER images (a few copies, a handful of odd images)
    are passed over while others are left."""
    if repeats not in ("random", "typical"):
        raise ValueError(f"repeats {repeats!r} is not random or typical")
    g = torch.Generator().manual_seed(seed)
    pool, labelled = pool.cpu(), labelled.cpu()
    rows = torch.cat([labelled, pool])
    if clusters is None:
        clusters = min(len(labelled) + n, MAX_CLUSTERS)
    assign = kmeans(feats, rows, min(len(rows), clusters), seed).cpu()
    clusters = int(assign.max()) + 1
    size = torch.bincount(assign, minlength=clusters)
    held = torch.bincount(assign[:len(labelled)], minlength=clusters)  # labelled (then picked) per cluster
    free = torch.bincount(assign[len(labelled):], minlength=clusters)  # unpicked pool images per cluster
    taken = torch.zeros(len(rows), dtype=torch.bool)
    taken[:len(labelled)] = True  # never picked: already labelled
    scores: Dict[int, torch.Tensor] = {}
    picks, typ = [], []
    for _ in range(n):
        open_ = free > 0
        if bool((open_ & (size > MIN_CLUSTER)).any()):  # tiny clusters only when nothing else is left
            open_ &= size > MIN_CLUSTER
        # fewest held first, then the largest, then the lowest id (argmin takes the first)
        key = torch.where(open_, held * (len(rows) + 1) - size, torch.tensor(torch.iinfo(torch.long).max))
        c = int(key.argmin())
        members = (assign == c).nonzero().squeeze(1)
        if c not in scores:
            scores[c] = typicality(feats, rows[members], min(k, len(members) // 2), chunk_size)
        if repeats == "random" and int(held[c]) > 0:
            unpicked = (~taken[members]).nonzero().squeeze(1)
            j = int(unpicked[torch.randint(len(unpicked), (1,), generator=g)])
        else:
            j = int(scores[c].masked_fill(taken[members], -1.0).argmax())
        taken[members[j]] = True
        held[c] += 1
        free[c] -= 1
        picks.append(int(rows[members[j]]))
        typ.append(float(scores[c][j]))
    return picks, typ
