"""UNet architectures of real Stable Diffusion bases, as plain configs.

Contract: `unet_config(name)` returns a fresh dict (the caller may mutate it) such that `UNet2DConditionModel(**cfg)`
has the architecture of that base: "sd15" (Stable Diffusion 1.x, 859.5M parameters) or "sd21" (Stable Diffusion
2.x, 768px, OpenCLIP-H text features). `build_unet(name_or_cfg, device="meta")` builds one with no memory for weights
(shapes, layer names and parameter counts are exact); another device allocates and initialises it randomly from
`seed`, without touching the global RNG. `build_pipeline(name)` does the same for a whole `StableDiffusionPipeline`
of that base (its VAE, text encoder and noise schedule; the offline tokenizer stands in for CLIP's BPE), and
`build_clip_vision(name)` for the image towers the paper's hypernets read (random weights and their processor):
architecture-true stand-ins for benchmarks and tests where the real weights cannot be downloaded.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

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
    return _build(torch.device(device), seed, lambda: UNet2DConditionModel(**cfg))


# The SD VAE (1.x and 2.x alike: 83.65M parameters) and text encoders (CLIP ViT-L/14's, OpenCLIP ViT-H/14's).
_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
_TEXT: dict[str, dict[str, Any]] = {
    "sd15": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "hidden_act": "quick_gelu", "projection_dim": 768},
    "sd21": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
             "hidden_act": "gelu", "projection_dim": 512},
}
_PREDICTION = {"sd15": "epsilon", "sd21": "v_prediction"}
_VISION: dict[str, dict[str, Any]] = {  # CLIPVisionModelWithProjection configs
    "clip-vit-h-14": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                      "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu"},
    "clip-vit-l-14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"},
}
VISION_NAMES: tuple[str, ...] = tuple(_VISION)


def _check_name(name: str, names) -> None:
    if name not in names:
        raise HyperdiffError(f"`name` must be one of {', '.join(repr(n) for n in names)}, got {name!r}")


def _build(device: torch.device, seed: int, make):
    """`make()` on the meta device (no memory), or seeded on `device` without touching the global RNG."""
    if device.type == "meta":
        with torch.device("meta"):
            return make()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        return make()


def build_pipeline(
    name: str, device: str | torch.device = "meta", seed: int = 0, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` with the architecture of base `name` and random weights (see the module docstring)."""
    from hyperdiff.models.tiny import sd_ddim_scheduler
    from hyperdiff.models.tokenizer import build_tokenizer

    _check_name(name, NAMES)
    device = torch.device(device)
    tokenizer = build_tokenizer()
    text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **_TEXT[name])
    unet_cfg = unet_config(name)
    parts = {
        "unet": build_unet(unet_cfg, device, seed),
        "vae": _build(device, seed + 1, lambda: AutoencoderKL(**_VAE, sample_size=unet_cfg["sample_size"] * 8)),
        "text_encoder": _build(device, seed + 2, lambda: CLIPTextModel(text)),
    }
    if device.type != "meta":
        parts = {k: m.to(dtype) for k, m in parts.items()}
    return StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=sd_ddim_scheduler(_PREDICTION[name]),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_clip_vision(
    name: str = "clip-vit-h-14", device: str | torch.device = "meta", seed: int = 0
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A CLIP image tower (random weights) and its processor; `save_pretrained` both into one folder to load it as
    a hypernet's `encoder.pretrained`."""
    _check_name(name, VISION_NAMES)
    config = CLIPVisionConfig(**_VISION[name])
    model = _build(torch.device(device), seed, lambda: CLIPVisionModelWithProjection(config))
    side = config.image_size
    return model, CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
