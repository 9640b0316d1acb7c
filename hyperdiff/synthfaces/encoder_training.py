"""Training the SynthFaces identity encoder (`scripts/train_identity_encoder.py`): its recipe, the augmentations that
make it read generated images, and the scores it is validated with.

Contract
--------
* `IdentityEncoderTrainingConfig` (YAML `configs/identity_encoder.yaml`) fixes a run: identities from `TRAIN_SEEDS`
  only (validated on `VAL_SEEDS`, reported on `eval_seeds`), P identities x K scenes per batch with hard negatives.
* `augment(images, generator, config)` perturbs a float batch (N, 3, H, W) in [0, 1] the way a generated image may
  differ from a render (`AugmentConfig`: background recoloured at random, +-2 px shifts, small zoom/rotation, blur,
  face colour jitter, noise); every random number comes from `generator` (CPU), in a fixed order.
* `roc_auc(positive_scores, negative_scores)`: area under the ROC curve (Mann-Whitney, ties count one half), plain numpy.
* `equal_error_threshold(positive_scores, negative_scores)`: where the false-reject rate equals the false-accept rate.
* Bad input raises a one-line `HyperdiffError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hyperdiff.errors import HyperdiffError, check_number_in, check_positive_int
from hyperdiff.synthfaces.encoder import IdentityEncoderConfig
from hyperdiff.synthfaces.world import TRAIN_SEEDS


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


__all__ = ["AugmentConfig", "IdentityEncoderTrainingConfig", "augment", "equal_error_threshold", "roc_auc"]
