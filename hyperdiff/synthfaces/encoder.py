"""Metrics on the SynthFaces world: an identity encoder (the role face recognition plays in HyperDreamBooth's table)
and scene fidelity (does an image obey the scene words of its prompt).

Contract
--------
* **IdentityEncoder** — two small CNNs in one module (~0.4 M parameters, 0.8 MB in fp16). The identity trunk
  (64x64 RGB -> 4 stride-2 conv stages with GroupNorm -> [global average, global max] pool) feeds a 128-d
  L2-normalised identity embedding (MLP projection) and, flattened (position-aware), a hat head (2 classes); a
  full-resolution trunk on the face crop (brows, eyes, mouth) feeds the expression head (4 classes,
  `synthfaces.EXPRESSIONS` order). It is trained by `scripts/train_identity_encoder.py --config
  configs/identity_encoder.yaml` on identities from `synthfaces.TRAIN_SEEDS` only (validated on `VAL_SEEDS`, reported
  on `eval_seeds`, i.e. seeds >= 1,000,000) so that renders of one identity in different scenes (background, hat,
  expression) embed close together and different identities apart; random augmentations that a generated image may
  show (background recoloured at random, +-2 px shifts, small zoom/rotation, blur, face colour jitter, noise) make
  it ignore the background colour and transfer to generated images.
* `IdentityEncoder.from_pretrained(path=None)`: no argument = the shipped weights in
  `hyperdiff/assets/synthfaces/identity_encoder/` (`config.json` + fp16 `model.safetensors`); `save_pretrained(path)`
  writes the same two files atomically. A loaded encoder is in eval mode with gradients off; every call is
  deterministic (same input -> same output).
* Images in (`embed`, `similarity`, `classify`, `detect`): a PIL image, a list/tuple of PIL images, or a float tensor
  `(N, 3, H, W)` (or `(3, H, W)` for one image) with values in [0, 1]. Anything not 64x64 is resized with antialiased
  bilinear interpolation (PIL images go through the same tensor path, so both give the same numbers).
* `embed(images) -> (N, d)` float32, unit rows. `similarity(a, b)`: `a`, `b` are images or embeddings (a 2-D float
  tensor `(N, d)`); it returns the cosine similarity **row-wise**: `(N,)` with `out[i] = cos(a[i], b[i])` for equal
  lengths, one side of length 1 is broadcast against the other; `matrix=True` gives all pairs `(N, M)`.
  `same_identity(a, b)` compares that similarity with `threshold`, the equal-error-rate threshold measured on
  augmented validation renders at training time (stored in `config.json`) — the analogue of "face recognition success".
* `scene_fidelity(image, scene) -> dict` with `"background"`, `"hat"`, `"expression"` (bool: the image obeys that
  word of `scene`), `"all"` (all three), and the detected values `"detected_background"` (a `PALETTE` word or None,
  read from the corners with `synthfaces.background_of`), `"detected_hat"` (bool), `"detected_expression"` (word).
  `scene` may be a `Scene` or a caption/prompt string (parsed with `synthfaces.scene_from_caption`).
  `detect_scene(image) -> Scene | None` (None when no palette background is found). `reference_caption(image)`
  -> the caption template ("a {token} face, ...") of what the image shows: the fine-tune's words when none is typed.
* `roc_auc(positive_scores, negative_scores)`: area under the ROC curve (Mann-Whitney, ties count one half), plain numpy.
* Bad input (wrong type, shape, value range, a missing or incomplete weights folder) raises a one-line `HyperdiffError`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from hyperdiff.config import from_dict, to_dict
from hyperdiff.core.files import atomic_path, read_safetensors, write_safetensors
from hyperdiff.errors import HyperdiffError, check_number_in, check_positive_int
from hyperdiff.inputs import ASSETS_DIR
from hyperdiff.synthfaces.world import EXPRESSIONS, TRAIN_SEEDS, Scene, background_of, scene_from_caption, scene_words

DEFAULT_ENCODER_DIR: Path = ASSETS_DIR / "synthfaces" / "identity_encoder"
# A second encoder, trained like the first with another seed (`train_identity_encoder.py --seed 1`): it judges the ID
# similarity of hypernets trained against the first one (`HypernetTrainConfig.identity_weight`)
JUDGE_ENCODER_DIR: Path = DEFAULT_ENCODER_DIR.with_name("judge_encoder")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MODEL_TYPE = "hyperdiff.IdentityEncoder"
_EMBED_BATCH = 256  # images per forward pass inside `embed`/`classify`


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------




@dataclass(frozen=True)
class IdentityEncoderConfig:
    """Architecture: two small CNNs, each conv 3x3 (the identity stem 5x5) + GroupNorm(`groups`) + ReLU.

    * identity trunk on the whole image: stage i has `blocks[i]` convs of `channels[i]` channels, the first with
      stride 2; its final map is pooled (`pool`: "avg" or "avgmax" = [average, max]) into the embedding MLP
      (`hidden_dim` -> `embed_dim`, L2-normalised) and flattened into the hat head (position-aware: SynthFaces faces
      sit at a fixed place);
    * expression trunk on the full-resolution face crop `expression_crop` = (top, bottom, left, right) in pixels of a
      64x64 image (brows, eyes and mouth): convs of `expression_channels` with `expression_strides`, flattened into the
      expression head.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 96, 128)
    blocks: tuple[int, ...] = (2, 2, 1, 1)
    groups: int = 8
    pool: str = "avgmax"
    hidden_dim: int = 128
    embed_dim: int = 128
    expression_channels: tuple[int, ...] = (32, 32, 64, 64, 64)
    expression_strides: tuple[int, ...] = (1, 2, 1, 2, 1)
    expression_crop: tuple[int, ...] = (20, 56, 12, 52)

    def __post_init__(self) -> None:
        for name in ("image_size", "groups", "hidden_dim", "embed_dim"):
            check_positive_int(name, getattr(self, name))
        if self.pool not in ("avg", "avgmax"):
            raise HyperdiffError(f"`pool` must be one of ['avg', 'avgmax'], got {self.pool!r}")
        for name in ("channels", "blocks", "expression_channels", "expression_strides", "expression_crop"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value:
                raise HyperdiffError(f"`{name}` must be a non-empty list of positive integers, got {value!r}")
            for v in value:
                check_positive_int(f"{name}[i]", v)
        if len(self.blocks) != len(self.channels):
            raise HyperdiffError(f"`blocks` must be as long as `channels` ({len(self.channels)}), got {list(self.blocks)}")
        if len(self.expression_strides) != len(self.expression_channels):
            raise HyperdiffError(
                f"`expression_strides` must be as long as `expression_channels` ({len(self.expression_channels)}),"
                f" got {list(self.expression_strides)}"
            )
        for c in self.channels + self.expression_channels:
            if c % self.groups:
                raise HyperdiffError(f"channel counts must all be multiples of `groups` ({self.groups}), got {c}")
        if self.image_size % 2 ** len(self.channels):
            raise HyperdiffError(
                f"`image_size` must be a multiple of 2**len(channels) = {2 ** len(self.channels)}, got {self.image_size}"
            )
        if self.image_size % 64:
            raise HyperdiffError(f"`image_size` must be a multiple of 64, got {self.image_size}")
        top, bottom, left, right = self.expression_crop if len(self.expression_crop) == 4 else (0, 0, 0, 0)
        if not (0 <= top < bottom <= 64 and 0 <= left < right <= 64):
            raise HyperdiffError(
                f"`expression_crop` must be (top, bottom, left, right) inside 64x64, got {list(self.expression_crop)}"
            )

    def crop_box(self) -> tuple[int, int, int, int]:
        """`expression_crop` in pixels of `image_size`."""
        k = self.image_size // 64
        return tuple(v * k for v in self.expression_crop)  # type: ignore[return-value]


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes a generated image may show; applied per sample (see `augment`)."""

    p_clean: float = 0.1  # probability that a sample is left untouched
    p_background: float = 0.6  # probability of recolouring the background (exact-background pixels) uniformly at random
    face_jitter: float = 0.08  # per-channel gain on the face pixels in [1 - j, 1 + j]
    shift_px: float = 2.0  # translation, pixels of a 64x64 image, uniform in [-s, s] per axis
    scale: float = 0.04  # zoom in [1 - s, 1 + s]
    rotate_deg: float = 4.0  # rotation in [-r, r] degrees
    p_blur: float = 0.5
    blur_sigma: float = 1.0  # gaussian blur sigma uniform in [0.3, blur_sigma] (pixels of a 64x64 image)
    brightness: float = 0.05  # global offset in [-b, b]
    contrast: float = 0.08  # global contrast in [1 - c, 1 + c]
    noise_std: float = 0.05  # gaussian noise with std uniform in [0, noise_std]

    def __post_init__(self) -> None:
        for name in ("p_clean", "p_background", "p_blur", "face_jitter", "scale", "contrast", "noise_std"):
            check_number_in(name, getattr(self, name), 0.0, 1.0)
        check_number_in("shift_px", self.shift_px, 0.0, 16.0)
        check_number_in("rotate_deg", self.rotate_deg, 0.0, 45.0)
        check_number_in("blur_sigma", self.blur_sigma, 0.3, 4.0)
        check_number_in("brightness", self.brightness, 0.0, 0.5)


@dataclass(frozen=True)
class IdentityEncoderTrainingConfig:
    """Training recipe of `scripts/train_identity_encoder.py` (YAML: `configs/identity_encoder.yaml`)."""

    seed: int = 0
    steps: int = 900
    identities_per_batch: int = 16  # P
    scenes_per_identity: int = 4  # K: each batch holds P x K renders
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 2.0
    temperature: float = 0.1  # supervised-contrastive temperature
    hard_fraction: float = 0.5  # share of each batch's identities that are "coarse twins" (same skin, hair style and
    #                             hair colour) of another identity in the batch: hard negatives
    hard_pool: int = 100_000  # twins are drawn from the first `hard_pool` TRAIN_SEEDS (indexed once at start)
    eval_twin_pool: int = 50_000  # validation/evaluation twins come from this many seeds after the evaluated ones
    hat_weight: float = 0.5
    expression_weight: float = 1.0
    threads: int = 1
    val_every: int = 300  # 0: validate only at the end
    val_identities: int = 200  # first n of VAL_SEEDS, two random scenes each
    eval_identities: int = 300  # first n of eval_seeds (>= 1,000,000), final report only
    model: IdentityEncoderConfig = field(default_factory=IdentityEncoderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise HyperdiffError(f"`seed` must be a non-negative integer, got {self.seed!r}")
        for name in ("steps", "identities_per_batch", "threads", "val_identities", "eval_identities"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("scenes_per_identity", self.scenes_per_identity)
        if self.scenes_per_identity < 2:
            raise HyperdiffError(f"`scenes_per_identity` must be at least 2, got {self.scenes_per_identity}")
        for name in ("warmup_steps", "val_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise HyperdiffError(f"`{name}` must be a non-negative integer, got {getattr(self, name)!r}")
        check_number_in("lr", self.lr, 1e-7, 1.0)
        check_number_in("weight_decay", self.weight_decay, 0.0, 1.0)
        check_number_in("grad_clip", self.grad_clip, 0.0, 1e6)
        check_number_in("temperature", self.temperature, 1e-3, 10.0)
        check_number_in("hard_fraction", self.hard_fraction, 0.0, 0.5)
        check_positive_int("hard_pool", self.hard_pool)
        check_positive_int("eval_twin_pool", self.eval_twin_pool)
        if self.val_identities + self.eval_twin_pool > 100_000:
            raise HyperdiffError("`val_identities` + `eval_twin_pool` must be at most 100000 (the size of VAL_SEEDS)")
        if self.hard_pool > len(TRAIN_SEEDS):
            raise HyperdiffError(f"`hard_pool` must be at most {len(TRAIN_SEEDS)} (TRAIN_SEEDS), got {self.hard_pool}")
        check_number_in("hat_weight", self.hat_weight, 0.0, 100.0)
        check_number_in("expression_weight", self.expression_weight, 0.0, 100.0)


# ---------------------------------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation (training, robustness checks)
# ---------------------------------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(
    images: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig(),
    background_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Randomly perturb a float batch (N, 3, H, W) in [0, 1] the way a generated image might differ from a render.

    `background_mask` (N, 1, H, W), 1 where a pixel is exactly the background colour, enables background recolouring
    and restricts the colour jitter to the face. Every random number comes from `generator` (CPU), in a fixed order.
    """
    x = images.float().clone()
    n, _, h, w = x.shape
    g = generator
    keep = torch.rand(n, generator=g) < config.p_clean
    original = x.clone()
    face = torch.ones(n, 1, h, w) if background_mask is None else 1.0 - background_mask.float()
    # face colour jitter (per-channel gain on non-background pixels)
    gain = 1.0 + _uniform(n * 3, -config.face_jitter, config.face_jitter, g).view(n, 3, 1, 1)
    x = x * (1.0 + face * (gain - 1.0))
    # background recolouring
    colour = torch.rand(n, 3, 1, 1, generator=g)
    recolour = (torch.rand(n, generator=g) < config.p_background).float().view(n, 1, 1, 1)
    if background_mask is not None:
        m = background_mask.float() * recolour
        x = x * (1.0 - m) + colour * m
    # geometry: shift, scale, rotation (border padding repeats the background)
    shift = _uniform(n * 2, -config.shift_px, config.shift_px, g).view(n, 2) * (2.0 / w)
    zoom = 1.0 + _uniform(n, -config.scale, config.scale, g)
    angle = _uniform(n, -config.rotate_deg, config.rotate_deg, g) * (math.pi / 180.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # blur: per-sample gaussian (sigma 0 = identity kernel)
    sigma = _uniform(n, 0.3, config.blur_sigma, g) * (w / 64.0)
    sigma = sigma * (torch.rand(n, generator=g) < config.p_blur).float()
    radius = max(1, math.ceil(3 * config.blur_sigma * w / 64.0))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, 2r+1); sigma ~0 -> a delta
    k = kernel.repeat_interleave(3, 0)  # (n*3, taps)
    y = x.reshape(1, n * 3, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * 3)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=n * 3)
    x = y.view(n, 3, h, w)
    # global brightness / contrast, then noise
    contrast = 1.0 + _uniform(n, -config.contrast, config.contrast, g).view(n, 1, 1, 1)
    bright = _uniform(n, -config.brightness, config.brightness, g).view(n, 1, 1, 1)
    x = (x - 0.5) * contrast + 0.5 + bright
    std = _uniform(n, 0.0, config.noise_std, g).view(n, 1, 1, 1)
    x = x + std * torch.randn(x.shape, generator=g)
    x = x.clamp(0.0, 1.0)
    return torch.where(keep.view(n, 1, 1, 1), original, x)


