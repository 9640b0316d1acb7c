"""Training the SynthFaces base model: its configuration.

Contract: `BaseTrainConfig` (YAML `configs/synthfaces_base.yaml` + CLI overrides) fixes everything; the same config
and seed give the same weights on CPU. Its parts: `model` (the tiny SD-shaped pipeline), `data` (`DataConfig`) and
one config per stage: `vae`, `decoder`, `unet`, `refine` (a `StageConfig` each; `decoder` and `refine` are optional,
0 steps skips them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hyperdiff.config import to_dict
from hyperdiff.errors import HyperdiffError, check_number_in, check_positive_int, check_positive_number
from hyperdiff.models.tiny import TinyPipelineConfig


def _probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise HyperdiffError(f"`{name}` must be a probability in [0, 1), got {value!r}")


@dataclass
class DataConfig:
    images: int = 60_000  # cached renders, each a fresh training identity in a random scene
    seed: int = 0
    clause_dropout: float = 0.15
    caption_dropout: float = 0.1
    cache_dir: str = "cache/synthfaces"

    def __post_init__(self) -> None:
        check_positive_int("data.images", self.images)
        _probability("data.clause_dropout", self.clause_dropout)
        _probability("data.caption_dropout", self.caption_dropout)


@dataclass
class StageConfig:
    optional: ClassVar[bool] = False  # True: `steps` may be 0 (the stage is skipped)
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.optional:
            check_positive_int("steps", self.steps)
        elif isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise HyperdiffError(f"`steps` must be a non-negative integer, got {self.steps!r}")
        check_positive_int("batch_size", self.batch_size)
        check_positive_number("learning_rate", self.learning_rate)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise HyperdiffError(f"`warmup_steps` must be a non-negative integer, got {self.warmup_steps!r}")


@dataclass
class VAEStageConfig(StageConfig):
    kl_weight: float = 1e-6
    crop: int = 32  # train on random crops (the VAE is convolutional): 4x cheaper than whole 64 px images

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("vae.crop", self.crop)


@dataclass
class DecoderStageConfig(StageConfig):
    """Decoder-only fine-tune after stage 1 (crops of `vae.crop` px, posterior samples of the frozen encoder): the
    cached latents, and a UNet trained on them, stay valid; 0 steps skips the stage."""

    steps: int = 0
    batch_size: int = 32
    learning_rate: float = 3e-4
    warmup_steps: int = 50

    # Extra loss weight where the expression words act, in pixels: 1 + expression_weight · map (`expression_map` of
    # the renders themselves), normalised to mean 1 over the image: brows, eyelids and mouth corners are a few pixels.
    expression_weight: float = 0.0

    optional: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number_in("decoder.expression_weight", self.expression_weight, 0.0, 1e4)


@dataclass
class RefineStageConfig(StageConfig):
    """Stage 3, after the UNet: the decoder goes on learning from the UNet's own latents. `pairs` training renders are
    encoded, partly re-noised (img2img `strength`, drawn per batch from the range) and denoised by the trained UNet
    with their full caption; the decoder learns to map those latents back to the renders, so it reads what the UNet
    makes (blurrier, slightly off the encoder's manifold) rather than only the encoder's means. Each batch
    holds `batch_size` stage-1b crops (posterior samples, so it keeps decoding encoder latents) and `batch_size // 4`
    whole generated pairs (as many pixels), the two losses averaged. 0 steps skips the stage."""

    steps: int = 0
    batch_size: int = 32  # stage-1b crops per batch; generated pairs (4x the pixels each) add batch_size // 4
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    pairs: int = 4096
    strength: tuple[float, float] = (0.2, 0.5)
    denoise_steps: int = 20  # the schedule's steps at strength 1 (strength × this many are run)
    guidance: float = 4.0
    expression_weight: float = 0.0

    optional: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("refine.pairs", self.pairs)
        check_positive_int("refine.denoise_steps", self.denoise_steps)
        ok = (isinstance(self.strength, (tuple, list)) and len(self.strength) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.strength)
              and 0 < self.strength[0] <= self.strength[1] <= 1)
        if not ok or int(self.denoise_steps * self.strength[0]) < 1:
            raise HyperdiffError(f"`refine.strength` must be a range [low, high] with 0 < low <= high <= 1 and low × "
                                 f"`refine.denoise_steps` >= 1, got {self.strength!r}")
        check_number_in("refine.guidance", self.guidance, 0.0, 50.0)
        check_number_in("refine.expression_weight", self.expression_weight, 0.0, 1e4)


@dataclass
class UNetStageConfig(StageConfig):
    steps: int = 12_000
    learning_rate: float = 5e-4
    warmup_steps: int = 500
    weight_decay: float = 1e-2
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # Extra loss weight where the expression words act: weight 1 + expression_weight · map, the map (max 1) being
    # `expression_map` (eyes, brows, mouth: a few latent pixels that the plain loss barely sees).
    expression_weight: float = 0.0
    # The expression classifier term: weight × cross-entropy of a frozen identity encoder's expression head
    # (`classifier_encoder`, "" = the shipped one) on the one-step estimate x̂₀, decoded, against the expression the
    # caption names. It takes up to `classifier_samples` samples of each batch whose caption names an expression and
    # whose timestep is below `classifier_max_timestep` (where x̂₀ shows a face); each costs a VAE decode, forward and
    # backward. The denoising error weighs every latent cell alike; this term asks for the expression itself.
    classifier_weight: float = 0.0
    classifier_samples: int = 8
    classifier_max_timestep: int = 500
    classifier_encoder: str = ""
    # A base-model folder (diffusers layout) whose UNet and text encoder start the stage when `output_dir` holds no
    # UNet checkpoint yet: continue training an exported model. "" = fresh weights.
    init_from: str = ""
    # With `init_from`: the stage ends with (1 - init_blend)·start + init_blend·trained (the EMA weights) for the UNet
    # and text encoder, weight-space ensembling of the starting and the fine-tuned model (WiSE-FT, Wortsman et al.
    # 2022), which keeps more of the start's range while taking most of what the run taught. 1 = the trained weights.
    init_blend: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number_in("unet.expression_weight", self.expression_weight, 0.0, 1e4)
        check_number_in("unet.classifier_weight", self.classifier_weight, 0.0, 1e4)
        check_positive_int("unet.classifier_samples", self.classifier_samples)
        check_positive_int("unet.classifier_max_timestep", self.classifier_max_timestep)
        check_number_in("unet.init_blend", self.init_blend, 0.0, 1.0)
        if self.init_blend != 1 and not self.init_from:
            raise HyperdiffError(f"`unet.init_blend` blends with the `unet.init_from` model, which is not set "
                                 f"(init_blend {self.init_blend!r})")


def _default_model() -> TinyPipelineConfig:
    return TinyPipelineConfig(
        image_size=64,
        unet_block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=128,
        attention_head_dim=4,
        text_hidden_size=128,
        text_layers=3,
        text_heads=4,
        vae_block_out_channels=(32, 64, 64),
        scheduler="dpm",
    )


@dataclass
class BaseTrainConfig:
    model: TinyPipelineConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStageConfig = field(default_factory=lambda: VAEStageConfig(steps=1500, batch_size=32))
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    unet: UNetStageConfig = field(default_factory=UNetStageConfig)
    refine: RefineStageConfig = field(default_factory=RefineStageConfig)
    output_dir: str = "runs/synthfaces_base"
    export_dir: str = "runs/synthfaces_base/export"  # the shipped base: name hyperdiff/assets/synthfaces/base on the command line
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    seed: int = 0
    report_to: str = "tensorboard"
    # The personalization token. No training caption names it, so its embedding is still the random initialisation
    # at export, which then sets it to its class word's ("" = leave it): see `identifier_from_class`.
    identifier: str = "sks"
    identifier_class: str = "face"

    def __post_init__(self) -> None:
        check_positive_int("checkpointing_steps", self.checkpointing_steps)
        check_positive_int("checkpoints_total_limit", self.checkpoints_total_limit)
        if self.identifier:  # "" = leave the identifier's row as it is: nothing to check
            for name in ("identifier", "identifier_class"):
                if getattr(self, name) not in self.model.words:
                    raise HyperdiffError(f"`{name}` must be a word of the model's vocabulary (`model.words`, one token"
                                         f" each), got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return to_dict(self)
