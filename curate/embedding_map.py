"""The embedding map of report.html: the features' first two principal components as a
PNG scatter (PIL, no matplotlib), coloured by class, with the images the findings flagged
marked. The axes span robust quantiles, so a few far outliers cannot squash the rest
into a corner: points beyond them are drawn on the border as triangles."""
import os
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from curate.grids import caption_lines, font, save_png
from curate.items import Items
from curate.report import Section

# 20 distinguishable colours (matplotlib's tab20 order: dark then light of each hue)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5",
           "#dbdb8d", "#393b79"]
UNLABELLED = "#c8c8c8"
MARKERS = ["ring", "cross", "square", "diamond"]  # one per flagged kind, in the order given
PLOT = (720, 540)  # px of the plotting area
LEGEND = 220  # px of the legend on its right
PAD = 32  # px around the plotting area (axis titles)


def pca_2d(feats: torch.Tensor, fit: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, List[float]]:
    """(len(rows) x 2 coordinates on the CPU, the share of the variance of each) of `rows`
    of `feats` on the first two principal components of the `fit` rows (their D x D
    covariance's eigenvectors: exact and deterministic, signs fixed)."""
    x = feats[fit.to(feats.device)].float()
    mean = x.mean(0)
    x -= mean
    evals, evecs = torch.linalg.eigh(x.T @ x / max(len(x) - 1, 1))
    w = evecs[:, -2:].flip(1)  # the two largest, largest first
    w *= torch.sign(w.gather(0, w.abs().argmax(0, keepdim=True)))  # eigh's sign is arbitrary
    total = float(evals.clamp_min(0).sum()) or 1.0
    xy = (feats[rows.to(feats.device)].float() - mean) @ w
    return xy.cpu(), [float(e) / total for e in evals.flip(0)[:2].clamp_min(0)]


def robust_limits(xy: torch.Tensor, q: float = 0.01, margin: float = 0.1) -> torch.Tensor:
    """(x0, x1, y0, y1): each axis from its q to its 1 - q quantile, widened by `margin` of
    that span on both sides; a far point moves these by at most one rank."""
    lo, hi = torch.quantile(xy.float(), torch.tensor([q, 1 - q]), dim=0)
    span = (hi - lo).clamp_min(1e-6)
    return torch.stack([lo[0] - margin * span[0], hi[0] + margin * span[0], lo[1] - margin * span[1],
                        hi[1] + margin * span[1]])


def _marker(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, r: float = 5) -> None:
    """Thin outlines: the class colour of the point under a mark stays visible."""
    box = (x - r, y - r, x + r, y + r)
    if kind == "ring":
        draw.ellipse(box, outline="black", width=1)
    elif kind == "cross":
        draw.line((x - r, y - r, x + r, y + r), fill="black", width=2)
        draw.line((x - r, y + r, x + r, y - r), fill="black", width=2)
    elif kind == "square":
        draw.rectangle(box, outline="black", width=1)
    else:
        draw.polygon((x, y - r - 1, x + r + 1, y, x, y + r + 1, x - r - 1, y), outline="black", width=1)


def _triangle(draw: ImageDraw.ImageDraw, x: float, y: float, dx: int, dy: int, colour: str, r: float = 5) -> None:
    """A triangle at (x, y) pointing along (dx, dy), the way to the point it stands for."""
    if dx == dy == 0:
        dy = -1
    n = (dx * dx + dy * dy) ** 0.5
    ux, uy = dx / n, dy / n
    draw.polygon((x + ux * r, y + uy * r, x - ux * r - uy * r * 0.8, y - uy * r + ux * r * 0.8,
                  x - ux * r + uy * r * 0.8, y - uy * r - ux * r * 0.8), fill=colour, outline="black")


