"""Pictures of the findings: PNG grids with a caption under every cell (one duplicate
group per row; outliers; label errors with the given and the suggested class) and small
thumbnails for report.html, all files in the output folder so the report reads offline."""
import os
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from common.files.atomic import atomic_path

CELL = 96  # px per image in a grid
THUMB = 48  # px per thumbnail in the report's tables
CAPTION = 24  # px of caption text under a grid cell (two lines)


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


def captioned_grid(rows: Sequence[Sequence[Tuple[Image.Image, str]]], path: str) -> str:
    """One PNG of `rows` of (image, caption) cells; a caption is up to two lines of text
    ("\\n" splits them), cut to the cell's width."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    font = ImageFont.load_default()
    width = max(len(r) for r in rows)
    grid = Image.new("RGB", (width * (CELL + 4) + 4, len(rows) * (CELL + CAPTION + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        for x, (img, caption) in enumerate(row):
            left, top = 4 + x * (CELL + 4), 4 + y * (CELL + CAPTION + 4)
            grid.paste(_fit(img, CELL), (left, top))
            for n, line in enumerate(caption.split("\n")[:2]):
                while line and draw.textlength(line, font=font) > CELL:
                    line = line[:-1]
                draw.text((left, top + CELL + 1 + 11 * n), line, fill="black", font=font)
    return save_png(grid, path)


def write_grids(rows: Sequence[Sequence[Tuple[Image.Image, str]]], folder: str, name: str,
                rows_per_grid: int = 8) -> List[str]:
    """`rows` split into PNGs of `rows_per_grid` rows: FOLDER/NAME_000.png, ..."""
    os.makedirs(folder, exist_ok=True)
    return [captioned_grid(rows[s:s + rows_per_grid], os.path.join(folder, f"{name}_{s // rows_per_grid:03d}.png"))
            for s in range(0, len(rows), rows_per_grid)]


def thumbnail(img: Image.Image, folder: str, row: int) -> str:
    """FOLDER/ROW.png, a THUMB-px thumbnail of row `row`'s image."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{row:07d}.png")
    save_png(_fit(img, THUMB), path)
    return path
