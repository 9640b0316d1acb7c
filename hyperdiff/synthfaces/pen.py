"""Drawing SynthFaces faces, the tools: a pen in face coordinates and the geometry of a head.

Contract: `_Pen` draws with PIL's ImageDraw at `SUPERSAMPLE`x the output size, in the pixels of a 64x64 image
(`_UNIT`) around the head centre moved by the identity's pose jitter; `_Head` is one identity's head outline as a
half-width profile over t in [-1 (top), 1 (chin)]; `_hair_cap` and `_hairline` shape hair over it. `faces.render` is
what uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import ImageDraw

from hyperdiff.synthfaces.world import RGB, Identity

SUPERSAMPLE = 4  # render at 4x and box-filter down
_UNIT = 64  # geometry is written in the pixels of a 64x64 image and scaled to `size`

Point = tuple[float, float]


def _shade(color: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, round(c * factor))) for c in color)  # type: ignore[return-value]


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b))  # type: ignore[return-value]


class _Pen:
    """ImageDraw in face coordinates: origin at the head centre, 1 unit = 1 pixel of a 64x64 image."""

    def __init__(self, draw: ImageDraw.ImageDraw, size: int, identity: Identity) -> None:
        self.draw = draw
        self.k = size * SUPERSAMPLE / _UNIT
        self.cx = 32.0 + identity.offset_x
        self.cy = 35.0 + identity.offset_y
        self.s = identity.scale

    def pt(self, x: float, y: float) -> Point:
        return ((self.cx + x * self.s) * self.k, (self.cy + y * self.s) * self.k)

    def width(self, w: float) -> int:
        return max(1, round(w * self.s * self.k))

    def box(self, x: float, y: float, rx: float, ry: float) -> list[Point]:
        return [self.pt(x - rx, y - ry), self.pt(x + rx, y + ry)]

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: RGB | None = None,
                outline: RGB | None = None, width: float = 0.0) -> None:
        self.draw.ellipse(self.box(x, y, rx, ry), fill=fill, outline=outline,
                          width=self.width(width) if outline else 0)

    def polygon(self, points: Sequence[Point], fill: RGB) -> None:
        self.draw.polygon([self.pt(x, y) for x, y in points], fill=fill)

    def line(self, points: Sequence[Point], fill: RGB, width: float, closed: bool = False) -> None:
        pts = [self.pt(x, y) for x, y in points]
        if closed:
            pts.append(pts[0])
        self.draw.line(pts, fill=fill, width=self.width(width), joint="curve")
        r = self.width(width) / 2  # round caps
        if not closed and r >= 1.5:
            for px, py in (pts[0], pts[-1]):
                self.draw.ellipse([px - r + 0.5, py - r + 0.5, px + r - 0.5, py + r - 0.5], fill=fill)

    def chord(self, x: float, y: float, rx: float, ry: float, start: float, end: float, fill: RGB) -> None:
        self.draw.chord(self.box(x, y, rx, ry), start, end, fill=fill)

    def arc(self, x: float, y: float, rx: float, ry: float, start: float, end: float, fill: RGB, width: float) -> None:
        self.line(_arc_points(x, y, rx, ry, start, end), fill, width)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB) -> None:
        self.draw.rectangle([self.pt(x0, y0), self.pt(x1, y1)], fill=fill)


def _arc_points(x: float, y: float, rx: float, ry: float, start: float, end: float, n: int = 24) -> list[Point]:
    """Points on an ellipse arc; angles in degrees, clockwise from 3 o'clock (PIL's convention, y down)."""
    out = []
    for i in range(n + 1):
        a = math.radians(start + (end - start) * i / n)
        out.append((x + rx * math.cos(a), y + ry * math.sin(a)))
    return out


@dataclass(frozen=True)
class _Head:
    """Head geometry of one identity: the outline as a half-width profile over t in [-1 (top), 1 (chin)]."""

    shape: str
    w: float  # half-width
    h: float  # half-height

    def half_width(self, t: float) -> float:
        t = max(-1.0, min(1.0, t))
        if self.shape == "round":
            return self.w * 1.04 * math.sqrt(1 - t * t)
        if self.shape == "oval":
            return self.w * 0.95 * math.sqrt(1 - t * t) * (1 - 0.1 * max(t, 0))
        if self.shape == "long":
            return self.w * 0.84 * math.sqrt(1 - t * t)
        if self.shape == "square":
            return self.w * (1 - abs(t) ** 5) ** 0.2
        if self.shape == "heart":
            return self.w * 1.02 * math.sqrt(1 - t * t) ** 0.7 * (1 - 0.45 * max(t, 0) ** 1.2)
        # pear: narrow forehead, wide jaw
        return self.w * math.sqrt(1 - t * t) ** 0.8 * (0.85 + 0.1 * (t + 1))

    def half_height(self) -> float:
        return self.h * {"round": 0.93, "long": 1.07}.get(self.shape, 1.0)

    def outline(self, grow: float = 1.0, n: int = 48) -> list[Point]:
        """Closed outline, clockwise from the top (scaled by `grow` about the centre)."""
        hh = self.half_height()
        right, left = [], []
        for i in range(n + 1):
            t = -math.cos(math.pi * i / n)
            right.append((self.half_width(t) * grow, t * hh * grow))
        for x, y in reversed(right[1:-1]):
            left.append((-x, y))
        return right + left

    def top(self) -> float:
        return -self.half_height()


def _head_of(identity: Identity) -> _Head:
    return _Head(identity.face_shape, 14.5 * identity.face_width, 17.5 * identity.face_height)


def _hair_cap(head: _Head, t_edge: float, grow: float, hairline: list[Point]) -> list[Point]:
    """Hair covering the head from the top down to `t_edge` at the sides, closed by `hairline` (right to left)."""
    hh = head.half_height() * grow
    pts: list[Point] = []
    n = 20
    for i in range(n + 1):  # left edge -> over the top -> right edge
        t = -1 + (t_edge + 1) * abs(1 - 2 * i / n)
        side = -1 if i < n / 2 else 1
        pts.append((side * head.half_width(t) * grow, t * hh))
    return pts + hairline


def _hairline(y_side: float, y_mid: float, x_half: float, n: int = 12) -> list[Point]:
    """Hairline from right (x_half, y_side) to left (-x_half, y_side), passing (0, y_mid): a smooth curve."""
    pts = []
    for i in range(n + 1):
        x = x_half - 2 * x_half * i / n
        pts.append((x, y_mid + (y_side - y_mid) * abs(x / x_half) ** 1.6))
    return pts