def draw_map(xy: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], marks: Dict[str, torch.Tensor],
             axes: Tuple[str, str], path: str) -> int:
    """The scatter of `xy` (n x 2) coloured by `labels` (-1: gray), the rows `marks` names
    (kind -> indices into xy) marked, the axes from robust_limits; returns how many points
    lay outside them (drawn on the border as triangles pointing their way)."""
    lim = robust_limits(xy)
    w, h = PLOT
    img = Image.new("RGB", (PAD + w + PAD + LEGEND, PAD + h + PAD), "white")
    draw = ImageDraw.Draw(img)
    fnt = font()
    px = PAD + (xy[:, 0] - lim[0]) / (lim[1] - lim[0]) * w
    py = PAD + h - (xy[:, 1] - lim[2]) / (lim[3] - lim[2]) * h  # y up
    out_x = (px < PAD).int() * -1 + (px > PAD + w).int()
    out_y = (py < PAD).int() * -1 + (py > PAD + h).int()
    px, py = px.clamp(PAD, PAD + w).tolist(), py.clamp(PAD, PAD + h).tolist()
    clipped = ((out_x != 0) | (out_y != 0)).tolist()
    out_x, out_y = out_x.tolist(), out_y.tolist()
    draw.rectangle((PAD, PAD, PAD + w, PAD + h), outline="#888888")
    r = 3 if len(xy) <= 2000 else 2 if len(xy) <= 8000 else 0.5  # 0.5: a 2 x 2 px square
    colours = [UNLABELLED if int(c) < 0 else PALETTE[int(c) % len(PALETTE)] for c in labels.tolist()]
    for i in range(len(xy)):
        if clipped[i]:
            _triangle(draw, px[i], py[i], out_x[i], out_y[i], colours[i])
        elif r < 1:
            draw.rectangle((px[i], py[i], px[i] + 1, py[i] + 1), fill=colours[i])
        else:
            draw.ellipse((px[i] - r, py[i] - r, px[i] + r, py[i] + r), fill=colours[i])
    for kind, rows in zip(MARKERS, marks.values()):
        for i in rows.tolist():
            _marker(draw, kind, px[i], py[i])
    draw.text((PAD + w // 2, PAD + h + 12), axes[0], fill="black", font=fnt, anchor="mt")  # below the triangles
    draw.text((PAD, PAD - 10), axes[1], fill="black", font=fnt, anchor="ls")
    # the legend: the first classes, unlabelled, the marks and the clipped points
    x, y = PAD + w + PAD, PAD
    used = sorted({int(c) for c in labels.tolist()})
    shown = [c for c in used if c >= 0][:len(PALETTE)]
    for c in shown:
        draw.ellipse((x, y + 2, x + 8, y + 10), fill=PALETTE[c % len(PALETTE)])
        draw.text((x + 14, y), caption_lines(classes[c] if c < len(classes) else str(c), LEGEND - 20, 1)[0],
                  fill="black", font=fnt)
        y += 14
    if len([c for c in used if c >= 0]) > len(shown):
        draw.text((x, y), f"+{len(used) - len(shown) - (-1 in used)} more classes (colours repeat)", fill="black",
                  font=fnt)
        y += 14
    if -1 in used:
        draw.ellipse((x, y + 2, x + 8, y + 10), fill=UNLABELLED)
        draw.text((x + 14, y), "unlabelled", fill="black", font=fnt)
        y += 14
    y += 8
    for kind, (name, rows) in zip(MARKERS, marks.items()):
        _marker(draw, kind, x + 4, y + 6, 4)
        draw.text((x + 14, y), caption_lines(f"{name} ({len(rows)})", LEGEND - 20, 1)[0], fill="black", font=fnt)
        y += 16
    if any(clipped):
        _triangle(draw, x + 4, y + 6, 1, 0, "white", 4)
        draw.text((x + 14, y), f"outside the axes ({sum(clipped)})", fill="black", font=fnt)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_png(img, path)
    return sum(clipped)


def map_section(items: Items, marked: Dict[str, Sequence[int]], out: str, points: int = 20000,
                per_kind: int = 250, seed: int = 0) -> Section:
    """report.html's embedding map (OUTPUT_DIR/grids/map.png): a seeded sample of `points`
    images (the principal components are fitted on it, enough for a picture and cheap at
    millions) plus the first `per_kind` rows of each kind in `marked` (title -> item rows, most
    telling first), which are always drawn: more marks would hide the map."""
    n = len(items)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:points]
    flagged = {k: torch.as_tensor(list(v)[:per_kind], dtype=torch.long) for k, v in marked.items() if len(v)}
    extra = torch.cat([sample[:0], *flagged.values()]).unique()
    rows = torch.cat([sample, extra[~torch.isin(extra, sample)]])
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[rows] = torch.arange(len(rows))
    xy, share = pca_2d(items.feats, sample, rows)
    path = os.path.join(out, "grids", "map.png")
    clipped = draw_map(xy, items.labels[rows], items.classes, {k: pos[v] for k, v in flagged.items()},
                       (f"PC 1 ({share[0]:.1%} of the variance)", f"PC 2 ({share[1]:.1%})"), path)
    capped = "; ".join(f"the first {per_kind} of the {len(marked[k])} {k.lower()}" for k in flagged
                       if len(marked[k]) > per_kind)
    drawn = f"{len(rows)} of {n} images drawn" + (" (a seeded sample and the marked ones)" if len(rows) < n else "")
    marks = (", ".join(f"{k.lower()} ({len(v)})" for k, v in flagged.items()) or "nothing") + (
        f" ({capped})" if capped else "")
    outside = (f"{clipped} points outside them are drawn on the border as triangles pointing their way" if clipped
               else "no point lies outside them")
    summary = (f"the features' first two principal components, {drawn}, coloured by class (gray: unlabelled); "
               f"marked: {marks}. The axes span the 1st to 99th percentile plus 10 %: {outside}")
    return Section("Embedding map", summary, [path], [path])
