"""SynthFaces: the procedural world hyperdiff trains and judges on, offline.

Contract
--------
* **Identities.** `Identity.from_seed(seed)` draws every identity attribute (face shape and size, skin tone, hair style
  and colour, eyes, eyebrows, nose, mouth width, ears, glasses, freckles, facial hair, a small pose jitter) from a
  local `random.Random(seed)`. The same seed gives the same `Identity` on every machine and Python version; no global
  RNG (Python's, numpy's or torch's) is read or advanced. Skin and hair colours are never one of the background colours.
* **Scenes.** `Scene(background, hat, expression)` holds what prompts control; every value is a caption word
  (`SCENE_WORDS`). Backgrounds are exactly `PALETTE` (sRGB):
  red (200, 40, 40), green (40, 160, 60), blue (40, 70, 200), yellow (220, 200, 40), purple (140, 50, 170),
  gray (128, 128, 128). `hat` is a bool (the one hat is a charcoal top hat with a cream band); expressions are
  smiling, neutral, surprised, sad.
* **Rendering.** `render(identity, scene, size)` draws with PIL at 4x `size` and box-filters down, so it is
  supersampled and deterministic: the same `(identity, scene, size)` gives the same pixels; nothing is random at render
  time. Pose jitter comes from the identity only, so one identity sits at the same place in every scene.
* **Corner guarantee.** Nothing (face, hair, ears, hat) ever reaches the four `k x k` corner patches, `k = size // 8`:
  they are exactly the background colour. `background_of(image)` reads the background back from them: the `PALETTE`
  word nearest the corner mean, or None when that is farther than `BACKGROUND_THRESHOLD` (60 RGB units).
* **Captions.** `caption(scene, token)` gives e.g. ``"a sks face, smiling, wearing a hat, on a blue background"``
  (``"a face, ..."`` without a token; no hat clause without a hat); every word is one token of
  `hyperdiff.models.tokenizer.build_tokenizer()`. `scene_from_caption` parses one back.
* **Seed ranges** (the one place they are defined):

  - `TRAIN_SEEDS = range(0, 900_000)`: identities for training (base model, identity encoder, hypernet).
  - `VAL_SEEDS = range(900_000, 1_000_000)`: held-out identities for validation during training.
  - every seed `>= EVAL_SEED_START = 1_000_000` is reserved for evaluation and never used in training;
    `eval_seeds(n)` gives the first `n` of them.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hyperdiff.errors import HyperdiffError, check_number_in

RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------------------------------
# Seed ranges
# ---------------------------------------------------------------------------------------------------------------------

TRAIN_SEEDS: range = range(900_000)
VAL_SEEDS: range = range(900_000, 1_000_000)
EVAL_SEED_START: int = 1_000_000


def eval_seeds(n: int) -> range:
    """The first `n` evaluation identity seeds (all `>= EVAL_SEED_START`, never used in training)."""
    _check_count("n", n)
    return range(EVAL_SEED_START, EVAL_SEED_START + n)


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# ---------------------------------------------------------------------------------------------------------------------

PALETTE: dict[str, RGB] = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
    "purple": (140, 50, 170),
    "gray": (128, 128, 128),
}
BACKGROUNDS: tuple[str, ...] = tuple(PALETTE)
EXPRESSIONS: tuple[str, ...] = ("smiling", "neutral", "surprised", "sad")
SCENE_WORDS: dict[str, tuple[Any, ...]] = {
    "background": BACKGROUNDS,  # caption clause "on a <word> background"
    "hat": (False, True),  # True -> caption clause "wearing a hat"; False -> no clause
    "expression": EXPRESSIONS,  # caption clause "<word>"
}

# Largest RGB distance (0..255 scale) from the corner mean to the nearest palette colour that `background_of` still
# names; the closest two palette colours (blue, purple) are ~106 apart, so 60 never names a colour nearer another one.
BACKGROUND_THRESHOLD: float = 60.0

SKIN_TONES: dict[str, RGB] = {
    "porcelain": (255, 228, 206),
    "ivory": (246, 206, 172),
    "peach": (238, 186, 150),
    "sand": (222, 170, 120),
    "tan": (198, 140, 96),
    "bronze": (168, 110, 72),
    "umber": (128, 82, 54),
    "ebony": (92, 58, 40),
}
HAIR_COLORS: dict[str, RGB] = {
    "black": (28, 24, 26),
    "dark_brown": (72, 44, 28),
    "chestnut": (128, 72, 36),
    "ginger": (214, 104, 36),
    "blonde": (236, 204, 112),
    "platinum": (244, 240, 222),
    "silver": (176, 178, 186),
    "pink": (236, 120, 176),
}
EYE_COLORS: dict[str, RGB] = {
    "brown": (110, 64, 30),
    "dark": (40, 28, 24),
    "blue": (60, 130, 220),
    "green": (60, 150, 80),
    "hazel": (150, 120, 50),
    "gray": (120, 132, 144),
}
GLASSES_COLORS: dict[str, RGB] = {
    "black": (22, 22, 28),
    "tortoise": (120, 70, 35),
    "gold": (205, 165, 60),
    "teal": (30, 135, 135),
}
FACE_SHAPES: tuple[str, ...] = ("round", "oval", "square", "long", "heart", "pear")
HAIR_STYLES: tuple[str, ...] = ("bald", "short", "spiky", "curly", "afro", "long", "bob", "side_part", "mohawk")
EYEBROW_STYLES: tuple[str, ...] = ("thin", "thick", "arched", "angled")
NOSE_SHAPES: tuple[str, ...] = ("button", "long", "wide", "pointy")
EAR_SHAPES: tuple[str, ...] = ("small", "big", "pointy")
GLASSES: tuple[str, ...] = ("none", "round", "square")
FACIAL_HAIR: tuple[str, ...] = ("none", "beard", "moustache", "goatee")

HAT_COLOR: RGB = (46, 40, 56)
HAT_BAND: RGB = (238, 226, 196)
MOUTH_DARK: RGB = (110, 26, 40)
LIP: RGB = (150, 52, 60)
LIP_ON_DARK: RGB = (214, 120, 124)  # lips and mouth lines on skin tones darker than `_DARK_SKIN` luminance
_DARK_SKIN = 130.0
TEETH: RGB = (250, 250, 245)

SUPERSAMPLE = 4  # render at 4x and box-filter down
_UNIT = 64  # geometry is written in the pixels of a 64x64 image and scaled to `size`


# ---------------------------------------------------------------------------------------------------------------------
# Identity and Scene
# ---------------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, options: Sequence[Any]) -> None:
    if value not in options:
        raise HyperdiffError(f"`{name}` must be one of {list(options)}, got {value!r}")


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HyperdiffError(f"`{name}` must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Identity:
    """Everything that makes one SynthFaces person; fixed by its seed (see `from_seed`)."""

    seed: int
    face_shape: str
    face_width: float  # multiplies the head half-width (14.5 px at 64x64)
    face_height: float  # multiplies the head half-height (17.5 px at 64x64)
    skin: str
    hair_style: str
    hair_color: str  # also eyebrows and facial hair
    eye_color: str
    eye_size: float
    eye_spacing: float
    eyebrow_style: str
    nose: str
    mouth_width: float
    ears: str
    glasses: str
    glasses_color: str | None  # None exactly when `glasses == "none"`
    freckles: bool
    facial_hair: str
    offset_x: float  # pose jitter, in pixels of a 64x64 image
    offset_y: float
    scale: float

    def __post_init__(self) -> None:
        _check_count("seed", self.seed)
        _check_choice("face_shape", self.face_shape, FACE_SHAPES)
        _check_choice("skin", self.skin, tuple(SKIN_TONES))
        _check_choice("hair_style", self.hair_style, HAIR_STYLES)
        _check_choice("hair_color", self.hair_color, tuple(HAIR_COLORS))
        _check_choice("eye_color", self.eye_color, tuple(EYE_COLORS))
        _check_choice("eyebrow_style", self.eyebrow_style, EYEBROW_STYLES)
        _check_choice("nose", self.nose, NOSE_SHAPES)
        _check_choice("ears", self.ears, EAR_SHAPES)
        _check_choice("glasses", self.glasses, GLASSES)
        if self.glasses == "none":
            _check_choice("glasses_color", self.glasses_color, (None,))
        else:
            _check_choice("glasses_color", self.glasses_color, tuple(GLASSES_COLORS))
        if not isinstance(self.freckles, bool):
            raise HyperdiffError(f"`freckles` must be True or False, got {self.freckles!r}")
        _check_choice("facial_hair", self.facial_hair, FACIAL_HAIR)
        for name, lo, hi in _CONTINUOUS:
            check_number_in(name, getattr(self, name), lo, hi)

    @classmethod
    def from_seed(cls, seed: int) -> Identity:
        """The identity of `seed` (any integer >= 0); deterministic, touches no global RNG."""
        _check_count("seed", seed)
        rng = random.Random(seed)
        glasses = rng.choices(GLASSES, weights=(2, 1, 1))[0]
        return cls(
            seed=seed,
            face_shape=rng.choice(FACE_SHAPES),
            face_width=round(rng.uniform(0.92, 1.08), 4),
            face_height=round(rng.uniform(0.92, 1.06), 4),
            skin=rng.choice(tuple(SKIN_TONES)),
            hair_style=rng.choice(HAIR_STYLES),
            hair_color=rng.choice(tuple(HAIR_COLORS)),
            eye_color=rng.choice(tuple(EYE_COLORS)),
            eye_size=round(rng.uniform(0.85, 1.2), 4),
            eye_spacing=round(rng.uniform(0.88, 1.12), 4),
            eyebrow_style=rng.choice(EYEBROW_STYLES),
            nose=rng.choice(NOSE_SHAPES),
            mouth_width=round(rng.uniform(0.8, 1.2), 4),
            ears=rng.choice(EAR_SHAPES),
            glasses=glasses,
            glasses_color=None if glasses == "none" else rng.choice(tuple(GLASSES_COLORS)),
            freckles=rng.random() < 0.3,
            facial_hair=rng.choices(FACIAL_HAIR, weights=(4, 2, 2, 1))[0],
            offset_x=round(rng.uniform(-1.5, 1.5), 4),
            offset_y=round(rng.uniform(-1.0, 1.0), 4),
            scale=round(rng.uniform(0.96, 1.04), 4),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every attribute."""
        return asdict(self)

    def traits(self) -> tuple[Any, ...]:
        """The discrete attributes (what a viewer names), without seed and continuous jitter."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in _NOT_TRAITS)


_CONTINUOUS = (
    ("face_width", 0.92, 1.08),
    ("face_height", 0.92, 1.06),
    ("eye_size", 0.85, 1.2),
    ("eye_spacing", 0.88, 1.12),
    ("mouth_width", 0.8, 1.2),
    ("offset_x", -1.5, 1.5),
    ("offset_y", -1.0, 1.0),
    ("scale", 0.96, 1.04),
)
_NOT_TRAITS = {"seed"} | {name for name, _, _ in _CONTINUOUS}


@dataclass(frozen=True)
class Scene:
    """What a prompt controls: background word, hat or not, expression word."""

    background: str = "gray"
    hat: bool = False
    expression: str = "neutral"

    def __post_init__(self) -> None:
        _check_choice("background", self.background, BACKGROUNDS)
        if not isinstance(self.hat, bool):
            raise HyperdiffError(f"`hat` must be True or False, got {self.hat!r}")
        _check_choice("expression", self.expression, EXPRESSIONS)

    @classmethod
    def random(cls, rng: random.Random | np.random.Generator) -> Scene:
        """A scene drawn uniformly (each field independently) from a local `random.Random` or numpy Generator."""
        if isinstance(rng, random.Random):
            pick = lambda options: options[rng.randrange(len(options))]
        elif isinstance(rng, np.random.Generator):
            pick = lambda options: options[int(rng.integers(len(options)))]
        else:
            raise HyperdiffError(f"`rng` must be a random.Random or numpy.random.Generator, got {type(rng).__name__}")
        return cls(
            background=pick(BACKGROUNDS), hat=pick(SCENE_WORDS["hat"]), expression=pick(EXPRESSIONS)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def all_scenes() -> Iterator[Scene]:
    """Every scene, in a fixed order (background, then hat, then expression)."""
    for background in BACKGROUNDS:
        for hat in SCENE_WORDS["hat"]:
            for expression in EXPRESSIONS:
                yield Scene(background, hat, expression)


def sample(seed_range: range, n: int, rng_seed: int) -> list[tuple[Identity, Scene]]:
    """`n` (identity, scene) pairs: identity seeds uniform in `seed_range`, scenes uniform; deterministic in `rng_seed`."""
    if not isinstance(seed_range, range) or len(seed_range) == 0:
        raise HyperdiffError(f"`seed_range` must be a non-empty range, got {seed_range!r}")
    if seed_range.start < 0 or seed_range[-1] < 0:
        raise HyperdiffError(f"`seed_range` must hold non-negative seeds, got {seed_range!r}")
    _check_count("n", n)
    _check_count("rng_seed", rng_seed)
    rng = random.Random(rng_seed)
    out = []
    for _ in range(n):
        identity = Identity.from_seed(seed_range[rng.randrange(len(seed_range))])
        out.append((identity, Scene.random(rng)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z]+")


def caption(scene: Scene, token: str | None = None) -> str:
    """`"a <token> face, <expression>[, wearing a hat], on a <background> background"` (no token: `"a face, ..."`)."""
    if not isinstance(scene, Scene):
        raise HyperdiffError(f"`scene` must be a Scene, got {type(scene).__name__}")
    if token is not None and (not isinstance(token, str) or not _TOKEN.fullmatch(token)):
        raise HyperdiffError(f"`token` must be one lowercase word of letters (like 'sks') or None, got {token!r}")
    return scene_words(f"a {token} face" if token else "a face", scene.expression, scene.hat, scene.background)


def scene_words(subject: str, expression: str, hat: bool, background: str | None) -> str:
    """The caption's word order for `subject`: `"<subject>, <expression>[, wearing a hat][, on a <background>
    background]"` (no background clause for None: a scene whose background is none of `PALETTE`)."""
    parts = [subject, expression] + (["wearing a hat"] if hat else [])
    return ", ".join(parts + ([f"on a {background} background"] if background is not None else []))


