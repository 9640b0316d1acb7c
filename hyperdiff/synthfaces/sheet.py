"""Contact sheets: a grid of PIL images with column titles, written atomically as PNG.

Contract: `contact_sheet(rows, titles, cell=128)` returns one RGB image with `len(titles)` columns and a title
strip on top (each title word-wrapped to its own column, the strip as tall as the longest one); each cell is resized
with NEAREST (pixels stay visible, nothing is invented); `save_png(image, path)` writes it losslessly through a temp
file and a rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from hyperdiff.core.files import atomic_path

LINE_HEIGHT = 12  # the default bitmap font's line, with spacing
MARGIN = 4


def _wrap(draw: ImageDraw.ImageDraw, title: str, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a single word wider than that is cut to fit."""
    lines: list[str] = []
    for word in title.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line) <= width:
            lines[-1] = line
            continue
        while draw.textlength(word) > width and len(word) > 1:
            word = word[:-1]
        lines.append(word)
    return lines


def contact_sheet(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], cell: int = 128) -> Image.Image:
    cols = len(titles)
    if any(len(r) != cols for r in rows):
        raise ValueError(f"every row must have {cols} images")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(draw, t, cell - 2 * MARGIN) for t in titles]
    top = MARGIN + LINE_HEIGHT * max((len(w) for w in wrapped), default=1) + 2
    sheet = Image.new("RGB", (cols * cell, top + len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((c * cell + MARGIN, 3 + k * LINE_HEIGHT), line, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, top + r * cell))
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    with atomic_path(path, "image") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