# ---------------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------------


def roc_auc(positive_scores: Any, negative_scores: Any) -> float:
    """ROC AUC: the probability that a positive scores above a negative (ties count 1/2); Mann-Whitney U with
    average ranks, O((P + N) log(P + N)), plain numpy."""
    pos = np.asarray(torch.as_tensor(positive_scores).detach().cpu().double().flatten())
    neg = np.asarray(torch.as_tensor(negative_scores).detach().cpu().double().flatten())
    if pos.size == 0 or neg.size == 0:
        raise HyperdiffError(f"`roc_auc` needs at least one positive and one negative score, got {pos.size} and {neg.size}")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank over runs of ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], scores.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def equal_error_threshold(positive_scores: Any, negative_scores: Any) -> float:
    """The threshold where the false-reject rate of positives equals the false-accept rate of negatives."""
    pos = torch.as_tensor(positive_scores).double().flatten().sort().values
    neg = torch.as_tensor(negative_scores).double().flatten().sort().values
    candidates = torch.cat([pos, neg]).unique()
    frr = torch.searchsorted(pos, candidates, right=False).double() / pos.numel()  # positives below t
    far = 1.0 - torch.searchsorted(neg, candidates, right=False).double() / neg.numel()  # negatives >= t
    best = int(torch.argmin((frr - far).abs()))
    return float(candidates[best])


