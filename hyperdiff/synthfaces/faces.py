"""Rendering SynthFaces: an identity in a scene as pixels.

Contract
--------
* **Rendering.** `render(identity, scene, size)` draws with PIL at 4x `size` and box-filters down, so it is
  supersampled and deterministic: the same `(identity, scene, size)` gives the same pixels; nothing is random at render
  time. Pose jitter comes from the identity only, so one identity sits at the same place in every scene.
* **Corner guarantee.** Nothing (face, hair, ears, hat) ever reaches the four `k x k` corner patches, `k = size // 8`:
  they are exactly the background colour (what `captions.background_of` reads back).
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from hyperdiff.errors import HyperdiffError
from hyperdiff.synthfaces.pen import (SUPERSAMPLE, _UNIT, _hair_cap, _hairline, _Head, _head_of, _mix, _Pen,
                                      _shade)
from hyperdiff.synthfaces.world import EYE_COLORS, GLASSES_COLORS, HAIR_COLORS, PALETTE, RGB, SKIN_TONES, Identity, Scene

HAT_COLOR: RGB = (46, 40, 56)
HAT_BAND: RGB = (238, 226, 196)
MOUTH_DARK: RGB = (110, 26, 40)
LIP: RGB = (150, 52, 60)
LIP_ON_DARK: RGB = (214, 120, 124)  # lips and mouth lines on skin tones darker than `_DARK_SKIN` luminance
_DARK_SKIN = 130.0
TEETH: RGB = (250, 250, 245)


def _draw_hair_back(pen: _Pen, identity: Identity, head: _Head, color: RGB) -> None:
    style, top = identity.hair_style, head.top()
    if style == "long":
        w = head.w * 1.2
        pen.polygon(
            [(-w * 0.92, top * 0.55), (-w, 0.4 * head.h), (-w * 0.97, 1.22 * head.h), (-w * 0.6, 1.34 * head.h),
             (w * 0.6, 1.34 * head.h), (w * 0.97, 1.22 * head.h), (w, 0.4 * head.h), (w * 0.92, top * 0.55)],
            color,
        )
        pen.ellipse(0, top * 0.45, w * 0.93, -top * 0.62, fill=color)
    elif style == "bob":
        w = head.w * 1.18
        pen.ellipse(0, top * 0.3, w, -top * 0.82, fill=color)
        pen.rect(-w, top * 0.2, w, 0.45 * head.h, fill=color)
    elif style == "afro":
        cy, rx, ry = top * 0.32, head.w * 1.5, head.h * 1.12
        pen.ellipse(0, cy, rx, ry, fill=color)
        for i in range(14):  # bumpy rim
            a = 2 * math.pi * i / 14
            pen.ellipse(rx * 0.92 * math.cos(a), cy + ry * 0.92 * math.sin(a), 3.2, 3.2, fill=color)
    elif style == "curly":
        for i in range(11):  # curls around the upper half, down to the ears
            a = math.pi * (0.95 + 1.1 * i / 10)
            pen.ellipse(head.w * 1.02 * math.cos(a), top * 0.15 + head.h * 0.95 * math.sin(a), 3.4, 3.4, fill=color)


def _draw_hair_front(pen: _Pen, identity: Identity, head: _Head, color: RGB, hat: bool) -> None:
    style, top, w = identity.hair_style, head.top(), head.w
    line = _shade(color, 0.7)
    if style == "bald":
        pen.ellipse(-w * 0.35, top * 0.78, 3.0, 1.4, fill=_mix(_skin(identity), (255, 255, 255), 0.35))
        return
    if style in ("short", "spiky", "mohawk"):
        edge = {"short": -0.35, "spiky": -0.3, "mohawk": -0.5}[style]
        y_side = edge * head.half_height() * 1.04
        x_half = head.half_width(edge) * 1.04
        grow = 1.04 if style != "mohawk" else 1.0
        cap = _hair_cap(head, edge, grow, _hairline(y_side, top * 0.62, x_half))
        pen.polygon(cap, color if style != "mohawk" else _mix(_skin(identity), color, 0.45))
        if style == "spiky" and not hat:
            for i in range(7):
                a = math.pi * (1.12 + 0.76 * i / 6)
                bx, by = head.half_width(-0.8) * math.cos(a) * 1.2, top * 0.55 + 12 * math.sin(a) * 0.75
                tip = (bx * 1.25, by - 5.5 + abs(math.cos(a)) * 2.5)
                pen.polygon([(bx - 3.2, by + 1), tip, (bx + 3.2, by + 1)], color)
        if style == "mohawk":
            pen.polygon([(-3.0, top * 0.5), (-3.6, top - 1), (0, top - 7.5), (3.6, top - 1), (3.0, top * 0.5)], color)
        return
    if style == "side_part":
        edge = -0.3
        x_half = head.half_width(edge) * 1.05
        y_side = edge * head.half_height() * 1.05
        sweep = []  # fringe swept from a part on the left, low on the right
        for i in range(13):
            x = x_half - 2 * x_half * i / 12
            u = max(0.0, min(1.0, (x + x_half) / (2 * x_half)))  # 1 right .. 0 left
            sweep.append((x, top * (0.9 - 0.52 * u ** 0.8) + 2.0 * math.sin(math.pi * u) * u))
        sweep[0] = (x_half, y_side)
        pen.polygon(_hair_cap(head, edge, 1.05, sweep), color)
        pen.line([(-w * 0.42, top * 1.0), (-w * 0.35, top * 0.78)], line, 0.9)
        return
    if style == "curly":
        for i in range(9):
            a = math.pi * (1.08 + 0.84 * i / 8)
            pen.ellipse(w * 0.78 * math.cos(a), top * 0.2 + head.h * 0.82 * math.sin(a), 4.0, 4.0, fill=color)
        pen.ellipse(0, top * 0.78, w * 0.75, 4.0, fill=color)
        return
    if style == "afro":
        cap = _hair_cap(head, -0.3, 1.03, _hairline(-0.3 * head.half_height(), top * 0.6,
                                                     head.half_width(-0.3) * 1.03))
        pen.polygon(cap, color)
        return
    if style == "long":  # middle part, hair framing the face
        x_half = head.half_width(-0.1) * 1.05
        pen.polygon(_hair_cap(head, -0.1, 1.05, _hairline(-0.1 * head.half_height(), top * 0.95, x_half)),
                    color)
        return
    if style == "bob":  # straight bangs
        x_half = head.half_width(-0.35) * 1.06
        bangs = [(x_half, top * 0.42), (-x_half, top * 0.42)]
        pen.polygon(_hair_cap(head, -0.42, 1.06, bangs), color)
        return


def _skin(identity: Identity) -> RGB:
    return SKIN_TONES[identity.skin]


def _draw_ears(pen: _Pen, identity: Identity, head: _Head, skin: RGB, edge: RGB) -> None:
    for side in (-1, 1):
        x = side * (head.half_width(0.05) - 0.5)
        if identity.ears == "small":
            pen.ellipse(x + side * 1.2, 1.0, 2.4, 3.4, fill=skin, outline=edge, width=0.6)
        elif identity.ears == "big":
            pen.ellipse(x + side * 2.2, 0.5, 3.6, 5.0, fill=skin, outline=edge, width=0.6)
            pen.ellipse(x + side * 2.4, 0.8, 1.5, 2.6, fill=_shade(skin, 0.86))
        else:  # pointy (elf)
            pts = [(x, -2.0), (x + side * 6.5, -6.0), (x + side * 3.2, 4.0), (x, 4.0)]
            pen.polygon(pts, edge)
            inner = [(x, -1.3), (x + side * 5.6, -5.0), (x + side * 2.7, 3.3), (x, 3.3)]
            pen.polygon(inner, skin)


def _eye_geometry(identity: Identity, expression: str) -> tuple[float, float, float, float]:
    """(y, x spacing, rx, ry) of the eyes."""
    r = 2.3 * identity.eye_size
    rx, ry = r * 1.2, r
    if expression == "surprised":
        rx, ry = rx * 1.12, ry * 1.4
    elif expression == "smiling":
        ry *= 0.85
    elif expression == "sad":
        ry *= 0.9
    return -1.0, 5.6 * identity.eye_spacing, rx, ry


def _draw_eyes(pen: _Pen, identity: Identity, expression: str, skin: RGB) -> None:
    y, sp, rx, ry = _eye_geometry(identity, expression)
    iris_color = EYE_COLORS[identity.eye_color]
    for side in (-1, 1):
        x = side * sp
        pen.ellipse(x, y, rx, ry, fill=(252, 252, 250), outline=(40, 30, 30), width=0.5)
        ir = min(rx, ry) * 0.78
        pen.ellipse(x, y + 0.1, ir, ir, fill=iris_color)
        pen.ellipse(x, y + 0.1, ir * 0.5, ir * 0.5, fill=(15, 12, 12))
        pen.ellipse(x - ir * 0.35, y - ir * 0.35, ir * 0.22, ir * 0.22, fill=(255, 255, 255))
        if expression == "sad":  # drooping upper lid, lower on the outer side
            pen.polygon([(x - rx - 0.3, y - ry - 0.4), (x + rx + 0.3, y - ry - 0.4),
                         (x + side * rx, y - ry * (0.1 if side > 0 else 0.6)),
                         (x - side * rx, y - ry * (0.6 if side > 0 else 0.1))], skin)
            pen.line([(x - rx, y - ry * (0.1 if side < 0 else 0.6)), (x + rx, y - ry * (0.1 if side > 0 else 0.6))],
                     (40, 30, 30), 0.6)


def _draw_brows(pen: _Pen, identity: Identity, expression: str, color: RGB) -> None:
    y_eye, sp, rx, ry = _eye_geometry(identity, expression)
    base = y_eye - ry - 2.2
    style = identity.eyebrow_style
    width = {"thin": 0.8, "thick": 1.8, "arched": 1.1, "angled": 1.3}[style]
    lift = {"neutral": 0.0, "smiling": -0.6, "surprised": -2.4, "sad": 0.0}[expression]
    for side in (-1, 1):
        x_in, x_out = side * (sp - rx * 0.9), side * (sp + rx * 1.15)
        y_in = y_out = base + lift
        mid_up = {"thin": 0.4, "thick": 0.3, "arched": 1.6, "angled": 1.0}[style]
        if expression == "surprised":
            mid_up += 1.0
        if expression == "sad":
            y_in -= 2.0
            y_out += 0.6
            mid_up = 0.2
        if style == "angled" and expression != "sad":
            y_in += 0.6
            pts = [(x_in, y_in), (side * (sp + rx * 0.25), min(y_in, y_out) - mid_up), (x_out, y_out + 0.6)]
        else:
            xm = (x_in + x_out) / 2
            pts = [(x_in, y_in), ((x_in + xm) / 2, (y_in + (y_in + y_out) / 2) / 2 - mid_up * 0.8),
                   (xm, (y_in + y_out) / 2 - mid_up), ((xm + x_out) / 2, (y_out + (y_in + y_out) / 2) / 2 - mid_up * 0.8),
                   (x_out, y_out)]
        pen.line(pts, color, width)


def _draw_nose(pen: _Pen, identity: Identity, head: _Head, skin: RGB) -> None:
    y = 0.28 * head.h
    dark = _shade(skin, 0.7)
    if identity.nose == "button":
        pen.ellipse(0, y, 1.9, 1.6, fill=_shade(skin, 0.88), outline=dark, width=0.5)
    elif identity.nose == "long":
        pen.line([(0.6, y - 5.5), (1.0, y), (-0.8, y + 0.9)], dark, 0.7)
    elif identity.nose == "wide":
        pen.arc(0, y - 0.2, 3.2, 1.6, 20, 160, dark, 0.7)
        pen.ellipse(-1.4, y + 0.4, 0.6, 0.5, fill=dark)
        pen.ellipse(1.4, y + 0.4, 0.6, 0.5, fill=dark)
    else:  # pointy
        pen.polygon([(0, y - 3.5), (2.2, y + 1.2), (-0.4, y + 1.2)], _shade(skin, 0.82))


def _lip(skin: RGB) -> RGB:
    luminance = 0.299 * skin[0] + 0.587 * skin[1] + 0.114 * skin[2]
    return LIP_ON_DARK if luminance < _DARK_SKIN else LIP


def _draw_mouth(pen: _Pen, identity: Identity, expression: str, head: _Head) -> None:
    y = 0.56 * head.h
    lip = _lip(_skin(identity))
    w = 4.2 * identity.mouth_width
    if expression == "smiling":  # open grin: lower half-ellipse with a row of teeth
        pen.chord(0, y - 0.8, w, 3.8, 0, 180, MOUTH_DARK)
        pen.chord(0, y - 0.8, w * 0.86, 1.7, 0, 180, TEETH)
        pen.arc(0, y - 0.8, w, 3.8, 0, 180, lip, 0.5)
        pen.line([(-w - 0.2, y - 1.0), (w + 0.2, y - 1.0)], lip, 0.6)
    elif expression == "neutral":
        pen.line([(-w * 0.75, y), (w * 0.75, y)], lip, 1.0)
    elif expression == "surprised":
        pen.ellipse(0, y + 0.4, 1.6 + 0.2 * w, 2.6, fill=MOUTH_DARK, outline=lip, width=0.5)
    else:  # sad: frown
        pen.arc(0, y + 1.8, w * 0.85, 2.4, 200, 340, lip, 1.0)


def _draw_facial_hair(pen: _Pen, identity: Identity, head: _Head, color: RGB, skin: RGB) -> None:
    style = identity.facial_hair
    y_m = 0.56 * head.h
    w_m = 4.2 * identity.mouth_width
    if style == "beard":  # a crescent along the jaw and chin, under the mouth
        hh = head.half_height() * 1.03
        outer = [(head.half_width(t / 20) * 1.03, t / 20 * hh) for t in range(4, 21)]
        outer = outer + [(-x, y) for x, y in reversed(outer[:-1])]
        x0 = head.half_width(0.2) * 0.9
        inner = [(-x0, 0.2 * hh), (-w_m - 0.5, y_m - 0.5), (-w_m * 0.6, y_m + 2.8), (0, y_m + 3.4),
                 (w_m * 0.6, y_m + 2.8), (w_m + 0.5, y_m - 0.5), (x0, 0.2 * hh)]
        pen.polygon(outer + inner, color)
    if style == "goatee":  # a pointed tuft on the chin, outlined so light colours read as hair
        chin = head.half_height()
        pts = [(-2.6, y_m + 2.4), (2.6, y_m + 2.4), (1.6, chin + 1.2), (0, chin + 2.4), (-1.6, chin + 1.2)]
        pen.polygon(pts, color)
        pen.line(pts, _shade(color, 0.72), 0.5, closed=True)


def _draw_freckles(pen: _Pen, identity: Identity, head: _Head, skin: RGB) -> None:
    dot = _mix(skin, (120, 60, 30), 0.55)
    for side in (-1, 1):
        for dx, dy in ((4.2, 3.3), (6.0, 2.8), (5.1, 4.6), (7.2, 4.1), (3.6, 5.0)):
            pen.ellipse(side * dx * identity.eye_spacing, dy, 0.55, 0.55, fill=dot)


def _draw_glasses(pen: _Pen, identity: Identity, expression: str) -> None:
    if identity.glasses == "none":
        return
    color = GLASSES_COLORS[identity.glasses_color]  # type: ignore[index]
    y, sp, _, _ = _eye_geometry(identity, "neutral")
    r = 2.3 * identity.eye_size * 1.75
    for side in (-1, 1):
        x = side * sp
        if identity.glasses == "round":
            pen.ellipse(x, y, r, r, outline=color, width=0.9)
        else:
            pen.draw.rounded_rectangle(pen.box(x, y, r * 1.1, r * 0.8), radius=pen.width(1.0), outline=color,
                                       width=pen.width(0.9))
    inner = sp - (r if identity.glasses == "round" else r * 1.1)
    pen.line([(-inner, y - 0.4), (inner, y - 0.4)], color, 0.8)


def _brim_y(head: _Head) -> float:
    return head.top() * 0.72


def _draw_hat(pen: _Pen, identity: Identity, head: _Head) -> None:
    y = _brim_y(head)
    wide = identity.hair_style in ("afro", "curly", "long", "bob")
    brim = head.w * (1.5 if wide else 1.3)
    crown_lo, crown_hi, tall = head.w * 0.78, head.w * 0.84, 14.0
    pen.polygon([(-crown_lo, y), (-crown_hi, y - tall), (crown_hi, y - tall), (crown_lo, y)], HAT_COLOR)
    pen.ellipse(0, y - tall, crown_hi, 1.3, fill=_shade(HAT_COLOR, 1.5))
    pen.polygon([(-crown_lo, y - 0.6), (-crown_lo * 1.015, y - 3.2), (crown_lo * 1.015, y - 3.2),
                 (crown_lo, y - 0.6)], HAT_BAND)
    pen.ellipse(0, y, brim, 1.7, fill=HAT_COLOR)


def render(identity: Identity, scene: Scene, size: int = 64) -> Image.Image:
    """Draw `identity` in `scene` as a `size` x `size` RGB image (supersampled 4x, deterministic)."""
    if not isinstance(identity, Identity):
        raise HyperdiffError(f"`identity` must be an Identity, got {type(identity).__name__}")
    if not isinstance(scene, Scene):
        raise HyperdiffError(f"`scene` must be a Scene, got {type(scene).__name__}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        raise HyperdiffError(f"`size` must be an integer >= 16, got {size!r}")
    big = size * SUPERSAMPLE
    background = PALETTE[scene.background]
    image = Image.new("RGB", (big, big), background)
    pen = _Pen(ImageDraw.Draw(image), size, identity)
    head = _head_of(identity)
    skin, hair = _skin(identity), HAIR_COLORS[identity.hair_color]
    edge = _shade(skin, 0.68)
    brow = _shade(hair, 0.8) if identity.hair_color not in ("platinum", "silver", "blonde") else _shade(hair, 0.6)

    _draw_hair_back(pen, identity, head, hair)
    _draw_ears(pen, identity, head, skin, edge)
    outline = head.outline()
    pen.polygon(outline, skin)
    pen.line(outline, edge, 0.7, closed=True)
    if identity.freckles:
        _draw_freckles(pen, identity, head, skin)
    _draw_facial_hair(pen, identity, head, hair, skin)
    _draw_hair_front(pen, identity, head, hair, scene.hat)
    if scene.hat:  # the hat hides everything above its brim
        pen.rect(-_UNIT, -_UNIT, _UNIT, _brim_y(head), background)
    _draw_brows(pen, identity, scene.expression, brow)
    _draw_eyes(pen, identity, scene.expression, skin)
    _draw_nose(pen, identity, head, skin)
    _draw_mouth(pen, identity, scene.expression, head)
    if identity.facial_hair in ("beard", "moustache"):  # a moustache sits over the upper lip
        y_m, w_m = 0.56 * head.h, 4.2 * identity.mouth_width
        pen.polygon([(-w_m - 1.2, y_m - 0.6), (-1.0, y_m - 3.6), (0, y_m - 3.0), (1.0, y_m - 3.6),
                     (w_m + 1.2, y_m - 0.6), (0, y_m - 2.0)], hair)
    _draw_glasses(pen, identity, scene.expression)
    if scene.hat:
        _draw_hat(pen, identity, head)
    return image.resize((size, size), Image.BOX)


__all__ = ["render"]
