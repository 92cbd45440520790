"""Duplicates: exact copies by a hash of the file's bytes, and near copies confirmed on the
pixels (curate/copies.py, rule "pixels", the default) or near-duplicates in the embedding
(rules "relative" and "cosine", from the nearest-neighbour search, never an N x N matrix),
joined into groups; pairs across splits (train/val leakage) first.

In the embedding, a near-duplicate is judged against the two images' neighbourhoods (rule "relative"): the
pair's cosine distance divided by the smaller of the two images' distances to their k-th
neighbour must be at most a ratio. One absolute cosine cannot serve a whole embedding:
where images are dense (plain T-shirts) different images are closer than a re-encoded copy
is where they are sparse (patterned bags), while a copy is much nearer than its image's
ordinary neighbours in both. Rule "cosine" keeps the absolute threshold."""
import hashlib
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from common.data.shard_reader import ShardDataset
from common.eval.embeddings import path_of

class Pair(NamedTuple):
    a: int
    b: int
    similarity: float  # the confirming test's score: 1 (sha256), pixel correlation or embedding cosine
    relative: float  # the test's distance over the smaller k-th-neighbour distance of a and b
    exact: bool
    cross_split: bool
    group: int
    test: str = "sha256"  # what confirmed the pair: sha256 (same bytes), pixels or embedding


def file_hash(path: str) -> Optional[str]:
    """sha256 of the file's bytes; None where the image is not a file (CIFAR, MNIST)."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_hash(dataset: Dataset, index: int) -> Optional[str]:
    """file_hash of the image's file, or sha256 of its bytes inside a shard."""
    if isinstance(dataset, ShardDataset):
        try:
            return hashlib.sha256(dataset.read_bytes(index)).hexdigest()
        except OSError:
            return None
    return file_hash(path_of(dataset, index))


def exact_groups(hashes: Sequence[Optional[str]]) -> List[List[int]]:
    """Rows with the same bytes, groups of two or more, each in row order."""
    by_hash: Dict[str, List[int]] = {}
    for row, h in enumerate(hashes):
        if h is not None:
            by_hash.setdefault(h, []).append(row)
    return [rows for rows in by_hash.values() if len(rows) > 1]


def _components(n: int, edges: Sequence[tuple]) -> List[int]:
    """Union-find: the smallest row of each row's connected component."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(i) for i in range(n)]


RULES = ("relative", "cosine")  # the embedding's rules; "pixels" is curate/copies.py


def kth_distance(sim: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """1 - cosine to each row's k-th nearest other row (`sim`/`idx` from self_neighbours,
    at least k + 1 columns): the scale of the row's neighbourhood."""
    others = sim.float().masked_fill(idx == torch.arange(len(idx)).unsqueeze(1), float("-inf"))
    kth = others.topk(min(k, others.shape[1] - 1), dim=1).values[:, -1]
    return (1.0 - kth).clamp_min(0.0)


def relative_distance(sim: torch.Tensor, idx: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cosine distance of every neighbour pair in `sim`/`idx`, that distance over the
    smaller k-th-neighbour distance of its two rows); both like `sim`. A pair must be close
    against both rows' neighbourhoods, so an image of a sparse region is not paired with
    a dense region's image merely because its own neighbours are all far."""
    dist = (1.0 - sim.float()).clamp_min(0.0)
    scale = kth_distance(sim, idx, k)
    return dist, dist / torch.minimum(scale.unsqueeze(1), scale[idx]).clamp_min(1e-6)


def embedding_near_pairs(sim: torch.Tensor, idx: torch.Tensor, threshold: float, rule: str = "cosine",
                         ratio: float = 0.0, k: int = 10) -> Dict[Tuple[int, int], Tuple[float, float]]:
    """{(a, b): (cosine, relative distance)} of the near-duplicates among each row's
    neighbours (`sim`/`idx` from self_neighbours, at least k + 1 columns): rule "cosine",
    cosine >= threshold; rule "relative", cosine distance <= ratio x the smaller
    k-th-neighbour distance of the two rows (see the module)."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not one of {RULES}")
    _, rel = relative_distance(sim, idx, k)
    near = sim >= threshold if rule == "cosine" else rel <= ratio
    out: Dict[Tuple[int, int], Tuple[float, float]] = {}
    rows_, cols = near.nonzero(as_tuple=True)
    for r, c in zip(rows_.tolist(), cols.tolist()):
        j = int(idx[r, c])
        if j == r:
            continue
        a, b = min(r, j), max(r, j)
        old = out.get((a, b), (-2.0, float("inf")))
        out[(a, b)] = (max(old[0], float(sim[r, c])), min(old[1], float(rel[r, c])))
    return out


def join_pairs(hashes: Sequence[Optional[str]], splits: Sequence[str],
               near: Dict[Tuple[int, int], Tuple[float, float]], test: str) -> List[Pair]:
    """Pairs (a < b) of exact copies (same hash, test "sha256") and the `near` ones {(a, b):
    (score, relative)} confirmed by `test`, with the group (connected component) each belongs
    to. An exact group of m copies gives m - 1 pairs (its first row with each other), not m^2,
    and a near pair inside an exact group is not listed again. Order: cross-split pairs first,
    then exact, then by relative distance."""
    n = len(hashes)
    exact = exact_groups(hashes)
    same = {}
    for rows in exact:
        for r in rows:
            same[r] = rows[0]
    edges: Dict[tuple, Tuple[float, float, str]] = {}
    for rows in exact:
        for r in rows[1:]:
            edges[(rows[0], r)] = (1.0, 0.0, "sha256")
    for (a, b), (score, rel) in near.items():
        if not (a in same and same.get(b) == same[a]):
            edges[(a, b)] = (score, rel, test)
    group_of = _components(n, list(edges))
    names = {g: k for k, g in enumerate(sorted({group_of[a] for a, _ in edges}))}
    pairs = [Pair(a, b, s, r, t == "sha256", splits[a] != splits[b], names[group_of[a]], t)
             for (a, b), (s, r, t) in edges.items()]
    pairs.sort(key=lambda p: (not p.cross_split, not p.exact, p.relative, -p.similarity, p.a, p.b))
    return pairs


def find_duplicates(sim: torch.Tensor, idx: torch.Tensor, hashes: Sequence[Optional[str]], splits: Sequence[str],
                    threshold: float, rule: str = "cosine", ratio: float = 0.0, k: int = 10) -> List[Pair]:
    """Exact copies and the embedding's near-duplicates (embedding_near_pairs), as join_pairs."""
    return join_pairs(hashes, splits, embedding_near_pairs(sim, idx, threshold, rule, ratio, k), "embedding")


def groups_of(pairs: Sequence[Pair]) -> Dict[int, List[int]]:
    """group -> its rows, in row order."""
    out: Dict[int, set] = {}
    for p in pairs:
        out.setdefault(p.group, set()).update((p.a, p.b))
    return {g: sorted(rows) for g, rows in sorted(out.items())}


def redundant_rows(pairs: Sequence[Pair], splits: Sequence[str]) -> List[int]:
    """The rows a clean list leaves out: every member of a group but one, the one kept
    being in the last split of the group in split order (val over train: a leaked copy
    is dropped from train, the val image stays) and first in row order there."""
    order = {name: k for k, name in enumerate(dict.fromkeys(splits))}
    drop = []
    for rows in groups_of(pairs).values():
        keep = min(rows, key=lambda r: (-order[splits[r]], r))
        drop += [r for r in rows if r != keep]
    return sorted(drop)
