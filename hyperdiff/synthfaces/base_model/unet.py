"""Training the SynthFaces base model: stage 2, the text encoder and UNet together.

Contract:
- Stage 2 `train_unet`: epsilon prediction with the SD noise schedule, min-SNR-γ loss weights, AdamW with warm-up and
  cosine decay, EMA weights (what is exported). `unet.expression_weight` > 0 up-weights the loss on the latent cells
  where the expression words act (`expression_map`: eyes, brows, mouth), which the plain loss barely sees.
  `unet.classifier_weight` > 0 adds a frozen identity encoder's expression cross-entropy on the decoded one-step
  estimate x̂₀ of samples whose caption names an expression (`personalize.losses.decoded_estimate`). `unet.init_from`
  starts the stage from an exported model's UNet and text encoder (when no UNet checkpoint exists yet);
  `unet.init_blend` < 1 ends it with a weighted average of those starting weights and the trained ones.
- Its checkpoints carry the EMA weights as safetensors beside accelerate's state (`_ema_saver`, `_load_ema`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hyperdiff.core.files import write_safetensors
from hyperdiff.errors import HyperdiffError
from hyperdiff.models.tiny import SD_SCHEDULE, tiny_components
from hyperdiff.personalize.losses import decoded_estimate, frozen_identity_encoder
from hyperdiff.synthfaces.base_model.config import BaseTrainConfig, UNetStageConfig
from hyperdiff.synthfaces.base_model.data import (SCENE_AXES, _batch_generator, _scene_of, expression_weight_map,
                                                  training_caption)
from hyperdiff.synthfaces.base_model.vae import _cosine
from hyperdiff.train import checkpoints


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