# ---------------------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int, stride: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)]


def _after_conv(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # "same" padding


class IdentityEncoder(nn.Module):
    """Identity embedding + hat head (identity trunk) and expression head (face-crop trunk); see the module docstring."""

    def __init__(self, config: IdentityEncoderConfig | None = None, threshold: float = 0.5,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            config = IdentityEncoderConfig()
        if not isinstance(config, IdentityEncoderConfig):
            raise HyperdiffError(f"`config` must be an IdentityEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.threshold = float(threshold)
        self.metadata = dict(metadata or {})  # training config and validation numbers, carried into config.json
        layers: list[nn.Module] = []
        cin = 3
        for i, (cout, n) in enumerate(zip(config.channels, config.blocks)):
            layers += _conv(cin, cout, 5 if i == 0 else 3, 2, config.groups)
            for _ in range(n - 1):
                layers += _conv(cout, cout, 3, 1, config.groups)
            cin = cout
        self.trunk = nn.Sequential(*layers)
        final = config.image_size // 2 ** len(config.channels)
        pooled = config.channels[-1] * (2 if config.pool == "avgmax" else 1)
        self.embed_head = nn.Sequential(nn.Linear(pooled, config.hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(config.hidden_dim, config.embed_dim))
        self.hat_head = nn.Linear(config.channels[-1] * final * final, 2)
        layers, cin = [], 3
        top, bottom, left, right = config.crop_box()
        h, w = bottom - top, right - left
        for cout, stride in zip(config.expression_channels, config.expression_strides):
            layers += _conv(cin, cout, 3, stride, config.groups)
            cin, h, w = cout, _after_conv(h, stride), _after_conv(w, stride)
        self.expression_trunk = nn.Sequential(*layers)
        self.expression_head = nn.Linear(cin * h * w, len(EXPRESSIONS))

    # -- raw forward (training) ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x` (N, 3, S, S) in [0, 1] -> (unit embeddings (N, d), hat logits (N, 2), expression logits (N, 4))."""
        x = x * 2.0 - 1.0
        maps = self.trunk(x)
        h = maps.mean(dim=(2, 3))
        if self.config.pool == "avgmax":
            h = torch.cat([h, maps.amax(dim=(2, 3))], dim=1)
        z = F.normalize(self.embed_head(h), dim=1)
        top, bottom, left, right = self.config.crop_box()
        face = self.expression_trunk(x[:, :, top:bottom, left:right])
        return z, self.hat_head(maps.flatten(1)), self.expression_head(face.flatten(1))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _run(self, images: Any, what: str = "images") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = to_batch(images, self.config.image_size, what)
        was_training = self.training
        self.eval()
        outs: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode():
            for start in range(0, batch.shape[0], _EMBED_BATCH):
                outs.append(self(batch[start : start + _EMBED_BATCH].to(self.device)))
        self.train(was_training)
        return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]

    # -- public API ---------------------------------------------------------------------------------------------------

    def embed(self, images: Any) -> torch.Tensor:
        """Unit-norm identity embeddings (N, d), float32, on the encoder's device."""
        return self._run(images)[0]

    def _embeddings(self, x: Any, what: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim == 2:
            if x.shape[1] != self.config.embed_dim or x.shape[0] == 0 or not x.is_floating_point():
                raise HyperdiffError(
                    f"`{what}` embeddings must be a float tensor (N, {self.config.embed_dim}), got {x.dtype} {tuple(x.shape)}"
                )
            return F.normalize(x.detach().float().to(self.device), dim=1)
        return self._run(x, what)[0]

    def similarity(self, a: Any, b: Any, matrix: bool = False) -> torch.Tensor:
        """Cosine similarity of identity embeddings; `a`, `b` are images or embeddings (N, d).

        Row-wise by default: `(N,)` with `out[i] = cos(a[i], b[i])` for equal lengths (a side of length 1 is
        broadcast). `matrix=True`: every pair, `(N, M)`.
        """
        za, zb = self._embeddings(a, "a"), self._embeddings(b, "b")
        if matrix:
            return za @ zb.T
        if len(za) != len(zb) and 1 not in (len(za), len(zb)):
            raise HyperdiffError(
                f"`a` and `b` must have the same number of items for row-wise similarity (or one of them 1),"
                f" got {len(za)} and {len(zb)}; pass matrix=True for all pairs"
            )
        return (za * zb).sum(dim=1)

    def same_identity(self, a: Any, b: Any) -> torch.Tensor:
        """Row-wise bool: `similarity(a, b) >= threshold` (the analogue of a face-recognition match)."""
        return self.similarity(a, b) >= self.threshold

    def classify(self, images: Any) -> dict[str, torch.Tensor]:
        """`{"hat": P(hat) (N,), "expression": probabilities (N, 4) in EXPRESSIONS order}`."""
        _, hat, expression = self._run(images)
        return {"hat": hat.softmax(1)[:, 1], "expression": expression.softmax(1)}

    def detect(self, images: Any) -> list[dict[str, Any]]:
        """Per image: `{"background": PALETTE word | None, "hat": bool, "expression": word}`; the background is read
        from the corners of the image at its own size (`synthfaces.background_of`)."""
        native = to_batch(images, size=None) if isinstance(images, torch.Tensor) else None
        if native is None:
            to_batch(images)  # validates
            pils = [images] if isinstance(images, Image.Image) else list(images)
            backgrounds = [background_of(im.convert("RGB")) for im in pils]
        else:
            backgrounds = [background_of(tensor_to_pil(im)) for im in native]
        probs = self.classify(images if native is None else native)
        return [
            {"background": bg, "hat": bool(probs["hat"][i] >= 0.5),
             "expression": EXPRESSIONS[int(probs["expression"][i].argmax())]}
            for i, bg in enumerate(backgrounds)
        ]

    # -- files --------------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write `config.json` and `model.safetensors` (weights in `dtype`, fp16 by default) into folder `path`."""
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise HyperdiffError(f"identity encoder folder '{folder}' is a file, expected a folder")
        tensors = {k: v.detach().to("cpu", dtype) for k, v in self.state_dict().items()}
        write_safetensors(folder / WEIGHTS_NAME, tensors,
                          {"format": "pt", "hyperdiff.kind": "identity_encoder",
                           "hyperdiff.format_version": str(FORMAT_VERSION)}, what="identity encoder weights")
        payload = {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "config": to_dict(self.config),
            "same_identity_threshold": self.threshold,
            **{k: v for k, v in self.metadata.items() if k not in ("model_type", "format_version", "config",
                                                                  "same_identity_threshold")},
        }
        with atomic_path(folder / CONFIG_NAME, "identity encoder config") as tmp:
            tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> IdentityEncoder:
        """Load from a folder written by `save_pretrained`; no argument = the shipped SynthFaces encoder."""
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise HyperdiffError(f"`path` must be a folder path or None, got {type(path).__name__}")
        folder = DEFAULT_ENCODER_DIR if path is None else Path(path)
        if not folder.is_dir():
            hint = " (the shipped weights are missing: run scripts/train_identity_encoder.py)" if path is None else ""
            raise HyperdiffError(f"identity encoder folder '{folder}' does not exist{hint}")
        config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise HyperdiffError(f"identity encoder folder '{folder}' has no {f.name}")
        try:
            payload = json.loads(config_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise HyperdiffError(f"identity encoder config '{config_file}' is not valid JSON: {e}") from None
        if not isinstance(payload, dict) or payload.get("model_type") != MODEL_TYPE:
            raise HyperdiffError(f"identity encoder config '{config_file}' must have model_type '{MODEL_TYPE}'")
        config = from_dict(IdentityEncoderConfig, payload.get("config"), where=f"{config_file}:config")
        threshold = payload.get("same_identity_threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise HyperdiffError(f"identity encoder config '{config_file}': same_identity_threshold must be a number")
        metadata = {k: v for k, v in payload.items()
                    if k not in ("model_type", "format_version", "config", "same_identity_threshold")}
        model = cls(config, threshold=float(threshold), metadata=metadata)
        tensors, _ = read_safetensors(weights_file, what="identity encoder weights")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            which = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
            raise HyperdiffError(f"identity encoder weights '{weights_file}' do not match its config: {which}")
        for key, value in expected.items():
            if tensors[key].shape != value.shape:
                raise HyperdiffError(
                    f"identity encoder weights '{weights_file}': tensor '{key}' has shape {tuple(tensors[key].shape)},"
                    f" expected {tuple(value.shape)}"
                )
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        model.eval().requires_grad_(False)
        return model


# ---------------------------------------------------------------------------------------------------------------------
# Scene fidelity
# ---------------------------------------------------------------------------------------------------------------------


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


__all__ = [
    "AugmentConfig",
    "DEFAULT_ENCODER_DIR",
    "IdentityEncoder",
    "IdentityEncoderConfig",
    "IdentityEncoderTrainingConfig",
    "JUDGE_ENCODER_DIR",
    "SCENE_CHECKS",
    "augment",
    "default_encoder",
    "detect_scene",
    "equal_error_threshold",
    "pil_to_tensor",
    "reference_caption",
    "roc_auc",
    "scene_fidelity",
    "tensor_to_pil",
    "to_batch",
]
