"""UNet architectures of real Stable Diffusion bases, as plain configs.

Contract: `unet_config(name)` returns a fresh dict (the caller may mutate it) such that `UNet2DConditionModel(**cfg)`
has the architecture of that base: "sd15" (Stable Diffusion 1.x, 859.5M parameters) or "sd21" (Stable Diffusion
2.x, 768px, OpenCLIP-H text features). `build_unet(name_or_cfg, device="meta")` builds one with no memory for weights
(shapes, layer names and parameter counts are exact); `device="cpu"` allocates and initialises it randomly from
`seed`, without touching the global RNG.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from hyperdiff.errors import HyperdiffError

_SD_COMMON: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}

_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(_SD_COMMON),
    "sd21": dict(
        _SD_COMMON,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
}

NAMES: tuple[str, ...] = tuple(_CONFIGS)


def unet_config(name: str) -> dict[str, Any]:
    """Return a fresh `UNet2DConditionModel(**cfg)` config dict for the base `name` ("sd15" or "sd21")."""
    if name not in _CONFIGS:
        allowed = ", ".join(repr(n) for n in NAMES)
        raise HyperdiffError(f"`name` must be one of {allowed}, got {name!r}")
    return copy.deepcopy(_CONFIGS[name])


def build_unet(
    name_or_cfg: str | Mapping[str, Any], device: str | torch.device = "meta", seed: int = 0
) -> UNet2DConditionModel:
    """Build a UNet from a config name or dict: on "meta" (no weights; shapes only) or on a real device, seeded."""
    cfg = unet_config(name_or_cfg) if isinstance(name_or_cfg, str) else dict(name_or_cfg)
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg)
    return unet.to(device)
