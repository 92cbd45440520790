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
pair, and each image's nearest thumbnails, are then aligned to a fraction of a pixel
(pair_correlations) and the pair confirmed against the two images' own neighbourhoods (as the
embedding's relative rule in curate/duplicates.py): the pair's correlation distance must be at
most a ratio of the smaller of the two images' distances to their SCALE_K-th nearest thumbnail.
docs/curate.md has the measurements behind the constants."""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

BLUR = 1.0  # px (of the thumbnail) of the Gaussian blur before comparing
SHIFT = 2  # source px a copy may be moved by; converted to thumbnail px per data set
SCALE_K = 4  # the neighbour whose distance sets an image's scale: past a few look-alike copies


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


SUBPIXEL = 0.25  # px (of the thumbnail) between the fractional offsets tried around the best whole-pixel one
SUBPIXEL_STEPS = 2  # of them either way: half a pixel, where the best whole pixel leaves the true offset


@torch.no_grad()
def pair_correlations(thumbs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shift: int, chunk: int = 4096
                      ) -> torch.Tensor:
    """The best correlation of every pair (a[i], b[i]) over offsets of one image against the
    other's centre, each way round: the whole-pixel offsets up to `shift`, then fractions of a
    pixel (SUBPIXEL steps, up to half a pixel either way) around the best of them, the moved image
    resampled bilinearly. A copy resized and moved by a fraction of a pixel is off the
    whole-pixel grid by up to half a pixel, which at 28 px costs it more correlation than
    separates it from a look-alike image; and a copy shifted with its edges repeated matches
    its original better one way round than the other (docs/curate.md has both measurements)."""
    out = torch.empty(len(a))
    for s in range(0, len(a), chunk):
        va, vb = _blurred(thumbs[a[s:s + chunk]]), _blurred(thumbs[b[s:s + chunk]])
        wa, wb = _windows(va, shift), _windows(vb, shift)
        out[s:s + chunk] = torch.maximum(_aligned(va, vb, wa, wb, shift), _aligned(vb, va, wb, wa, shift))
    return out


def _aligned(va: torch.Tensor, vb: torch.Tensor, wa: List[torch.Tensor], wb: List[torch.Tensor], shift: int
             ) -> torch.Tensor:
    """The best correlation of each va's centre crop with vb moved (wa, wb: their _windows):
    whole pixels (either crop moved), then SUBPIXEL fractions around the best, vb resampled."""
    side, n = va.shape[-1], len(va)
    inner = side - 2 * shift
    offsets = torch.tensor([[float(dy), float(dx)] for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)])
    steps = torch.arange(-SUBPIXEL_STEPS, SUBPIXEL_STEPS + 1, dtype=torch.float32) * SUBPIXEL
    base = torch.arange(shift, side - shift, dtype=torch.float32)
    centre = len(wa) // 2
    # vb's window at +o against va's centre, or va's window at +o against vb's centre (vb moved by -o)
    scores = torch.stack([(wa[centre] * w).sum(1) for w in wb] + [(w * wb[centre]).sum(1) for w in wa])
    best, k = scores.max(0)
    at = torch.where((k < len(wb)).unsqueeze(1), offsets[k % len(wb)], -offsets[k % len(wb)])
    for fy in steps:
        for fx in steps:
            if fy == 0 and fx == 0:
                continue
            ys, xs = base.view(1, -1) + at[:, :1] + fy, base.view(1, -1) + at[:, 1:] + fx  # n x inner
            grid = torch.stack([xs.unsqueeze(1).expand(n, inner, inner), ys.unsqueeze(2).expand(n, inner, inner)],
                               -1) * (2.0 / (side - 1)) - 1.0
            moved = F.grid_sample(vb.unsqueeze(1), grid, mode="bilinear", padding_mode="border",
                                  align_corners=True).squeeze(1)
            best = torch.maximum(best, (wa[centre] * _unit(moved)).sum(1))
    return best


def confirm_copies(thumbs: torch.Tensor, candidates: Sequence[Tuple[int, int]], neighbours: Tuple[torch.Tensor,
                   torch.Tensor], shift: int, ratio: float) -> Dict[Tuple[int, int], Tuple[float, float]]:
    """{(a, b): (correlation, relative distance)} of the candidate pairs confirmed as copies:
    1 - correlation at most `ratio` x the smaller SCALE_K-th-neighbour distance of a and b
    (`neighbours`: pixel_neighbours of every row, whose whole-pixel correlations are measured
    again as pair_correlations measures the candidates, so a pair and its scale are alike)."""
    if not candidates:
        return {}
    nearest = neighbours[1].tolist()
    wanted = sorted(set(candidates))
    pairs = sorted(set(wanted) | {(min(r, j), max(r, j)) for r, row in enumerate(nearest) for j in row})
    index = torch.tensor(pairs)
    measured = dict(zip(pairs, pair_correlations(thumbs, index[:, 0], index[:, 1], shift).tolist()))
    sims = torch.tensor([[measured[(min(r, j), max(r, j))] for j in row] for r, row in enumerate(nearest)])
    sims = sims.sort(1, descending=True).values
    scale = (1.0 - sims[:, min(SCALE_K, sims.shape[1]) - 1]).clamp_min(1e-6)
    corr = torch.tensor([measured[p] for p in wanted])
    rows = torch.tensor(wanted)
    rel = (1.0 - corr).clamp_min(0.0) / torch.minimum(scale[rows[:, 0]], scale[rows[:, 1]])
    return {wanted[i]: (float(corr[i]), float(rel[i])) for i in (rel <= ratio).nonzero().squeeze(1).tolist()}
