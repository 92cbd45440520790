"""Pictures of the findings: PNG grids with a caption under every cell (duplicate groups
side by side in frames; outliers; label errors with the given and the suggested class) and
small thumbnails for report.html, all files in the output folder so the report reads offline."""
import functools
import os
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from common.files.atomic import atomic_path

CELL = 112  # px per image in a grid (28 px images at 4x)
THUMB = 48  # px per thumbnail in the report's tables
LINE = 12  # px per caption line
LINES = 5  # caption lines at most under a cell
GAP = 14  # px between two groups on one grid line
WIDTH = 8  # cells per grid line
Cell = Tuple[Image.Image, str]


@functools.lru_cache(maxsize=None)
def font() -> ImageFont.ImageFont:
    """The captions' font: Pillow's own, so no system font is needed."""
    return ImageFont.load_default(size=10)


def _fit(img: Image.Image, side: int) -> Image.Image:
    """`img` scaled to fit a side x side square, centred on white."""
    img = ImageOps.contain(img.convert("RGB"), (side, side), Image.NEAREST)  # small images are enlarged too
    out = Image.new("RGB", (side, side), "white")
    out.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return out


def save_png(img: Image.Image, path: str) -> str:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _wrap(text: str, fnt: ImageFont.ImageFont, width: int) -> List[str]:
    """`text` in lines of at most `width` px, broken after a separator (_ - / space) when one
    lies in a line's second half, else anywhere: file names rarely have spaces."""
    lines: List[str] = []
    while text:
        lo, hi = 1, len(text)  # the longest prefix that fits, at least one character
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fnt.getlength(text[:mid]) <= width else (lo, mid - 1)
        n = lo
        if n < len(text):
            cut = max(text.rfind(c, 0, n) for c in "_-/ ") + 1
            n = cut if cut > n // 2 else n
        lines.append(text[:n])
        text = text[n:]
    return lines


def _elide(text: str, fnt: ImageFont.ImageFont, width: int, lines: int) -> List[str]:
    """`text` wrapped into at most `lines` lines; when it needs more, its middle is replaced
    by "…": the start and the end (numbers and the extension, where names differ) stay."""
    def cut(keep: int) -> List[str]:
        tail = max(1, int(keep * 0.45))
        return _wrap(text[:keep - tail] + "…" + text[-tail:], fnt, width)

    out = _wrap(text, fnt, width)
    if len(out) <= lines:
        return out
    lo, hi = 2, len(text) - 1  # the most characters kept that still fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(cut(mid)) <= lines else (lo, mid - 1)
    return cut(lo)[:lines]


def caption_lines(caption: str, width: int = CELL, lines: int = LINES) -> List[str]:
    """A caption's lines under a cell `width` px wide: each "\\n"-separated part wrapped, every
    part keeping at least a line, the last (a file name) the rest, elided in the middle past them."""
    fnt, parts, out = font(), caption.split("\n"), []
    for n, part in enumerate(parts):
        if len(out) == lines:
            break
        out += _elide(part, fnt, width, max(1, lines - len(out) - (len(parts) - 1 - n)))
    return out


def _draw(blocks: Sequence[Sequence[Tuple[str, Sequence[Cell]]]], path: str) -> str:
    """One PNG of grid lines, each a list of (label, cells) blocks side by side; a labelled
    block is framed with its label above."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fnt = font()
    captions = [[[caption_lines(c) for _, c in cells] for _, cells in line] for line in blocks]
    heads = [LINE + 2 if any(label for label, _ in line) else 0 for line in blocks]
    caps = [LINE * max((len(c) for b in line for c in b), default=0) for line in captions]
    widths = [sum(len(cells) * (CELL + 4) for _, cells in line) + GAP * (len(line) - 1) for line in blocks]
    grid = Image.new("RGB", (max(widths) + 8, sum(heads) + sum(caps) + len(blocks) * (CELL + 8) + 4), "white")
    draw = ImageDraw.Draw(grid)
    top = 4
    for line, caption, head, cap in zip(blocks, captions, heads, caps):
        left = 4
        for (label, cells), lines in zip(line, caption):
            if label:
                draw.rectangle((left - 2, top, left + len(cells) * (CELL + 4) - 2, top + head + CELL + cap + 4),
                               fill="#eef0f4", outline="#9aa4b8")
                draw.text((left + 1, top + 2), label, fill="#1a2a4a", font=fnt)
            for x, ((img, _), text) in enumerate(zip(cells, lines)):
                grid.paste(_fit(img, CELL), (left + x * (CELL + 4), top + head + 2))
                for n, t in enumerate(text):
                    draw.text((left + x * (CELL + 4), top + head + CELL + 3 + LINE * n), t, fill="black", font=fnt)
            left += len(cells) * (CELL + 4) + GAP
        top += head + CELL + cap + 8
    return save_png(grid, path)


def captioned_grid(rows: Sequence[Sequence[Cell]], path: str) -> str:
    """One PNG of `rows` of (image, caption) cells; a caption's "\\n"-separated parts are
    wrapped to the cell's width (caption_lines)."""
    return _draw([[("", row)] for row in rows], path)


def group_grids(groups: Sequence[Tuple[str, Sequence[Cell]]], folder: str, name: str, lines_per_grid: int = 8,
                width: int = WIDTH) -> List[str]:
    """(label, cells) groups packed whole onto grid lines of up to `width` cells (a larger
    group is cut to `width`), each framed under its label, `lines_per_grid` lines per PNG:
    FOLDER/NAME_000.png, ..."""
    lines: List[List[Tuple[str, Sequence[Cell]]]] = []
    for label, cells in groups:
        cells = cells[:width]
        if not lines or sum(len(c) for _, c in lines[-1]) + len(cells) > width:
            lines.append([])
        lines[-1].append((label, cells))
    os.makedirs(folder, exist_ok=True)
    return [_draw(lines[s:s + lines_per_grid], os.path.join(folder, f"{name}_{s // lines_per_grid:03d}.png"))
            for s in range(0, len(lines), lines_per_grid)]


def thumbnail(img: Image.Image, folder: str, row: int) -> str:
    """FOLDER/ROW.png, a THUMB-px thumbnail of row `row`'s image."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{row:07d}.png")
    save_png(_fit(img, THUMB), path)
    return path
