"""Tiny, offline, deterministic Stable Diffusion pipelines.

Contract: `tiny_pipeline(seed, config)` returns a `diffusers.StableDiffusionPipeline` with the SD architecture in
miniature (UNet2DConditionModel with CrossAttn blocks, so every transformer block has `attn1` and `attn2`;
AutoencoderKL; CLIPTextModel; the offline CLIP-style tokenizer of `hyperdiff.models.tokenizer`; a DDIM or DPM-Solver++
scheduler with the standard SD noise schedule), no safety checker and no progress bar. No download happens. The same
`(seed, config)` gives bit-identical weights on every call; each module is initialised under its own
seed derived from `seed` and the module name, inside `torch.random.fork_rng`, so the global RNG is left as it was. The
default config builds and runs a 2-step 32x32 generation in well under a second of CPU time; bigger configs (e.g. the
64x64 SynthFaces base) use the same builder.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from hyperdiff.errors import HyperdiffError, check_positive_int
from hyperdiff.models.tokenizer import DEFAULT_WORDS, build_tokenizer, check_words

SCHEDULERS: tuple[str, ...] = ("ddim", "dpm")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

# The Stable Diffusion 1.x/2.x training noise schedule.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def _channels(name: str, value: Any, groups: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise HyperdiffError(f"`{name}` must be a non-empty sequence of positive integers, got {value!r}")
    chans = tuple(value)
    if not chans or any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in chans):
        raise HyperdiffError(f"`{name}` must be a non-empty sequence of positive integers, got {value!r}")
    if any(c % groups for c in chans):
        raise HyperdiffError(f"`{name}` entries must be multiples of `norm_num_groups` ({groups}), got {value!r}")
    return chans


@dataclass
class TinyPipelineConfig:
    """Sizes of a tiny SD pipeline. Defaults: 32x32 images, 16x16x4 latents, ~0.8M-parameter UNet."""

    image_size: int = 32
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8  # diffusers' name; for SD it is the number of heads per attention
    norm_num_groups: int = 32
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 77
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    vae_scaling_factor: float = 0.18215
    scheduler: str = "ddim"
    prediction_type: str = "epsilon"
    words: tuple[str, ...] = field(default=DEFAULT_WORDS)

    def __post_init__(self) -> None:
        for name in ("image_size", "layers_per_block", "cross_attention_dim", "attention_head_dim", "norm_num_groups",
                     "text_hidden_size", "text_layers", "text_heads", "vae_layers_per_block", "latent_channels"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("text_max_length", self.text_max_length)
        if self.text_max_length < 2:
            raise HyperdiffError(f"`text_max_length` must be at least 2, got {self.text_max_length}")
        self.unet_block_out_channels = _channels("unet_block_out_channels", self.unet_block_out_channels,
                                                 self.norm_num_groups)
        self.vae_block_out_channels = _channels("vae_block_out_channels", self.vae_block_out_channels,
                                                self.norm_num_groups)
        check_words(self.words)
        self.words = tuple(self.words)
        if self.text_hidden_size != self.cross_attention_dim:
            raise HyperdiffError(
                f"`text_hidden_size` must equal `cross_attention_dim` ({self.cross_attention_dim}), "
                f"got {self.text_hidden_size}"
            )
        if self.text_hidden_size % self.text_heads:
            raise HyperdiffError(
                f"`text_hidden_size` must be a multiple of `text_heads` ({self.text_heads}), "
                f"got {self.text_hidden_size}"
            )
        for c in self.unet_block_out_channels:
            if c % self.attention_head_dim:
                raise HyperdiffError(
                    f"`unet_block_out_channels` entries must be multiples of `attention_head_dim` "
                    f"({self.attention_head_dim}), got {self.unet_block_out_channels!r}"
                )
        if self.image_size % self.vae_scale_factor:
            raise HyperdiffError(
                f"`image_size` must be a multiple of the VAE scale factor ({self.vae_scale_factor}), "
                f"got {self.image_size}"
            )
        unet_factor = 2 ** (len(self.unet_block_out_channels) - 1)
        if self.latent_size % unet_factor:
            raise HyperdiffError(
                f"`image_size` must be a multiple of {self.vae_scale_factor * unet_factor} for these block counts, "
                f"got {self.image_size}"
            )
        if not isinstance(self.vae_scaling_factor, (int, float)) or not self.vae_scaling_factor > 0:
            raise HyperdiffError(f"`vae_scaling_factor` must be a positive number, got {self.vae_scaling_factor!r}")
        if self.scheduler not in SCHEDULERS:
            raise HyperdiffError(f"`scheduler` must be one of 'ddim', 'dpm', got {self.scheduler!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise HyperdiffError(
                f"`prediction_type` must be one of 'epsilon', 'v_prediction', got {self.prediction_type!r}"
            )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists); `TinyPipelineConfig(**d)` rebuilds it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for module `name` (never Python's salted `hash()`)."""
    digest = hashlib.sha256(f"hyperdiff.tiny:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seeded(seed: int, name: str, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_module_seed(seed, name))
        return build()


def _unet(cfg: TinyPipelineConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_block_out_channels)
    # SD layout: cross-attention at every resolution but the lowest (which has a plain DownBlock2D/UpBlock2D).
    down = ["CrossAttnDownBlock2D"] * max(n - 1, 1) + ["DownBlock2D"] * (n > 1)
    up = ["UpBlock2D" if b == "DownBlock2D" else "CrossAttnUpBlock2D" for b in reversed(down)]
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=cfg.unet_block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
    )


