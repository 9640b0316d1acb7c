"""Contact sheets: titles stay inside their own column (word-wrapped), cells are the images resized with NEAREST."""

from __future__ import annotations

import numpy as np
from PIL import Image

from hyperdiff.synthfaces.sheet import contact_sheet, save_png


def _checker(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def test_long_titles_wrap_inside_their_column_and_cells_are_exact(tmp_path):
    rows = [[_checker(0), _checker(1), _checker(2)], [_checker(3), _checker(4), _checker(5)]]
    titles = ["reference", "DreamBooth-LiDB 300 steps on one image", ""]
    sheet = np.asarray(contact_sheet(rows, titles, cell=64))
    top = sheet.shape[0] - 2 * 64
    assert sheet.shape[1] == 3 * 64 and top >= 3 * 12  # the long title needs three lines at 64 px
    strip = sheet[:top].min(axis=2) < 128  # dark (text) pixels of the title strip
    assert not strip[:, 128:].any()  # nothing spills into the untitled third column
    line_rows = np.flatnonzero(strip[:, 64:128].any(axis=1))
    assert line_rows.max() - line_rows.min() > 2 * 12  # several lines
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            cell = sheet[top + r * 64 : top + (r + 1) * 64, c * 64 : (c + 1) * 64]
            assert np.array_equal(cell, np.asarray(img.resize((64, 64), Image.NEAREST)))
    path = save_png(Image.fromarray(sheet), tmp_path / "sheet.png")
    with Image.open(path) as back:
        assert np.array_equal(np.asarray(back.convert("RGB")), sheet)