def scene_from_caption(text: str) -> Scene:
    """Parse the scene a caption or prompt asks for.

    Needs exactly one `"<colour> background"` and exactly one expression word; the hat is on when the word "hat"
    appears and is not preceded by "no"/"without" (`caption(scene)` always round-trips).
    """
    if not isinstance(text, str):
        raise HyperdiffError(f"`text` must be a string, got {type(text).__name__}")
    words = re.findall(r"[a-z]+", text.lower())
    backgrounds = {w for w, nxt in itertools.pairwise(words) if nxt == "background" and w in PALETTE}
    if len(backgrounds) != 1:
        raise HyperdiffError(
            f"`text` must name exactly one background ('on a <colour> background', colour one of {list(BACKGROUNDS)}),"
            f" got {text!r}"
        )
    expressions = {w for w in words if w in EXPRESSIONS}
    if len(expressions) != 1:
        raise HyperdiffError(f"`text` must name exactly one expression of {list(EXPRESSIONS)}, got {text!r}")
    hat = False
    for i, word in enumerate(words):
        if word == "hat":
            before = words[max(0, i - 2) : i]
            hat = not ({"no", "without"} & set(before))
    return Scene(background=backgrounds.pop(), hat=hat, expression=expressions.pop())


# ---------------------------------------------------------------------------------------------------------------------
# Background detection
# ---------------------------------------------------------------------------------------------------------------------


