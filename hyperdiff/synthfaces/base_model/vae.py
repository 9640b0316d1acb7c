"""Training the SynthFaces base model: the stages that train the VAE and its decoder.

Contract:
- Stage 1 `train_vae`: AutoencoderKL, MSE + `kl_weight`·KL; then every image is encoded once (posterior means) and
  `scaling_factor` is set to 1 / std of the latents (`data.encode_latents`).
- Stage 1b `train_decoder` (`decoder.steps` > 0): the decoder alone goes on learning (posterior samples of frozen
  encoder crops, as in stage 1); the encoder is frozen, so the latents, and any UNet checkpoint trained on them,
  stay valid. `decoder.expression_weight` > 0 up-weights the pixels where the expression words act.
- Stage 3 `train_refine` (`refine.steps` > 0, after the UNet): the decoder learns from the UNet's own latents too
  (`generated_pairs`: training renders re-noised and denoised by the trained UNet, img2img on latents), so it decodes
  what generation makes, not only the encoder's means; stage-1b crops stay in every batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hyperdiff import synthfaces
from hyperdiff.config import to_dict
from hyperdiff.core.files import write_safetensors
from hyperdiff.models.tiny import tiny_components, tiny_scheduler
from hyperdiff.synthfaces.base_model.config import BaseTrainConfig, StageConfig
from hyperdiff.synthfaces.base_model.data import _batch_generator, _pixels, _scene_of, expression_weight_map
from hyperdiff.train import checkpoints


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
