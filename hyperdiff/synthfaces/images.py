"""Images as the SynthFaces encoders read them: PIL images and float tensors in [0, 1].

Contract: `to_batch(images, size, what)` takes a PIL image, a list/tuple of PIL images, or a float tensor
`(N, 3, H, W)` (or `(3, H, W)` for one image) with values in [0, 1], and gives a float tensor `(N, 3, size, size)`:
anything not `size` x `size` is resized with antialiased bilinear interpolation (PIL images go through the same tensor
path, so both give the same numbers); `size=None` keeps the native size. Bad input is a one-line `HyperdiffError`
naming `what`. `pil_to_tensor` and `tensor_to_pil` convert one image each way (8-bit, rounded).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hyperdiff.errors import HyperdiffError

_IMAGES_EXPECTED = "a PIL image, a list of PIL images, or a float tensor (N, 3, H, W) with values in [0, 1]"


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """One PIL image as a float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def to_batch(images: Any, size: int | None = 64, what: str = "images") -> torch.Tensor:
    """`images` (see the module contract) as a float tensor (N, 3, size, size) in [0, 1]; `size=None` keeps the
    native size (all images must then share it)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise HyperdiffError(f"`{what}` must not be empty, expected {_IMAGES_EXPECTED}")
        bad = next((im for im in images if not isinstance(im, Image.Image)), None)
        if bad is not None:
            raise HyperdiffError(f"`{what}` must hold PIL images only, got an element of type {type(bad).__name__}")
        if size is None and len({im.size for im in images}) != 1:
            raise HyperdiffError(f"`{what}` must all have the same size, got {sorted({im.size for im in images})}")
        return torch.cat([_resize(pil_to_tensor(im)[None], size) for im in images])
    if not isinstance(images, torch.Tensor):
        raise HyperdiffError(f"`{what}` must be {_IMAGES_EXPECTED}, got {type(images).__name__}")
    batch = images.detach()
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[0] == 0 or min(batch.shape[2:]) < 8:
        raise HyperdiffError(
            f"`{what}` tensor must have shape (N, 3, H, W) with N >= 1 and H, W >= 8, got {tuple(images.shape)}"
        )
    if not batch.is_floating_point():
        raise HyperdiffError(f"`{what}` tensor must be floating point with values in [0, 1], got dtype {batch.dtype}")
    batch = batch.float()
    if not torch.isfinite(batch).all():
        raise HyperdiffError(f"`{what}` tensor contains NaN or Inf values")
    lo, hi = batch.min().item(), batch.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise HyperdiffError(
            f"`{what}` tensor values must lie in [0, 1], got min {lo:.3g} max {hi:.3g} (from [-1, 1] use (x + 1) / 2)"
        )
    return _resize(batch.clamp(0.0, 1.0), size)


def _resize(batch: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A float tensor (3, H, W) in [0, 1] as an 8-bit PIL image."""
    array = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


__all__ = ["pil_to_tensor", "tensor_to_pil", "to_batch"]
