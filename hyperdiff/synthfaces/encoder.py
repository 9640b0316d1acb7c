"""The SynthFaces identity encoder: the role face recognition plays in HyperDreamBooth's table.

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
* Bad input (wrong type, shape, value range, a missing or incomplete weights folder) raises a one-line `HyperdiffError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from hyperdiff.config import from_dict, to_dict
from hyperdiff.core.files import atomic_path, read_safetensors, write_safetensors
from hyperdiff.errors import HyperdiffError, check_positive_int
from hyperdiff.inputs import ASSETS_DIR
from hyperdiff.synthfaces.captions import background_of
from hyperdiff.synthfaces.images import tensor_to_pil, to_batch
from hyperdiff.synthfaces.world import EXPRESSIONS

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


__all__ = ["DEFAULT_ENCODER_DIR", "IdentityEncoder", "IdentityEncoderConfig", "JUDGE_ENCODER_DIR"]
