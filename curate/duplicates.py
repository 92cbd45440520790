"""Duplicates: exact copies by a hash of the file's bytes, near-duplicates as pairs of
images whose cosine similarity is above a threshold (from the nearest-neighbour search,
so never an N x N matrix), joined into groups; pairs across splits (train/val leakage)
first."""
import hashlib
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch


class Pair(NamedTuple):
    a: int
    b: int
    similarity: float
    exact: bool
    cross_split: bool
    group: int


def file_hash(path: str) -> Optional[str]:
    """sha256 of the file's bytes; None where the image is not a file (CIFAR, MNIST)."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def find_duplicates(sim: torch.Tensor, idx: torch.Tensor, hashes: Sequence[Optional[str]], splits: Sequence[str],
                    threshold: float) -> List[Pair]:
    """Pairs (a < b) of exact copies (same hash) or near-duplicates (cosine >= threshold
    among each row's neighbours, `sim`/`idx` from self_neighbours), with the group
    (connected component) they belong to. An exact group of m copies gives m - 1 pairs
    (its first row with each other), not m^2. Order: cross-split pairs first, then
    exact, then by similarity."""
    n = len(hashes)
    exact = exact_groups(hashes)
    same = {}
    for rows in exact:
        for r in rows:
            same[r] = rows[0]
    edges: Dict[tuple, float] = {}
    for rows in exact:
        for r in rows[1:]:
            edges[(rows[0], r)] = 1.0
    rows_, cols = (sim >= threshold).nonzero(as_tuple=True)
    for r, c in zip(rows_.tolist(), cols.tolist()):
        j = int(idx[r, c])
        if j == r:
            continue
        a, b = min(r, j), max(r, j)
        if a in same and same.get(b) == same[a]:
            continue  # already listed against the group's first copy
        edges[(a, b)] = max(edges.get((a, b), -2.0), float(sim[r, c]))
    group_of = _components(n, list(edges))
    names = {g: k for k, g in enumerate(sorted({group_of[a] for a, _ in edges}))}
    pairs = [Pair(a, b, s, same.get(a) is not None and same.get(a) == same.get(b), splits[a] != splits[b],
                  names[group_of[a]]) for (a, b), s in edges.items()]
    pairs.sort(key=lambda p: (not p.cross_split, not p.exact, -p.similarity, p.a, p.b))
    return pairs


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
