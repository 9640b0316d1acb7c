"""Training the SynthFaces base model from scratch: the VAE, then the text encoder and UNet together.

Contract:
- `BaseTrainConfig` (YAML `configs/synthfaces_base.yaml` + CLI overrides) fixes everything; the same config and seed
  give the same weights on CPU.
- Data: `render_cache` renders `data.images` (identity, scene) pairs from `TRAIN_SEEDS` once (a safetensors cache of
  uint8 images and scene indices under `data.cache_dir`); evaluation seeds (≥ 1,000,000) are never used. Captions are
  `synthfaces.caption(scene)` with each clause dropped with probability `data.clause_dropout` (so partial prompts
  work) and the whole caption emptied with probability `data.caption_dropout` (classifier-free guidance).
- Stage 1 `train_vae`: AutoencoderKL, MSE + `kl_weight`·KL; then every image is encoded once (posterior means) and
  `scaling_factor` is set to 1 / std of the latents.
- Stage 1b `train_decoder` (`decoder.steps` > 0): the decoder alone goes on learning (posterior samples of frozen
  encoder crops, as in stage 1); the encoder is frozen, so the latents, and any UNet checkpoint trained on them,
  stay valid. `decoder.expression_weight` > 0 up-weights the pixels where the expression words act.
- Stage 2 `train_unet`: epsilon prediction with the SD noise schedule, min-SNR-γ loss weights, AdamW with warm-up and
  cosine decay, EMA weights (what is exported). `unet.expression_weight` > 0 up-weights the loss on the latent cells
  where the expression words act (`expression_map`: eyes, brows, mouth), which the plain loss barely sees.
  `unet.classifier_weight` > 0 adds a frozen identity encoder's expression cross-entropy on the decoded one-step
  estimate x̂₀ of samples whose caption names an expression (`finetune.decoded_estimate`). `unet.init_from` starts
  the stage from an exported model's UNet and text encoder (when no UNet checkpoint exists yet); `unet.init_blend` < 1
  ends it with a weighted average of those starting weights and the trained ones.
- Stage 3 `train_refine` (`refine.steps` > 0, after the UNet): the decoder learns from the UNet's own latents too
  (`generated_pairs`: training renders re-noised and denoised by the trained UNet, img2img on latents), so it decodes
  what generation makes, not only the encoder's means; stage-1b crops stay in every batch.
- Every stage checkpoints (`hyperdiff.train.checkpoints`; the EMA weights as safetensors beside accelerate's state)
  every `checkpointing_steps` into `output_dir/<stage>/checkpoint-N` and resume from the latest one; a finished
  stage is skipped. Batches are drawn from a generator seeded by
  `(seed, step)`, so a resumed run sees the batches an uninterrupted run would.
- Before the export, the identifier token's embedding (`identifier`, never in a caption) is set to its class
  word's (`identifier_class`): `identifier_from_class`.
- `export_pipeline` writes a standard diffusers folder (fp16 UNet and VAE, DPM-Solver++ scheduler) that
  `StableDiffusionPipeline.from_pretrained(path, local_files_only=True)` loads.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hyperdiff import synthfaces
from hyperdiff.config import to_dict
from hyperdiff.core.files import write_safetensors
from hyperdiff.errors import HyperdiffError, check_number_in, check_positive_int, check_positive_number
from hyperdiff.models.tiny import SD_SCHEDULE, TinyPipelineConfig, tiny_components, tiny_scheduler
from hyperdiff.personalize.finetune import decoded_estimate, frozen_identity_encoder
from hyperdiff.synthfaces.encoder import to_batch
from hyperdiff.train import checkpoints

logger = logging.getLogger(__name__)


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


# -- data --------------------------------------------------------------------------------------------------------
SCENE_AXES = ("background", "hat", "expression")


def _scene_index(scene: synthfaces.Scene) -> list[int]:
    return [
        synthfaces.BACKGROUNDS.index(scene.background),
        int(scene.hat),
        synthfaces.EXPRESSIONS.index(scene.expression),
    ]


def _scene_of(index: list[int]) -> synthfaces.Scene:
    return synthfaces.Scene(synthfaces.BACKGROUNDS[index[0]], bool(index[1]), synthfaces.EXPRESSIONS[index[2]])


def render_cache(data: DataConfig, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, size, size), scenes int64 (N, 3)), rendered once and cached as safetensors."""
    path = Path(data.cache_dir) / f"renders-n{data.images}-s{data.seed}-{size}px.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        return tensors["images"], tensors["scenes"]
    pairs = synthfaces.sample(synthfaces.TRAIN_SEEDS, data.images, rng_seed=data.seed)
    images = torch.empty(len(pairs), 3, size, size, dtype=torch.uint8)
    scenes = torch.empty(len(pairs), 3, dtype=torch.int64)
    for i, (identity, scene) in enumerate(tqdm(pairs, desc="render SynthFaces", mininterval=2)):
        pixels = torch.frombuffer(bytearray(synthfaces.render(identity, scene, size).tobytes()), dtype=torch.uint8)
        images[i] = pixels.view(size, size, 3).permute(2, 0, 1)
        scenes[i] = torch.tensor(_scene_index(scene))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"images": images, "scenes": scenes}, {"data": str(to_dict(data))}, "render cache")
    return images, scenes


