"""SynthFaces: the procedural world hyperdiff trains and judges on, offline: its identities, scenes and seed ranges.

The world's captions are `captions`, its renders `faces`; the package `hyperdiff.synthfaces` exports the three's names.

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
* **Seed ranges** (the one place they are defined):

  - `TRAIN_SEEDS = range(0, 900_000)`: identities for training (base model, identity encoder, hypernet).
  - `VAL_SEEDS = range(900_000, 1_000_000)`: held-out identities for validation during training.
  - every seed `>= EVAL_SEED_START = 1_000_000` is reserved for evaluation and never used in training;
    `eval_seeds(n)` gives the first `n` of them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

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


__all__ = [
    "BACKGROUNDS",
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
    "eval_seeds",
    "sample",
]
