"""Contact sheets: a grid of PIL images with column titles, written atomically as PNG.

Contract: `contact_sheet(rows, titles, cell=128)` returns one RGB image with `len(titles)` columns and a title
strip on top; each cell is resized with NEAREST (pixels stay visible, nothing is invented); `save_png(image,
path)` writes it losslessly through a temp file and a rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from hyperdiff.files import atomic_path

TITLE_HEIGHT = 18


def contact_sheet(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], cell: int = 128) -> Image.Image:
    cols = len(titles)
    if any(len(r) != cols for r in rows):
        raise ValueError(f"every row must have {cols} images")
    sheet = Image.new("RGB", (cols * cell, TITLE_HEIGHT + len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((c * cell + 4, 3), title, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, TITLE_HEIGHT + r * cell))
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    with atomic_path(path, "image") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
