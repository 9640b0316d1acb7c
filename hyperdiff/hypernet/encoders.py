"""Image encoders: reference images → feature tokens `(B, T, d)` for the hypernetwork.

Contract:
- `EncoderConfig.kind == "clip"`: transformers `CLIPVisionModelWithProjection` from a hub id or local folder
  (`pretrained`), frozen except its last `unfreeze_last` transformer blocks; preprocessing follows the model's own
  `CLIPImageProcessor` config (resize the short side, centre crop, normalise) in torch. Features are the last hidden
  states `(B, 1 + patches, hidden)`.
- `EncoderConfig.kind == "small"`: a small trainable CNN for SynthFaces-scale models: stride-2 conv stages, the final
  feature map read as `h·w` tokens plus a learned position embedding, `(B, h·w, dim)`.
- `EncoderConfig.kind == "identity"`: the SynthFaces identity encoder (`hyperdiff.synthfaces.encoder.IdentityEncoder`;
  the shipped one unless `pretrained` names a folder), frozen — the role a pretrained face/vision tower plays for real
  photos. Tokens: its final feature map `h·w` and its identity embedding (1), each projected to `dim` (trainable) plus a
  learned position embedding, `(B, h·w + 1, dim)`. Its weights travel inside the hypernet's own file.
- All take `preprocess(images)` (PIL images or a float tensor in [0, 1], (B, 3, H, W)) → pixel tensor, and
  `forward(pixels)` → features. `view(images)` shows what the encoder sees: `preprocess` (resize, crop), then its
  normalisation undone (`unnormalize`), as RGB PIL images of the encoder's input size. Several reference images of
  one identity are pooled by `pool_references`: the mean of their feature tokens (token-wise), so the hypernet sees
  one `(T, d)` sequence per identity whatever the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hyperdiff.errors import HyperdiffError, check_positive_int

KINDS = ("small", "clip", "identity")


@dataclass
class EncoderConfig:
    kind: str = "small"
    pretrained: str = ""  # clip: hub id or local folder
    unfreeze_last: int = 0  # clip: trainable last transformer blocks
    image_size: int = 64  # small: input side
    channels: tuple[int, ...] = field(default=(32, 64, 128))  # small: conv stage widths (each halves the side)
    dim: int = 128  # small: token width

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HyperdiffError(f"`encoder.kind` must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "clip" and not self.pretrained:
            raise HyperdiffError("`encoder.pretrained` must name a CLIP vision model (hub id or folder) for kind 'clip'")
        self.channels = tuple(self.channels)
        for name in ("image_size", "dim"):
            check_positive_int(f"encoder.{name}", getattr(self, name))
        if not self.channels or any(c <= 0 for c in self.channels):
            raise HyperdiffError(f"`encoder.channels` must be positive integers, got {list(self.channels)}")
        if self.unfreeze_last < 0:
            raise HyperdiffError(f"`encoder.unfreeze_last` must be a non-negative integer, got {self.unfreeze_last}")


def _to_tensor(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images or a (B, 3, H, W) float tensor in [0, 1] → float tensor (B, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise HyperdiffError(f"`images` tensor must be float (B, 3, H, W) in [0, 1], got {images.dtype} {tuple(images.shape)}")
        return images
    if isinstance(images, Image.Image):
        images = [images]
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise HyperdiffError("`images` must be a non-empty list of PIL images or a (B, 3, H, W) tensor")
    arrays = [torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).view(im.height, im.width, 3) for im in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:  # different sizes: bring all to the first one's size
        h, w = arrays[0].shape[:2]
        arrays = [a if a.shape[:2] == (h, w) else _resize_hw(a, h, w) for a in arrays]
    return torch.stack(arrays).permute(0, 3, 1, 2).float() / 255.0


def _resize_hw(a: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = a.permute(2, 0, 1)[None].float()
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


class _Viewable:
    """`view(images)`: the encoder's own preprocessing, normalisation undone, as PIL images (what it sees)."""

    def view(self, images) -> list[Image.Image]:
        x = self.unnormalize(self.preprocess(images)).clamp(0, 1)  # (B, 3, S, S) in [0, 1]
        arrays = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arrays]


class _SquareInput(_Viewable):
    """Resize to `config.image_size` squared, scale to [-1, 1] (the small CNN's and the identity encoder's input)."""

    def preprocess(self, images) -> torch.Tensor:
        x = _to_tensor(images)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1  # (B, 3, S, S) in [-1, 1]

    def unnormalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels + 1) / 2