def _vae(cfg: TinyPipelineConfig) -> AutoencoderKL:
    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
        scaling_factor=float(cfg.vae_scaling_factor),
    )


def sd_ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    """DDIM on the Stable Diffusion noise schedule, configured as SD checkpoints ship it."""
    return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def tiny_scheduler(cfg: TinyPipelineConfig) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """The sampling scheduler `cfg.scheduler` names, on the SD noise schedule (no weights to build).

    The DPM-Solver++ config also records SD's `clip_sample=False, set_alpha_to_one=False`, which it does not use
    itself: a swap such as `DDIMScheduler.from_config(pipe.scheduler.config)` would otherwise get DDIM's defaults,
    and `clip_sample=True` clips the predicted latents to [-1, 1], which ruins this VAE's images."""
    if cfg.scheduler == "ddim":
        return sd_ddim_scheduler(cfg.prediction_type)
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE, prediction_type=cfg.prediction_type,
                                            algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return scheduler


def tiny_components(seed: int = 0, config: TinyPipelineConfig | None = None) -> dict[str, Any]:
    """Freshly initialised, seeded pipeline parts: `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`
    (keyword arguments of `StableDiffusionPipeline`, less the safety checker). Training starts from these."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise HyperdiffError(f"`seed` must be a non-negative integer, got {seed!r}")
    cfg = config if config is not None else TinyPipelineConfig()
    if not isinstance(cfg, TinyPipelineConfig):
        raise HyperdiffError(f"`config` must be a TinyPipelineConfig, got {type(cfg).__name__}")
    tokenizer = build_tokenizer(cfg.words, model_max_length=cfg.text_max_length)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=4 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.text_max_length,
        projection_dim=cfg.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {
        "vae": _seeded(seed, "vae", lambda: _vae(cfg)),
        "text_encoder": _seeded(seed, "text_encoder", lambda: CLIPTextModel(text_config)),
        "tokenizer": tokenizer,
        "unet": _seeded(seed, "unet", lambda: _unet(cfg)),
        "scheduler": tiny_scheduler(cfg),
    }


def tiny_pipeline(
    seed: int = 0,
    config: TinyPipelineConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """Build the offline tiny SD pipeline for `(seed, config)`; weights are bit-identical for equal arguments."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HyperdiffError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
    pipe = StableDiffusionPipeline(
        **tiny_components(seed, config), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast, even with none.
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            torch.nn.Module.to(module, dtype=dtype)
    return pipe.to(torch.device(device))