def training_caption(scene: synthfaces.Scene, gen: torch.Generator, data: DataConfig) -> tuple[str, frozenset[str]]:
    """The canonical caption with clauses dropped at random, or "" (unconditional) for CFG; and the scene axes
    (`SCENE_AXES`) whose words it says (a scene without a hat names no hat)."""
    if torch.rand((), generator=gen) < data.caption_dropout:
        return "", frozenset()
    keep = (torch.rand(3, generator=gen) >= data.clause_dropout).tolist()
    parts, named = ["a face"], set()
    if keep[0]:
        parts.append(scene.expression)
        named.add("expression")
    if scene.hat and keep[1]:
        parts.append("wearing a hat")
        named.add("hat")
    if keep[2]:
        parts.append(f"on a {scene.background} background")
        named.add("background")
    return ", ".join(parts), frozenset(named)


def _batch_generator(seed: int, stage: str, step: int) -> torch.Generator:
    from hyperdiff.core.lidb import stable_seed

    return torch.Generator().manual_seed(stable_seed("train_base", seed, stage, step))


# -- checkpoints -------------------------------------------------------------------------------------------------
def _ema_saver(ema, names: list[str]):
    """Write the EMA weights into a checkpoint as safetensors (accelerate would pickle a custom object)."""

    def save(path: Path) -> None:
        meta = {"optimization_step": str(ema.optimization_step)}
        write_safetensors(path / "ema.safetensors", dict(zip(names, ema.shadow_params)), meta, "EMA state")

    return save


def _load_ema(ema, names: list[str], path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(str(path / "ema.safetensors"))
    with safe_open(str(path / "ema.safetensors"), "pt") as f:
        ema.optimization_step = int(f.metadata()["optimization_step"])
    with torch.no_grad():
        for name, shadow in zip(names, ema.shadow_params):
            shadow.copy_(tensors[name])


def _cosine(optimizer, warmup: int, total: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)


# -- the loop shared by the VAE and decoder stages ------------------------------------------------------------------
def _fit(cfg: BaseTrainConfig, accelerator, vae, params: list, stage: StageConfig, name: str, resume: bool, batch_loss):
    """AdamW + warm-up/cosine on `params`, seeded batches, checkpoints in `output_dir/<name>`, resume; `batch_loss(vae,
    gen)` → (loss, mse) draws one batch from `gen`. Returns the unwrapped model."""
    stage_dir = Path(cfg.output_dir) / name
    opt = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    sched = _cosine(opt, stage.warmup_steps, stage.steps)
    vae, opt, sched = accelerator.prepare(vae, opt, sched)
    start = 0
    if resume:
        path, start = checkpoints.latest(stage_dir)
        if path is not None:
            accelerator.load_state(str(path))
    bar = tqdm(range(start, stage.steps), desc=name, disable=not accelerator.is_main_process, mininterval=5)
    for step in bar:
        loss, mse = batch_loss(accelerator.unwrap_model(vae), _batch_generator(cfg.seed, name, step))
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            accelerator.log({f"{name}/mse": mse.item(), f"{name}/lr": sched.get_last_lr()[0]}, step=step)
            bar.set_postfix(mse=f"{mse.item():.4f}")
        if (step + 1) % cfg.checkpointing_steps == 0 and step + 1 < stage.steps:
            checkpoints.save(accelerator, stage_dir, step + 1, cfg.checkpoints_total_limit)
    return accelerator.unwrap_model(vae)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1)  # uint8 → [-1, 1]