class SmallImageEncoder(_SquareInput, nn.Module):
    """CNN → tokens: (B, 3, S, S) in [0, 1] → (B, (S / 2^n)², dim)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        stages, c_in = [], 3
        for c in config.channels:
            stages += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*stages)
        side = config.image_size // 2 ** len(config.channels)
        self.proj = nn.Linear(c_in, config.dim)
        self.position = nn.Parameter(torch.randn(side * side, config.dim) * 0.02)
        self.dim = config.dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(pixels)  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h·w, C)
        return self.proj(tokens) + self.position  # (B, h·w, dim)


class ClipImageEncoder(_Viewable, nn.Module):
    """transformers CLIP vision tower; its processor config drives preprocessing."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.config = config
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(config.pretrained)
            processor = CLIPImageProcessor.from_pretrained(config.pretrained)
        except (OSError, ValueError) as e:
            raise HyperdiffError(
                f"image encoder '{config.pretrained}' could not be loaded ({str(e).splitlines()[0]}): "
                "pass a local folder, or a hub id that is cached when offline"
            ) from None
        size = processor.size.get("shortest_edge") or processor.size.get("height")
        crop = processor.crop_size.get("height") if processor.do_center_crop else size
        self.resize, self.crop = int(size), int(crop)
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        layers = self.model.vision_model.encoder.layers
        for layer in layers[len(layers) - config.unfreeze_last :] if config.unfreeze_last else []:
            layer.requires_grad_(True)
        self.dim = self.model.config.hidden_size

    def preprocess(self, images) -> torch.Tensor:
        x = _to_tensor(images).to(self.mean.device)  # resized where the tower runs
        h, w = x.shape[-2:]
        # short side → `resize`, long side truncated as transformers' `get_resize_output_image_size` does
        size = (self.resize, int(self.resize * w / h)) if h <= w else (int(self.resize * h / w), self.resize)
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop].clamp(0, 1)
        return (x - self.mean) / self.std  # (B, 3, crop, crop)

    def unnormalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * self.std + self.mean

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, hidden)


class IdentityImageEncoder(_SquareInput, nn.Module):
    """Frozen identity-encoder trunk + embedding → projected tokens: (B, 3, S, S) in [-1, 1] → (B, h·w + 1, dim)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        from hyperdiff.synthfaces.encoder import IdentityEncoder

        self.config = config
        source = IdentityEncoder.from_pretrained(config.pretrained or None)
        if source.config.image_size != config.image_size:
            raise HyperdiffError(
                f"`encoder.image_size` must be the identity encoder's input size {source.config.image_size}, got {config.image_size}")
        self.trunk, self.embed_head, self.pool = source.trunk, source.embed_head, source.config.pool
        for module in (self.trunk, self.embed_head):
            module.requires_grad_(False)
        side = config.image_size // 2 ** len(source.config.channels)
        self.proj_map = nn.Linear(source.config.channels[-1], config.dim)
        self.proj_id = nn.Linear(source.config.embed_dim, config.dim)
        self.position = nn.Parameter(torch.randn(side * side + 1, config.dim) * 0.02)
        self.dim = config.dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(pixels)  # (B, C, h, w)
        pooled = maps.mean(dim=(2, 3))
        if self.pool == "avgmax":
            pooled = torch.cat([pooled, maps.amax(dim=(2, 3))], dim=1)
        identity = F.normalize(self.embed_head(pooled), dim=1)  # (B, e): the identity embedding
        tokens = torch.cat([self.proj_map(maps.flatten(2).transpose(1, 2)), self.proj_id(identity)[:, None]], 1)
        return tokens + self.position  # (B, h·w + 1, dim)


def build_image_encoder(config: EncoderConfig) -> nn.Module:
    return {"small": SmallImageEncoder, "clip": ClipImageEncoder, "identity": IdentityImageEncoder}[config.kind](config)


def pool_references(features: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """Mean of the feature tokens of each identity's references: features (Σn, T, d), groups [n₁, n₂, …] → (B, T, d)."""
    if sum(groups) != features.shape[0] or any(n <= 0 for n in groups):
        raise HyperdiffError(f"`groups` {list(groups)} must be positive counts summing to {features.shape[0]}")
    return torch.stack([chunk.mean(0) for chunk in torch.split(features, list(groups))])
