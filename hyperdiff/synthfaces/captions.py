"""SynthFaces scenes in words and back: captions, the scene a caption asks for, the background an image shows.

Contract
--------
* **Captions.** `caption(scene, token)` gives e.g. ``"a sks face, smiling, wearing a hat, on a blue background"``
  (``"a face, ..."`` without a token; no hat clause without a hat); every word is one token of
  `hyperdiff.models.tokenizer.build_tokenizer()`. `scene_from_caption` parses one back.
* **Backgrounds.** A render's four `k x k` corner patches, `k = size // 8`, are exactly its background colour (`faces`).
  `background_of(image)` reads the background back from them: the `PALETTE` word nearest the corner mean, or None
  when that is farther than `BACKGROUND_THRESHOLD` (60 RGB units).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
from PIL import Image

from hyperdiff.errors import HyperdiffError
from hyperdiff.synthfaces.world import BACKGROUNDS, EXPRESSIONS, PALETTE, Scene

# Largest RGB distance (0..255 scale) from the corner mean to the nearest palette colour that `background_of` still
# names; the closest two palette colours (blue, purple) are ~106 apart, so 60 never names a colour nearer another one.
BACKGROUND_THRESHOLD: float = 60.0


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


__all__ = ["BACKGROUND_THRESHOLD", "background_of", "caption", "corner_mean", "scene_from_caption"]