def _crop_windows(n_images: int, size: int, batch_size: int, crop: int, gen: torch.Generator):
    """`batch_size` random (image index, top, left) windows of `crop` px in `n_images` images of `size` px."""
    idx = torch.randint(n_images, (batch_size,), generator=gen).tolist()
    ys, xs = torch.randint(0, size - crop + 1, (2, batch_size), generator=gen).tolist()
    return list(zip(idx, ys, xs))


def _cut(images: torch.Tensor, windows, crop: int) -> torch.Tensor:
    """(N, C, S, S) → (B, C, crop, crop): one window each."""
    return torch.stack([images[i, :, y : y + crop, x : x + crop] for i, y, x in windows])


def _random_crops(images: torch.Tensor, batch_size: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` random images of the cache, each cut to a random `crop` px square: (B, 3, crop, crop) in [-1, 1]."""
    crop = min(crop, images.shape[-1])
    return _pixels(_cut(images, _crop_windows(len(images), images.shape[-1], batch_size, crop, gen), crop))


# -- stage 1: VAE ------------------------------------------------------------------------------------------------
def train_vae(cfg: BaseTrainConfig, accelerator, images: torch.Tensor, resume: bool):
    from diffusers import AutoencoderKL

    final = Path(cfg.output_dir) / "vae" / "final"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)

    def batch_loss(vae, gen):
        x = _random_crops(images, cfg.vae.batch_size, cfg.vae.crop, gen).to(accelerator.device)  # (B, 3, c, c)
        posterior = vae.encode(x).latent_dist
        mse = F.mse_loss(vae.decode(posterior.sample(generator=None)).sample, x)
        return mse + cfg.vae.kl_weight * posterior.kl().mean(), mse

    vae = tiny_components(cfg.seed, cfg.model)["vae"]
    vae = _fit(cfg, accelerator, vae, list(vae.parameters()), cfg.vae, "vae", resume, batch_loss)
    if accelerator.is_main_process:
        vae.save_pretrained(final)
    accelerator.wait_for_everyone()
    return vae


# -- stage 1b: decoder fine-tune -----------------------------------------------------------------------------------
def train_decoder(cfg: BaseTrainConfig, accelerator, vae, images: torch.Tensor, resume: bool):
    """Fine-tune the decoder with the encoder frozen (the cached latents do not move): random `vae.crop` px crops are
    encoded and a posterior *sample* decoded, as in stage 1, so the decoder keeps forgiving latents that are not
    exactly an encoder's mean (what the UNet makes). Saved to `output_dir/decoder/final`."""
    from diffusers import AutoencoderKL

    final = Path(cfg.output_dir) / "decoder" / "final"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)

    weight = expression_weight_map(cfg.decoder.expression_weight, images.shape[-1], cfg.seed)

    def batch_loss(vae, gen):
        return _crop_loss(vae, images, weight, cfg.decoder.batch_size, min(cfg.vae.crop, images.shape[-1]), gen,
                          accelerator.device)

    return _fit_decoder(cfg, accelerator, vae, cfg.decoder, "decoder", resume, batch_loss, final)


def expression_weight_map(expression_weight: float, size: int, seed: int, vae=None) -> torch.Tensor:
    """(1, 1, h, w): 1 + expression_weight · `expression_map`, normalised to mean 1 (the loss keeps its scale); on the
    latent grid of `vae` for renders of `size` px, or on the pixels without one."""
    if expression_weight <= 0 and vae is None:  # uniform: no renders needed
        return torch.ones(1, 1, size, size)
    weight = 1 + expression_weight * expression_map(vae, size, seed=seed)[None, None]
    return weight / weight.mean()


def _crop_loss(vae, images: torch.Tensor, weight: torch.Tensor, batch_size: int, crop: int, gen, device):
    """Stage 1b's objective on `batch_size` random `crop` px crops: encode (frozen), decode a posterior sample;
    (weighted MSE, plain MSE)."""
    windows = _crop_windows(len(images), images.shape[-1], batch_size, crop, gen)
    x = _pixels(_cut(images, windows, crop)).to(device)  # (B, 3, c, c)
    w = _cut(weight, [(0, y, xx) for _, y, xx in windows], crop).to(x)  # (B, 1, c, c)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x)
    error = F.mse_loss(vae.decode(z).sample, x, reduction="none")  # (B, 3, c, c)
    return (w * error).mean(), error.mean()


def _fit_decoder(cfg, accelerator, vae, stage: StageConfig, name: str, resume: bool, batch_loss, final: Path):
    """Train the decoder (and post_quant_conv) alone with `batch_loss`; the encoder stays frozen. Saved to `final`."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae = _fit(cfg, accelerator, vae, params, stage, name, resume, batch_loss)
    vae.requires_grad_(False)
    if accelerator.is_main_process:
        vae.save_pretrained(final)
    accelerator.wait_for_everyone()
    return vae


# -- stage 3: the decoder on the UNet's own latents --------------------------------------------------------------
@torch.no_grad()
def generated_pairs(cfg: BaseTrainConfig, accelerator, vae, unet, text_encoder, tokenizer, latents: torch.Tensor,
                    scenes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(render-cache indices (P,), the UNet's latents for them (P, C, h, w), unscaled): each render's cached latent,
    re-noised to a `refine.strength` drawn per chunk and denoised by the UNet under its full caption (diffusers'
    img2img on latents). Made once by the main process, cached as safetensors in `output_dir`."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from hyperdiff.core.lidb import stable_seed

    cache = Path(cfg.output_dir) / "refine_pairs.safetensors"
    r = cfg.refine
    if accelerator.is_main_process and not cache.exists():
        pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=tiny_scheduler(cfg.model), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gen = _batch_generator(cfg.seed, "refine_pairs", 0)
        index = torch.randperm(len(latents), generator=gen)[: r.pairs]
        made = []
        for start in tqdm(range(0, len(index), 64), desc="refine pairs", mininterval=5):
            chunk = index[start : start + 64]
            strength = r.strength[0] + (r.strength[1] - r.strength[0]) * float(torch.rand((), generator=gen))
            prompts = [synthfaces.caption(_scene_of(scenes[i].tolist())) for i in chunk]
            z = pipe(prompts, image=latents[chunk].float() * vae.config.scaling_factor, strength=strength,
                     num_inference_steps=r.denoise_steps, guidance_scale=r.guidance, output_type="latent",
                     generator=torch.Generator().manual_seed(stable_seed("refine_pairs", cfg.seed, start))).images
            made.append(z / vae.config.scaling_factor)  # (n, C, h, w)
        write_safetensors(cache, {"index": index, "latents": torch.cat(made)}, {"refine": str(to_dict(r))}, "refine pairs")
    accelerator.wait_for_everyone()
    tensors = load_file(str(cache))
    return tensors["index"], tensors["latents"]


def train_refine(cfg: BaseTrainConfig, accelerator, vae, images: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor],
                 resume: bool):
    """Stage 3 (`RefineStageConfig`): the decoder on stage-1b crops plus whole (UNet latent → render) pairs. Saved to
    `output_dir/refine/final`."""
    from diffusers import AutoencoderKL

    final = Path(cfg.output_dir) / "refine" / "final"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final)
    index, made = pairs
    weight = expression_weight_map(cfg.refine.expression_weight, images.shape[-1], cfg.seed)

    def batch_loss(vae, gen):
        real, real_mse = _crop_loss(vae, images, weight, cfg.refine.batch_size, min(cfg.vae.crop, images.shape[-1]),
                                    gen, accelerator.device)
        j = torch.randint(len(index), (max(1, cfg.refine.batch_size // 4),), generator=gen)
        x = _pixels(images[index[j]]).to(accelerator.device)  # (B/4, 3, S, S)
        error = F.mse_loss(vae.decode(made[j].to(x)).sample, x, reduction="none")  # (B/4, 3, S, S)
        return (real + (weight.to(x) * error).mean()) / 2, (real_mse + error.mean()) / 2

    return _fit_decoder(cfg, accelerator, vae, cfg.refine, "refine", resume, batch_loss, final)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, cache: Path, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, C, h, w) of every image, cached; sets `vae.config.scaling_factor` = 1 / std."""
    if cache.exists():
        latents = load_file(str(cache))["latents"]
    else:
        vae.eval()
        chunks = [
            vae.encode(_pixels(images[i : i + batch])).latent_dist.mean
            for i in tqdm(range(0, len(images), batch), desc="encode latents", mininterval=5)
        ]
        latents = torch.cat(chunks)
        write_safetensors(cache, {"latents": latents}, {}, "latent cache")
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents


@torch.no_grad()
def expression_map(vae, size: int, identities: int = 128, seed: int = 0) -> torch.Tensor:
    """Where the expression words act, max 1: for training identities in random scenes, the std over the expressions
    (everything else fixed) of the VAE's latents — an (h, w) latent map — or, with `vae` None, of the pixels — a
    (size, size) map — averaged over channels and identities."""
    spreads = []
    for identity, scene in synthfaces.sample(synthfaces.TRAIN_SEEDS, identities, rng_seed=seed):
        renders = [synthfaces.render(identity, synthfaces.Scene(scene.background, scene.hat, e), size)
                   for e in synthfaces.EXPRESSIONS]
        x = to_batch(renders, size=None) * 2 - 1  # (E, 3, size, size) in [-1, 1]
        z = x if vae is None else vae.encode(x).latent_dist.mean  # (E, C, h, w)
        spreads.append(z.std(0).mean(0))  # (h, w)
    spread = torch.stack(spreads).mean(0)
    return spread / spread.max()


# -- stage 2: text encoder + UNet ----------------------------------------------------------------------------------
def train_unet(
    cfg: BaseTrainConfig, accelerator, vae, latents: torch.Tensor, scenes: torch.Tensor, resume: bool,
    export_only: bool = False,
):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    parts = tiny_components(cfg.seed, cfg.model)
    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    stage_dir = Path(cfg.output_dir) / "unet"
    if cfg.unet.init_from and not (resume and checkpoints.latest(stage_dir)[0] is not None):
        for module, state in zip((unet, text_encoder), _exported_states(unet, text_encoder, cfg.unet.init_from)):
            module.load_state_dict(state)
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=cfg.model.prediction_type)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    names = [f"unet.{n}" for n, _ in unet.named_parameters()] + [f"text_encoder.{n}" for n, _ in text_encoder.named_parameters()]
    ema = EMAModel(params, decay=cfg.unet.ema_decay)
    opt = torch.optim.AdamW(params, lr=cfg.unet.learning_rate, weight_decay=cfg.unet.weight_decay)
    sched = _cosine(opt, cfg.unet.warmup_steps, cfg.unet.steps)
    unet, text_encoder, opt, sched = accelerator.prepare(unet, text_encoder, opt, sched)
    start = 0
    if resume:
        path, start = checkpoints.latest(stage_dir)
        if path is not None:
            accelerator.load_state(str(path))
            _load_ema(ema, names, path)
    device = accelerator.device
    pixel_weight = 1.0  # scalar, or (1, 1, h, w) when the expression region is up-weighted
    if cfg.unet.expression_weight > 0 and not export_only:
        pixel_weight = expression_weight_map(cfg.unet.expression_weight, cfg.model.image_size, cfg.seed, vae).to(device)
    classifier = None
    if cfg.unet.classifier_weight > 0 and not export_only:
        classifier = frozen_identity_encoder(cfg.unet.classifier_encoder, device)
        vae.requires_grad_(False).eval()  # the term runs backward through the decoder, which stays as it is
    bar = tqdm(range(start, start if export_only else cfg.unet.steps), desc="unet", disable=not accelerator.is_main_process, mininterval=5)
    for step in bar:
        gen = _batch_generator(cfg.seed, "unet", step)
        idx = torch.randint(len(latents), (cfg.unet.batch_size,), generator=gen)
        x0 = latents[idx].float().to(device) * vae.config.scaling_factor  # (B, C, h, w)
        captions, named = zip(*[training_caption(_scene_of(scenes[i].tolist()), gen, cfg.data) for i in idx])
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        text = text_encoder(ids)[0]  # (B, 77, d)
        pred = unet(noisy, t, text).sample
        target = noise if cfg.model.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
        per_sample = (pixel_weight * F.mse_loss(pred, target, reduction="none")).mean(dim=(1, 2, 3))
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=cfg.unet.min_snr_gamma) / (snr if cfg.model.prediction_type == "epsilon" else snr + 1)
        loss = (weight * per_sample).mean()
        shown = {}  # logged every 50 steps
        picked = _classifier_samples(named, t, cfg.unet) if classifier is not None else []
        if len(picked):
            i = picked.to(device)
            wanted = scenes[idx[picked], SCENE_AXES.index("expression")].to(device)  # (k,) EXPRESSIONS indices
            expression_loss = expression_classifier_loss(vae, noise_scheduler, classifier, x0[i], noise[i], t[i],
                                                         pred[i], wanted)
            loss = loss + cfg.unet.classifier_weight * expression_loss
            shown["expression_ce"] = expression_loss.item()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        if step % 50 == 0:
            shown["loss"] = loss.item()
            accelerator.log({**{f"unet/{k}": v for k, v in shown.items()}, "unet/lr": sched.get_last_lr()[0]}, step=step)
            bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        # the last step too: a later run may continue this one (a warm restart with more steps or other weights)
        if (step + 1) % cfg.checkpointing_steps == 0 or step + 1 == cfg.unet.steps:
            checkpoints.save(accelerator, stage_dir, step + 1, cfg.checkpoints_total_limit, _ema_saver(ema, names))
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
    if cfg.unet.init_blend != 1:
        blend = cfg.unet.init_blend
        for module, start in zip((unet, text_encoder), _exported_states(unet, text_encoder, cfg.unet.init_from)):
            trained = module.state_dict()
            module.load_state_dict({k: torch.lerp(start[k].to(v.device), v, blend) if v.is_floating_point() else v
                                    for k, v in trained.items()})
    return unet, text_encoder, tokenizer


def _classifier_samples(named: Sequence[frozenset[str]], t: torch.Tensor, stage: UNetStageConfig) -> torch.Tensor:
    """Batch positions (k,) that take the expression classifier term: the caption names the sample's expression
    (`named[j]`, the axes `training_caption` kept: no clause dropout, no empty caption) and the timestep is below
    `classifier_max_timestep`; the first `classifier_samples` of them."""
    picked = [j for j, axes in enumerate(named) if "expression" in axes and int(t[j]) < stage.classifier_max_timestep]
    return torch.tensor(picked[: stage.classifier_samples], dtype=torch.long)


def expression_classifier_loss(vae, noise_scheduler, classifier, x0, noise, t, pred, wanted: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `classifier`'s expression head (an `IdentityEncoder`) on the decoded one-step estimate x̂₀ of
    the scaled latents `x0` (k, C, h, w) noised with `noise` at `t`, given the UNet's `pred`, against `wanted` (k,)
    `EXPRESSIONS` indices. Differentiable in `pred`."""
    pixels = decoded_estimate(vae, noise_scheduler, x0, noise, t, pred, classifier.config.image_size)  # (k, 3, S, S)
    return F.cross_entropy(classifier(pixels)[2], wanted)


def _check_exported(folder: str) -> None:
    if not all((Path(folder) / part / "config.json").exists() for part in ("unet", "text_encoder")):
        raise HyperdiffError(f"`unet.init_from` must be a base-model folder with unet/ and text_encoder/, got {folder!r}")


def _exported_states(unet, text_encoder, folder: str) -> tuple[dict, dict]:
    """An exported base model's UNet and text encoder state dicts (fp32, whatever the file's dtype), checked against
    the configured `unet` and `text_encoder`: the same tensor names and shapes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    _check_exported(folder)
    states = []
    for module, loaded in ((unet, UNet2DConditionModel.from_pretrained(folder, subfolder="unet")),
                           (text_encoder, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))):
        state, own = {k: v.float() for k, v in loaded.state_dict().items()}, module.state_dict()
        bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        if bad:
            raise HyperdiffError(f"`unet.init_from` {folder!r} does not match the configured model: {bad[0]} "
                                 f"({len(bad)} tensors differ)")
        states.append(state)
    return states[0], states[1]


def identifier_from_class(text_encoder, tokenizer, identifier: str, word: str) -> None:
    """Copy `word`'s input-embedding row into `identifier`'s (both one token of `tokenizer`). No training caption
    names the identifier, so its row is still the random initialisation, and every later word of a prompt attends to
    it: on the fourth base "a sks face, ..." obeyed 88 % of scene words where "a face, ..." obeyed 99 %. DreamBooth
    assumes an identifier with a weak prior; starting it from its class word, as textual inversion starts a new token
    from an initializer word, gives it one ("a sks face" reads as "a face face"). Prompts without it are unchanged."""
    emb = text_encoder.get_input_embeddings().weight  # (vocab, d)
    (target,), (source,) = (tokenizer(w, add_special_tokens=False).input_ids for w in (identifier, word))
    with torch.no_grad():
        emb[target] = emb[source]


def export_pipeline(cfg: BaseTrainConfig, vae, unet, text_encoder, tokenizer, export_dir: Path) -> Path:
    """A standard diffusers folder, fp16 weights, DPM-Solver++ scheduler; replaced atomically (temp folder + rename)."""
    from diffusers import StableDiffusionPipeline

    scheduler = tiny_scheduler(cfg.model)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # UNet and VAE in fp16 (diffusers loads them as fp32 unless asked otherwise); the small text encoder stays fp32,
    # since transformers keeps a checkpoint's dtype and a plain from_pretrained would then mix fp16 and fp32.
    for module in (pipe.unet, pipe.vae):
        torch.nn.Module.to(module, dtype=torch.float16)
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    tmp.rename(export_dir)
    for module in (pipe.unet, pipe.vae):
        torch.nn.Module.to(module, dtype=torch.float32)
    return export_dir


def _accelerator(cfg: BaseTrainConfig, stage: str):
    """One Accelerator per stage: a checkpoint then holds exactly that stage's models and optimizer."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if cfg.report_to != "none":
        accelerator.init_trackers(f"synthfaces_base_{stage}", config={"config": str(cfg.to_dict())})
    return accelerator


def train(cfg: BaseTrainConfig, resume: bool = True, export_only: bool = False) -> Path:
    """Both stages and the export; returns the exported folder. `export_only` exports the EMA weights of the
    latest UNet checkpoint without training further (to evaluate a run in progress)."""
    from accelerate.utils import set_seed

    if cfg.unet.init_from:
        _check_exported(cfg.unet.init_from)  # before any stage runs
    set_seed(cfg.seed)
    images, scenes = render_cache(cfg.data, cfg.model.image_size)
    accelerator = _accelerator(cfg, "vae")
    vae = train_vae(cfg, accelerator, images, resume)
    accelerator.end_training()
    latents = encode_latents(vae, images, Path(cfg.output_dir) / "latents.safetensors")
    logger.info("latent scaling factor %.4f", vae.config.scaling_factor)
    if cfg.decoder.steps > 0:
        accelerator = _accelerator(cfg, "decoder")
        vae = train_decoder(cfg, accelerator, vae, images, resume)
        accelerator.end_training()
    accelerator = _accelerator(cfg, "unet")
    unet, text_encoder, tokenizer = train_unet(cfg, accelerator, vae, latents, scenes, resume, export_only)
    refined = Path(cfg.output_dir) / "refine" / "final"
    if cfg.refine.steps > 0 and not export_only:
        accelerator.end_training()
        accelerator = _accelerator(cfg, "refine")
        pairs = generated_pairs(cfg, accelerator, vae, unet, text_encoder, tokenizer, latents, scenes)
        vae = train_refine(cfg, accelerator, vae, images, pairs, resume)
    elif cfg.refine.steps > 0 and (refined / "config.json").exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(refined)
    if cfg.identifier:
        identifier_from_class(text_encoder, tokenizer, cfg.identifier, cfg.identifier_class)
    path = Path(cfg.export_dir)
    if accelerator.is_main_process:
        export_pipeline(cfg, vae, unet, text_encoder, tokenizer, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path
