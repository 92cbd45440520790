"""Copies that survive re-encoding, found and confirmed on the pixels, not on the embedding.

A re-saved JPEG, a resized export or a copy shifted by a pixel or two is, to a network trained
to be invariant to crops and jitter, no nearer than the other images of its kind; and an
absolute similarity cannot serve a whole set, where look-alike images are packed densely in
one place and sparsely in another. What a copy keeps is its pixel layout. So every image is
reduced to a small grayscale thumbnail (bilinear, averaging when it reduces: a resized copy
lands on the same grid; box resampling copies pixels in blocks when it enlarges a 28 px image),
lightly blurred (JPEG's block noise and resampling differ between copies, the shapes do not),
and compared by normalised cross-correlation, the best over small shifts of one against the
other (brightness and contrast changes drop out of a correlation).

Candidates come from two signals: each image's nearest thumbnails by that shifted correlation
(an exhaustive search, chunked: no N x N matrix) and its nearest embeddings. Each candidate
pair is then confirmed on the thumbnails, against the two images' own neighbourhoods (as the
embedding's relative rule in curate/duplicates.py): the pair's correlation distance must be at
most a ratio of the smaller of the two images' distances to their SCALE_K-th nearest thumbnail.
docs/curate.md has the measurements behind the constants."""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

BLUR = 1.0  # px (of the thumbnail) of the Gaussian blur before comparing
SHIFT = 2  # source px a copy may be moved by; converted to thumbnail px per data set
SCALE_K = 5  # the neighbour whose distance sets an image's scale: past a few look-alike copies


def shift_px(thumb_side: int, source_side: int) -> int:
    """SHIFT source px in thumbnail px (at least 1: resampling alone moves edges by a fraction)."""
    return max(1, round(SHIFT * thumb_side / max(source_side, 1)))


def _blurred(thumbs: torch.Tensor) -> torch.Tensor:
    r = math.ceil(3 * BLUR)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * BLUR ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = thumbs.float().unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3))
    return x.squeeze(1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (flattened) minus their mean, unit length: dot products are correlations."""
    x = x.flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def _windows(v: torch.Tensor, shift: int) -> List[torch.Tensor]:
    """The (2 shift + 1)^2 shifted crops of side (v's side - 2 shift) of every row of v, unit rows."""
    s = v.shape[-1] - 2 * shift
    return [_unit(v[:, shift + dy:shift + dy + s, shift + dx:shift + dx + s])
            for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]


@torch.no_grad()
def pixel_neighbours(thumbs: torch.Tensor, k: int, shift: int, device: torch.device = torch.device("cpu"),
                     chunk: int = 256, bank_chunk: int = 16384) -> Tuple[torch.Tensor, torch.Tensor]:
    """(correlation, row) of the k nearest OTHER rows of every row, best first, on the CPU: the
    best correlation over shifts of the row's crop against the other's centre crop, computed
    on `device` (the GPU when there is one: (2 shift + 1)^2 matrix products per chunk)."""
    v = _blurred(thumbs.to(device))
    n = len(v)
    k = min(k, n - 1)
    bank = _windows(v, shift)[(2 * shift + 1) ** 2 // 2]  # the centre crop
    top_s = torch.full((n, k), -2.0, device=device)
    top_i = torch.zeros((n, k), dtype=torch.long, device=device)
    for q in range(0, n, chunk):
        queries = _windows(v[q:q + chunk], shift)
        rows = torch.arange(q, min(q + chunk, n), device=device)
        for b in range(0, n, bank_chunk):
            part = bank[b:b + bank_chunk]
            s = queries[0] @ part.T
            for w in queries[1:]:
                torch.maximum(s, w @ part.T, out=s)
            cols = torch.arange(b, b + len(part), device=device)
            s[rows.unsqueeze(1) == cols.unsqueeze(0)] = -2.0  # not its own neighbour
            vals, idx = torch.cat([top_s[rows], s], 1), torch.cat([top_i[rows], cols.expand(len(rows), -1)], 1)
            best = vals.topk(k, dim=1)
            top_s[rows], top_i[rows] = best.values, idx.gather(1, best.indices)
    return top_s.cpu(), top_i.cpu()


@torch.no_grad()
def pair_correlations(thumbs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shift: int, chunk: int = 8192
                      ) -> torch.Tensor:
    """The best correlation over shifts, either image moved, of every pair (a[i], b[i])."""
    out = torch.empty(len(a))
    for s in range(0, len(a), chunk):
        va, vb = _blurred(thumbs[a[s:s + chunk]]), _blurred(thumbs[b[s:s + chunk]])
        wa, wb = _windows(va, shift), _windows(vb, shift)
        centre = len(wa) // 2
        best = torch.stack([(w * wb[centre]).sum(1) for w in wa] + [(w * wa[centre]).sum(1) for w in wb]).amax(0)
        out[s:s + chunk] = best
    return out


def confirm_copies(thumbs: torch.Tensor, candidates: Sequence[Tuple[int, int]], neighbours: Tuple[torch.Tensor,
                   torch.Tensor], shift: int, ratio: float) -> Dict[Tuple[int, int], Tuple[float, float]]:
    """{(a, b): (correlation, relative distance)} of the candidate pairs confirmed as copies:
    1 - correlation at most `ratio` x the smaller SCALE_K-th-neighbour distance of a and b
    (`neighbours`: pixel_neighbours of every row)."""
    if not candidates:
        return {}
    pairs = torch.tensor(sorted(set(candidates)))
    corr = pair_correlations(thumbs, pairs[:, 0], pairs[:, 1], shift)
    sims = neighbours[0]
    scale = (1.0 - sims[:, min(SCALE_K, sims.shape[1]) - 1]).clamp_min(1e-6)
    rel = (1.0 - corr).clamp_min(0.0) / torch.minimum(scale[pairs[:, 0]], scale[pairs[:, 1]])
    keep = (rel <= ratio).nonzero().squeeze(1).tolist()
    return {(int(pairs[i, 0]), int(pairs[i, 1])): (float(corr[i]), float(rel[i])) for i in keep}
