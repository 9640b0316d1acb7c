"""The fine-tune's loss terms and the encodings they take, shared with hypernet training and the base-model trainer.

Contract:
- `encode_prompts(pipe, prompts)` → the text encoder's last hidden states (N, T, d); `encode_images(pipe, images)` →
  the VAE's posterior means, scaled (N, C, h, w).
- `noise_prediction` (the UNet's prediction under per-call deltas and the epsilon or v target), `per_sample_mse`
  (optionally weighted per element), `diffusion_loss` (their per-sample MSE, noise and timesteps given or drawn by
  `draw_noise`) and `identity_loss` (an identity encoder's 1 − cosine on the one-step estimate x̂₀, decoded by
  `decoded_estimate`, against targets embedded by `identity_embeddings`: once per run in the fine-tune, whose
  references do not change). The base-model trainer reads `decoded_estimate` with the encoder's expression head.
- `frozen_identity_encoder(path, device)`: the identity encoder those terms read ("" = the shipped SynthFaces one).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from hyperdiff.errors import HyperdiffError
from hyperdiff.synthfaces.images import to_batch


def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden states for `prompts`, padded to the tokenizer's maximum length: (N, T, d)."""
    with torch.no_grad():
        ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(pipe.device)
        return pipe.text_encoder(ids)[0]  # (N, T, d)


@torch.no_grad()
def encode_images(pipe, images: Sequence[Image.Image]) -> torch.Tensor:
    """Posterior means of the VAE, scaled: (N, C, h, w)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = pipe.image_processor.preprocess(list(images), height=size, width=size).to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def noise_prediction(pipe, noise_scheduler, latents, text, hyper_loras, noise: torch.Tensor, timesteps: torch.Tensor):
    """The UNet's prediction on `latents` noised with `noise` at `timesteps`, with the given per-call deltas, and the
    training target (epsilon or v, as the scheduler says): both (N, C, h, w)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = pipe.unet(noisy, timesteps, text, cross_attention_kwargs={"hyper_lora": hyper_loras}).sample
    eps = noise_scheduler.config.prediction_type == "epsilon"
    return pred, noise if eps else noise_scheduler.get_velocity(latents, noise, timesteps)


def per_sample_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(N, ...) x2 -> (N,) mean squared difference per sample, in float32; `weight` (broadcast to the elements, e.g.
    (1, 1, h, w)) multiplies each squared difference first."""
    squared = F.mse_loss(a.float(), b.float(), reduction="none")
    return (squared if weight is None else squared * weight).mean(dim=tuple(range(1, a.dim())))


@torch.no_grad()
def encoder_readings(encoder, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`encoder`'s readings of PIL `images` on its device: unit embeddings (N, e), hat and expression logits (N, 2),
    (N, 4)."""
    return encoder(to_batch(images, encoder.config.image_size).to(encoder.device))


def identity_embeddings(encoder, images: Sequence[Image.Image]) -> torch.Tensor:
    """The targets of `identity_loss`: `encoder`'s unit-norm embeddings of PIL `images`, (N, e) on its device."""
    return encoder_readings(encoder, images)[0]


def decoded_estimate(vae, noise_scheduler, latents, noise, t, pred, size: int) -> torch.Tensor:
    """The one-step estimate x̂₀ as pixels an image encoder reads: (N, 3, size, size) in [0, 1]. x̂₀ is the clean latent
    that the UNet's prediction `pred` (epsilon or v) implies on scaled `latents` (N, C, h, w) noised with `noise` at
    `t`, decoded by `vae` (resized to `size` if the VAE makes another size). Differentiable in `pred`."""
    noisy = noise_scheduler.add_noise(latents, noise, t)
    alpha_bar = noise_scheduler.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1).to(pred.dtype)  # (N, 1, 1, 1)
    if noise_scheduler.config.prediction_type == "epsilon":
        clean = (noisy - (1 - alpha_bar).sqrt() * pred) / alpha_bar.sqrt()  # (N, C, h, w)
    else:  # v-prediction
        clean = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * pred
    pixels = vae.decode(clean.to(vae.dtype) / vae.config.scaling_factor).sample  # (N, 3, H, W) in [-1, 1]
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((pixels.float() + 1) / 2).clamp(0, 1)


def identity_loss(pipe, noise_scheduler, encoder, latents, noise, t, pred, wanted: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos(`wanted`, identity embedding of x̂₀), x̂₀ from `decoded_estimate` with the pipeline's VAE.
    Gradients flow through the VAE decoder and `encoder` (both frozen) into `pred`; `wanted` (N, e) are the targets'
    `identity_embeddings`."""
    pixels = decoded_estimate(pipe.vae, noise_scheduler, latents, noise, t, pred, encoder.config.image_size)
    return embedding_distance(encoder(pixels)[0], wanted)


def embedding_distance(made: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos between unit embeddings `made` (N, e) and `wanted` (N, e), row by row."""
    return (1 - (made * wanted.to(made)).sum(dim=1)).mean()


def frozen_identity_encoder(path: str, device):
    """The identity encoder at `path` ("" = the shipped SynthFaces one) on `device`, in eval mode, without gradients."""
    from hyperdiff.synthfaces.encoder import IdentityEncoder

    return IdentityEncoder.from_pretrained(path or None).to(device).eval().requires_grad_(False)


def draw_noise(noise_scheduler, latents: torch.Tensor, gen: torch.Generator | None):
    """Noise like `latents` (N, C, h, w) and N training timesteps, drawn from `gen` in that order on the CPU."""
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    return noise, t.to(latents.device)


def diffusion_loss(pipe, noise_scheduler, latents, text, hyper_loras, gen: torch.Generator | None = None,
                   reduce: bool = True, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None):
    """Per-sample MSE of the UNet's prediction with the given per-call deltas: latents (N, C, h, w), text (N, T, d).
    Noise and timesteps are given together, or drawn together from `gen` (`draw_noise`)."""
    if (noise is None) != (timesteps is None):
        raise HyperdiffError("`noise` and `timesteps` must be given together (or neither, to draw both from `gen`)")
    if noise is None:
        noise, timesteps = draw_noise(noise_scheduler, latents, gen)
    per_sample = per_sample_mse(*noise_prediction(pipe, noise_scheduler, latents, text, hyper_loras, noise, timesteps))
    return per_sample.mean() if reduce else per_sample

