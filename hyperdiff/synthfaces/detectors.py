"""Scene fidelity on the SynthFaces world: does an image obey the scene words of its prompt, and what scene does it show.

Contract
--------
* `scene_fidelity(image, scene) -> dict` with `"background"`, `"hat"`, `"expression"` (bool: the image obeys that
  word of `scene`), `"all"` (all three), and the detected values `"detected_background"` (a `PALETTE` word or None,
  read from the corners with `synthfaces.background_of`), `"detected_hat"` (bool), `"detected_expression"` (word).
  `scene` may be a `Scene` or a caption/prompt string (parsed with `synthfaces.scene_from_caption`).
  `detect_scene(image) -> Scene | None` (None when no palette background is found). `reference_caption(image)`
  -> the caption template ("a {token} face, ...") of what the image shows: the fine-tune's words when none is typed.
* Each takes one image (a PIL image or a float tensor (3, H, W) in [0, 1]) and an `IdentityEncoder` whose heads read
  hat and expression (None = `default_encoder()`, the shipped one, loaded once per process).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from PIL import Image

from hyperdiff.errors import HyperdiffError
from hyperdiff.synthfaces.captions import scene_from_caption, scene_words
from hyperdiff.synthfaces.encoder import IdentityEncoder
from hyperdiff.synthfaces.world import Scene


@functools.lru_cache(maxsize=1)
def _shipped_encoder() -> IdentityEncoder:
    return IdentityEncoder.from_pretrained()


def default_encoder() -> IdentityEncoder:
    """The shipped encoder, loaded once per process (shared: do not train or move it)."""
    return _shipped_encoder()


def _encoder(encoder: IdentityEncoder | None) -> IdentityEncoder:
    if encoder is None:
        return default_encoder()
    if not isinstance(encoder, IdentityEncoder):
        raise HyperdiffError(f"`encoder` must be an IdentityEncoder or None, got {type(encoder).__name__}")
    return encoder


def _one_image(image: Any) -> Any:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor) and (image.ndim == 3 or (image.ndim == 4 and image.shape[0] == 1)):
        return image
    raise HyperdiffError(
        "`image` must be one PIL image or a float tensor (3, H, W) in [0, 1], got "
        + (f"a tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__)
    )


def detect_scene(image: Any, encoder: IdentityEncoder | None = None) -> Scene | None:
    """The scene an image shows (background from the corners, hat and expression from the encoder's heads), or None
    when the corners match no `PALETTE` colour."""
    found = _encoder(encoder).detect(_one_image(image))[0]
    if found["background"] is None:
        return None
    return Scene(found["background"], found["hat"], found["expression"])


def reference_caption(image: Any, encoder: IdentityEncoder | None = None) -> str:
    """What a SynthFaces reference shows, as a fine-tune caption template naming the subject `{token}`: the
    expression and hat the encoder's heads read and the background its corners show (left out when they match no
    `PALETTE` colour), e.g. "a {token} face, neutral, wearing a hat, on a green background". The words keep the
    reference's scene out of the token (`HyperDreamBoothPipeline.personalize` reads it when no caption is given)."""
    found = _encoder(encoder).detect(_one_image(image))[0]
    return scene_words("a {token} face", found["expression"], found["hat"], found["background"])


SCENE_CHECKS = ("background", "hat", "expression")  # the scene words `scene_fidelity` checks: its first keys


def scene_fidelity(image: Any, scene: Scene | str, encoder: IdentityEncoder | None = None) -> dict[str, Any]:
    """Which scene words of `scene` (a Scene or a caption/prompt) `image` obeys, plus what was detected."""
    if isinstance(scene, str):
        scene = scene_from_caption(scene)
    if not isinstance(scene, Scene):
        raise HyperdiffError(f"`scene` must be a Scene or a caption string, got {type(scene).__name__}")
    found = _encoder(encoder).detect(_one_image(image))[0]
    out = {word: found[word] == getattr(scene, word) for word in SCENE_CHECKS}
    out["all"] = all(out.values())
    out.update({f"detected_{k}": v for k, v in found.items()})
    return out


__all__ = ["SCENE_CHECKS", "default_encoder", "detect_scene", "reference_caption", "scene_fidelity"]
