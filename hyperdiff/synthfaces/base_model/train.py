"""Training the SynthFaces base model: the stages in order, then the export.

Contract:
- `train(cfg, resume, export_only)` runs stage 1 (`vae.train_vae`, then `data.encode_latents`), 1b
  (`vae.train_decoder`), 2 (`unet.train_unet`) and 3 (`vae.generated_pairs`, `vae.train_refine`), each under an
  accelerator of its own, and returns the exported folder.
- Before the export, the identifier token's embedding (`identifier`, never in a caption) is set to its class
  word's (`identifier_class`): `identifier_from_class`.
- `export_pipeline` writes a standard diffusers folder (fp16 UNet and VAE, DPM-Solver++ scheduler) that
  `StableDiffusionPipeline.from_pretrained(path, local_files_only=True)` loads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from hyperdiff.models.tiny import tiny_scheduler
from hyperdiff.synthfaces.base_model.config import BaseTrainConfig
from hyperdiff.synthfaces.base_model.data import encode_latents, render_cache
from hyperdiff.synthfaces.base_model.unet import _check_exported, train_unet
from hyperdiff.synthfaces.base_model.vae import generated_pairs, train_decoder, train_refine, train_vae

logger = logging.getLogger(__name__)


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