def corner_mean(image: Image.Image | np.ndarray) -> np.ndarray:
    """Mean RGB (0..255) over the four `k x k` corner patches, `k = min(height, width) // 8`."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        array = image
    else:
        raise HyperdiffError(
            f"`image` must be a PIL image or a uint8 array of shape (H, W, 3), got {type(image).__name__}"
            + (f" {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else "")
        )
    k = min(array.shape[:2]) // 8
    if k < 1:
        raise HyperdiffError(f"`image` must be at least 8x8 pixels, got {array.shape[1]}x{array.shape[0]}")
    patches = [array[:k, :k], array[:k, -k:], array[-k:, :k], array[-k:, -k:]]
    return np.mean([p.reshape(-1, 3).astype(np.float64).mean(0) for p in patches], axis=0)


def background_of(image: Image.Image | np.ndarray) -> str | None:
    """The `PALETTE` word nearest the corner mean, or None if it is farther than `BACKGROUND_THRESHOLD` (RGB 0..255)."""
    mean = corner_mean(image)
    names = list(PALETTE)
    distances = np.linalg.norm(np.array([PALETTE[n] for n in names], dtype=np.float64) - mean, axis=1)
    best = int(np.argmin(distances))
    return names[best] if distances[best] <= BACKGROUND_THRESHOLD else None


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------

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


__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_THRESHOLD",
    "EAR_SHAPES",
    "EVAL_SEED_START",
    "EXPRESSIONS",
    "EYEBROW_STYLES",
    "EYE_COLORS",
    "FACE_SHAPES",
    "FACIAL_HAIR",
    "GLASSES",
    "GLASSES_COLORS",
    "HAIR_COLORS",
    "HAIR_STYLES",
    "NOSE_SHAPES",
    "PALETTE",
    "SCENE_WORDS",
    "SKIN_TONES",
    "TRAIN_SEEDS",
    "VAL_SEEDS",
    "Identity",
    "Scene",
    "all_scenes",
    "background_of",
    "caption",
    "corner_mean",
    "eval_seeds",
    "render",
    "sample",
    "scene_from_caption",
]
