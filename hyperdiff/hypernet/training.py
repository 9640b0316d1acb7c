"""Hypernet training (stage 2), for any number of accelerate processes.

Contract:
- `HypernetTrainConfig` (YAML + CLI flags named like diffusers' training scripts) fixes a run.
- Each step draws a *global* batch of `train_batch_size × num_processes` identities, reference/target pairs, noise
  and timesteps from a generator seeded by `(seed, step)`; process r takes slice r. So N processes with batch B do
  what 1 process with batch N·B does (DDP averages equal-sized shards; every loss term is a mean over the local
  batch; the LR schedule, which accelerate steps once per process, is laid out over `steps × N`), up to float
  rounding, and a resumed run continues the same sequence.
- On a machine without CUDA, several processes (`accelerate launch --multi_gpu --num_processes N`) only form one
  gloo process group when accelerate is told `cpu=True` (otherwise every process runs alone as rank 0 of 1): that
  happens automatically when the launcher says WORLD_SIZE > 1, or always with `cpu: true`.
- Loss = `diffusion_weight` · diffusion loss of the target image under its own caption, with the predicted weights
  injected through the per-sample processors, + `weight_weight` · MSE between predicted and stage-1 LiDB factors,
  + `distill_weight` · MSE between the UNet's prediction under the predicted weights and under the identity's stage-1
  weights (same noisy target latent, caption and timestep): function-space distillation of stage 1, which does not
  care which of the many equivalent factorisations DreamBooth happened to find (weight regression does, and stage-1
  factors of one identity from two seeds are nearly orthogonal), + `identity_weight` · (1 − cosine) between the
  identity embeddings of the target image and of the one-step estimate of it that the UNet's prediction under the
  predicted weights implies (x̂₀ from the same noisy latent, decoded by the VAE; the frozen identity encoder
  `identity_encoder`, "" = the shipped one): a direct identity signal, which the noise-space terms dilute in errors
  the identity does not show in. + `hat_weight` · the cross-entropy of the same encoder's hat head on that estimate
  against its reading of the target image, at every timestep: the sampler lays a hat out at high noise (x̂₀ at
  t = 999 mostly shows it already), and an identity term alone lets the predicted weights draw one where none was asked
  for, since the encoder's embedding barely tells a hat from hair. + `expression_prior_weight` · KL(base ‖ made) of
  the same encoder's expression head: its reading of the base model's own x̂₀ (no adapter; same noisy latent, caption
  and timestep, no gradient) against its reading of the estimate under the predicted weights, at every timestep.
  Prior preservation in the classifier's terms: the predicted weights may change who the face is, not the
  expression the caption gives it. (The target's reading, the hat term's label, would ask for what no adapter
  gives: the encoder reads every clean render's expression at P ≈ 1, but on the base model's x̂₀ of sad renders,
  noised at t = 100 as at t = 900, P(sad) ≈ 0.4.)
  With no term that runs the UNet (weight regression only, the paper's stage-2 warm start) the UNet is skipped
  entirely. `expression_weight` (SynthFaces) multiplies the noise-space errors by the base trainer's map of where the
  expression words act (mean 1).
  With `targets_dir`, batches draw only the identities that have a target (stage 2 trains on stage 1's identities,
  as in the paper); without, any identity of the source.
- `save_state` every `checkpointing_steps` into `output_dir/checkpoint-N` (newest `checkpoints_total_limit` kept),
  written as `checkpoint-N.tmp` and renamed once complete, so a run killed mid-save never leaves a half checkpoint;
  `resume_from_checkpoint="latest"` continues (a checkpoint wins over `init_from`, which only starts a fresh run from
  a trained hypernet's weights, e.g. to distil new stage-1 targets into it; fresh optimizer and LR schedule); the
  final hypernet is `save_pretrained` into `output_dir` itself, and with `export_dir` set, also in fp16 there (the
  shipped copy: configs/synthfaces.yaml exports the embedded hypernet).
- Stage 1, the targets `targets_dir` holds, is `hyperdiff.hypernet.targets`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hyperdiff.config import to_dict
from hyperdiff.core.adapter import Adapter
from hyperdiff.core.layers import LayerTable
from hyperdiff.core.lidb import stable_seed
from hyperdiff.core.processors import hyper_lora_processors
from hyperdiff.data.identities import FolderIdentities, SynthFacesIdentities
from hyperdiff.errors import HyperdiffError, check_number_in, check_positive_int, check_positive_number
from hyperdiff.hypernet import HyperNetConfig, HyperNetwork
from hyperdiff.personalize.finetune import FinetuneConfig
from hyperdiff.personalize.losses import (decoded_estimate, embedding_distance, encode_images, encode_prompts,
                                          encoder_readings, frozen_identity_encoder, noise_prediction, per_sample_mse)
from hyperdiff.synthfaces.base_model.data import expression_weight_map
from hyperdiff.train import checkpoints

logger = logging.getLogger(__name__)


@dataclass
class DataSourceConfig:
    kind: str = "synthfaces"  # "synthfaces" | "folder"
    path: str = ""  # folder kind
    seed_start: int = 0  # synthfaces kind: identity seeds [seed_start, seed_stop) — training seeds only
    seed_stop: int = 900_000
    image_size: int = 64
    token: str = "sks"
    same_image: float = 0.0  # probability that the target is the reference itself (reconstruction)

    def __post_init__(self) -> None:
        if self.kind not in ("synthfaces", "folder"):
            raise HyperdiffError(f"`data.kind` must be 'synthfaces' or 'folder', got {self.kind!r}")
        if self.kind == "folder" and not self.path:
            raise HyperdiffError("`data.path` must name the dataset folder for kind 'folder'")

    def build(self):
        if self.kind == "folder":
            return FolderIdentities(self.path, self.token, self.image_size, self.same_image)
        return SynthFacesIdentities(range(self.seed_start, self.seed_stop), self.image_size, self.token, self.same_image)


@dataclass
class HypernetTrainConfig:
    hypernet: HyperNetConfig = field(default_factory=HyperNetConfig)
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    base: str = ""  # "" = embedded SynthFaces base; a folder, .safetensors, hub id, or "hyperdiff:tiny"
    output_dir: str = "runs/hypernet"
    init_from: str = ""  # a trained hypernet folder (save_pretrained) whose weights start the run; "" = random init
    export_dir: str = ""  # also save the final hypernet here in fp16 ("" = no export)
    max_train_steps: int = 1000
    train_batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    diffusion_weight: float = 1.0
    weight_weight: float = 0.02
    distill_weight: float = 0.0  # function-space distillation of the stage-1 targets (needs targets_dir)
    identity_weight: float = 0.0  # identity-encoder loss on the one-step estimate of the target image
    identity_encoder: str = ""  # the frozen encoder of the three terms that read x̂₀; "" = the shipped one
    hat_weight: float = 0.0  # the encoder's hat head on the one-step estimate, against its reading of the target
    expression_prior_weight: float = 0.0  # its expression head on that estimate against its reading of the base's
    expression_weight: float = 0.0  # SynthFaces: diffusion/distillation errors × (1 + w · expression_map), mean 1
    targets_dir: str = ""  # stage-1 targets; "" = none
    checkpointing_steps: int = 250
    checkpoints_total_limit: int = 2
    validation_steps: int = 0  # 0 = no validation images
    seed: int = 0
    report_to: str = "tensorboard"
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(kind="lidb", steps=200, learning_rate=1e-2, prior_weight=0.0))
    precompute_identities: int = 64  # stage 1: how many identities (the first N keys)
    precompute_batch: int = 16  # stage 1: identities fine-tuned together
    cpu: bool = False  # force CPU processes (automatic without CUDA when several processes are launched)

    def __post_init__(self) -> None:
        for name in ("max_train_steps", "train_batch_size", "checkpointing_steps", "checkpoints_total_limit",
                     "precompute_identities", "precompute_batch"):
            check_positive_int(name, getattr(self, name))
        check_positive_number("learning_rate", self.learning_rate)
        for name in ("diffusion_weight", "weight_weight", "distill_weight", "identity_weight", "hat_weight",
                     "expression_prior_weight", "expression_weight"):
            check_number_in(name, getattr(self, name), 0.0, 1e6)
        if self.distill_weight > 0 and not self.targets_dir:
            raise HyperdiffError("`distill_weight` > 0 needs stage-1 targets: set `targets_dir`")
        if (self.diffusion_weight == 0 and self.distill_weight == 0 and not self.reads_estimate
                and not (self.targets_dir and self.weight_weight > 0)):
            raise HyperdiffError("`diffusion_weight` 0 needs another loss term: a positive `identity_weight`,"
                                 " `hat_weight` or `expression_prior_weight`, or stage-1 targets (`targets_dir`) and a"
                                 " positive `weight_weight` or `distill_weight`")
        if self.expression_weight > 0 and self.data.kind != "synthfaces":
            raise HyperdiffError("`expression_weight` > 0 needs SynthFaces data (`data.kind` 'synthfaces'): its map comes"
                                 f" from renders, got `data.kind` {self.data.kind!r}")
        if not self.max_grad_norm >= 0:
            raise HyperdiffError(f"`max_grad_norm` must be a non-negative number (0 = no clipping), got {self.max_grad_norm!r}")

    @property
    def reads_estimate(self) -> bool:
        """Whether a term reads the decoded one-step estimate with the frozen identity encoder."""
        return self.identity_weight > 0 or self.hat_weight > 0 or self.expression_prior_weight > 0

    def to_dict(self) -> dict:
        return to_dict(self)


def _use_cpu(cfg: HypernetTrainConfig) -> bool:
    """accelerate builds a CPU (gloo) process group only with cpu=True; without CUDA, launched processes need it."""
    return cfg.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def _load_base(spec: str):
    from hyperdiff.models import load_base

    pipe = load_base(spec or None)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_hypernet(cfg: HypernetTrainConfig, resume: bool = True) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=_use_cpu(cfg),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if cfg.report_to != "none":
        accelerator.init_trackers("hypernet", config={"config": str(cfg.to_dict())})
    pipe = _load_base(cfg.base).to(accelerator.device)
    table = LayerTable.from_unet(pipe.unet)
    source = cfg.data.build()
    targets = _targets(cfg, table)
    keys = [k for k in source.keys if str(k) in targets] if targets else source.keys  # stage 2: stage 1's identities
    if not keys:
        raise HyperdiffError(f"no identity of the training data has a stage-1 target in `targets_dir` '{cfg.targets_dir}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed("hypernet-init", cfg.seed))
        info = {"base_model": cfg.base or "synthfaces", "name": out.name, "training": cfg.to_dict(),
                "num_processes": accelerator.num_processes}
        model = HyperNetwork(cfg.hypernet, table, info)
    if cfg.init_from:
        _init_from(model, cfg, table)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    # accelerate steps a prepared scheduler once per process at every optimizer step: lay it out over steps × N
    world = accelerator.num_processes
    lr_sched = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=cfg.warmup_steps * world,
                             num_training_steps=cfg.max_train_steps * world)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    start = 0
    if resume:
        path, start = checkpoints.latest(out)
        if path is not None:
            accelerator.load_state(str(path))
    hp = accelerator.unwrap_model(model)
    id_encoder = None
    if cfg.reads_estimate:
        id_encoder = frozen_identity_encoder(cfg.identity_encoder, accelerator.device)
    cells = None  # (1, 1, h, w) loss weight on the latent grid, where the expression words act
    if cfg.expression_weight > 0:
        with torch.no_grad():
            cells = expression_weight_map(cfg.expression_weight, cfg.data.image_size, cfg.seed, pipe.vae)
        cells = cells.to(accelerator.device)
    with hyper_lora_processors(pipe.unet, table):  # per-call deltas reach every attention module
        _train_loop(cfg, accelerator, pipe, model, hp, optimizer, lr_sched, noise_scheduler, source, keys, targets, table,
                    start, id_encoder, cells)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        hp.save_pretrained(out)
        if cfg.export_dir:
            hp.save_pretrained(cfg.export_dir, dtype=torch.float16)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _init_from(model: HyperNetwork, cfg: HypernetTrainConfig, table: LayerTable) -> None:
    """Copy the weights of the hypernet at `cfg.init_from` into `model`: same base layers (fingerprint) and same
    architecture. The run's own `dropout` and `sample_noise` apply, and its `alpha` and `low_noise`: a calibrated gain
    saved with the weights is not carried over."""
    trained = HyperNetwork.from_pretrained(cfg.init_from, table=table)
    differ = [f.name for f in fields(HyperNetConfig) if f.name not in ("alpha", "low_noise", "dropout", "sample_noise")
              and getattr(trained.config, f.name) != getattr(cfg.hypernet, f.name)]
    if differ:
        name = differ[0]
        raise HyperdiffError(f"`init_from` '{cfg.init_from}' has another architecture: its `hypernet.{name}` is "
                             f"{getattr(trained.config, name)!r}, this run's {getattr(cfg.hypernet, name)!r}")
    if trained.config.alpha != cfg.hypernet.alpha:
        logger.warning("init_from '%s' was saved with alpha %s; this run trains under alpha %s (its gain is not carried "
                       "over)", cfg.init_from, trained.config.alpha, cfg.hypernet.alpha)
    if trained.config.low_noise != cfg.hypernet.low_noise:
        logger.warning("init_from '%s' was saved with low-noise gain %s; this run's is %s (it is not carried over)",
                       cfg.init_from, trained.config.low_noise.to_dict(), cfg.hypernet.low_noise.to_dict())
    model.load_state_dict(trained.state_dict())


def _train_loop(cfg, accelerator, pipe, model, hp, optimizer, lr_sched, noise_scheduler, source, keys, targets, table,
                start, id_encoder=None, cells=None):
    """`keys`: the identities batches draw from (all of `source`, or those with a stage-1 target); `id_encoder`: the
    frozen identity encoder of the terms that read x̂₀; `cells`: the noise-space terms' weight
    map (None = uniform)."""
    out = Path(cfg.output_dir)
    world, rank, per = accelerator.num_processes, accelerator.process_index, cfg.train_batch_size
    bar = tqdm(range(start, cfg.max_train_steps), desc="hypernet", disable=not accelerator.is_main_process, mininterval=5)
    for step in bar:
        gen = torch.Generator().manual_seed(stable_seed("hypernet-batch", cfg.seed, step))
        batch = [keys[int(i)] for i in torch.randint(len(keys), (per * world,), generator=gen)]
        pairs = [source.pair(k, gen) for k in batch]
        mine = slice(rank * per, (rank + 1) * per)
        refs = torch.cat([hp.encoder.preprocess([p[0]]) for p in pairs[mine]]).to(accelerator.device)
        a_train, b_train = model(refs)  # (B, L, a, r), (B, L, r, b)
        terms: dict[str, torch.Tensor] = {}  # unweighted loss terms, logged
        if cfg.diffusion_weight > 0 or cfg.distill_weight > 0 or id_encoder is not None:
            with torch.no_grad():
                latents = encode_images(pipe, [p[1] for p in pairs[mine]])
            text = encode_prompts(pipe, [p[2] for p in pairs[mine]])  # (B, T, d)
            # noise and timesteps of the whole global batch, so each sample's draw does not depend on the process count
            noise = torch.randn((per * world, *latents.shape[1:]), generator=gen)[mine].to(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (per * world,), generator=gen)[mine]
            t = t.to(latents.device)
            pred, target = noise_prediction(pipe, noise_scheduler, latents, text, [hp.hyper_lora(a_train, b_train)],
                                            noise, t)  # (B, C, h, w) each
            if cfg.diffusion_weight > 0:
                terms["diffusion"] = per_sample_mse(pred, target, cells).mean()
            if cfg.distill_weight > 0:
                with torch.no_grad():
                    teacher = Adapter.stack([targets[str(k)] for k in batch[mine]], table)
                    taught, _ = noise_prediction(pipe, noise_scheduler, latents, text, [teacher], noise, t)
                terms["distill"] = per_sample_mse(pred, taught, cells).mean()
            if id_encoder is not None:
                terms.update(_encoder_terms(cfg, pipe, noise_scheduler, id_encoder, latents, noise, t, pred,
                                            [p[1] for p in pairs[mine]], text))
        weight_loss = _weight_loss(batch[mine], a_train, b_train, targets, table)
        if weight_loss is not None:
            terms["weight"] = weight_loss
        loss = sum((getattr(cfg, f"{name}_weight") * value for name, value in terms.items()), a_train.new_zeros(()))
        accelerator.backward(loss)
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            accelerator.log({"train/loss": loss.item(), "train/lr": lr_sched.get_last_lr()[0],
                             **{f"train/{name}": value.item() for name, value in terms.items()}}, step=step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpointing_steps == 0 and step + 1 < cfg.max_train_steps:
            checkpoints.save(accelerator, out, step + 1, cfg.checkpoints_total_limit)
        if cfg.validation_steps and (step + 1) % cfg.validation_steps == 0 and accelerator.is_main_process:
            validate(cfg, pipe, hp, source, table, step + 1)


def _encoder_terms(cfg, pipe, noise_scheduler, encoder, latents, noise, t, pred, targets, text
                   ) -> dict[str, torch.Tensor]:
    """The frozen encoder's terms on the one-step estimate x̂₀ (decoded once) of each target image (PIL `targets`),
    each a mean over the local batch: "identity", 1 − cosine of the embeddings; "hat", the cross-entropy of the hat
    head against its reading of the target (soft labels, so any data the encoder reads will do); "expression_prior",
    KL(base ‖ made) of the expression head, the base model's x̂₀ predicted without deltas under `text` (B, T, d)."""
    pixels = decoded_estimate(pipe.vae, noise_scheduler, latents, noise, t, pred, encoder.config.image_size)
    made = encoder(pixels)  # (B, e) unit embeddings, (B, 2) hat logits, (B, 4) expression logits
    terms = {}
    if cfg.identity_weight > 0 or cfg.hat_weight > 0:
        wanted = encoder_readings(encoder, targets)  # no gradient: the targets' readings
    if cfg.identity_weight > 0:
        terms["identity"] = embedding_distance(made[0], wanted[0])
    if cfg.hat_weight > 0:
        terms["hat"] = F.cross_entropy(made[1], wanted[1].softmax(dim=1))
    if cfg.expression_prior_weight > 0:
        with torch.no_grad():
            base, _ = noise_prediction(pipe, noise_scheduler, latents, text, [], noise, t)  # (B, C, h, w)
            kept = encoder(decoded_estimate(pipe.vae, noise_scheduler, latents, noise, t, base,
                                            encoder.config.image_size))[2]  # (B, 4)
        terms["expression_prior"] = F.kl_div(made[2].log_softmax(dim=1), kept.log_softmax(dim=1), log_target=True,
                                             reduction="batchmean")
    return terms


VALIDATION_PROMPT = "a {token} face, smiling, wearing a hat, on a purple background"


@torch.no_grad()
def validate(cfg: HypernetTrainConfig, pipe, hp, source, table, step: int, n: int = 4) -> Path:
    """Predict adapters for `n` fixed identities and generate one image each in a scene their references lack;
    writes `output_dir/validation/step-<step>.png` (reference | generated per row). Called on the main process with
    the per-sample processors installed."""
    from hyperdiff.synthfaces.sheet import contact_sheet, save_png

    was = hp.training
    hp.eval()
    try:
        gen = torch.Generator().manual_seed(stable_seed("validation", cfg.seed))
        keys = source.keys[-n:]  # the same identities every time
        refs = [source.pair(k, gen)[0] for k in keys]
        adapters = [hp.predict([ref], token=cfg.data.token) for ref in refs]
        deltas = Adapter.stack(adapters, table).repeat_for(1, guidance=True)
        prompt = VALIDATION_PROMPT.format(token=cfg.data.token)
        images = pipe([prompt] * n, num_inference_steps=20, guidance_scale=4.0, output_type="pil",
                      generator=[torch.Generator().manual_seed(i) for i in range(n)],
                      cross_attention_kwargs={"hyper_lora": deltas}).images
    finally:
        hp.train(was)
    return save_png(contact_sheet([[r, im] for r, im in zip(refs, images)], ["reference", prompt[:18] + "…"]),
                    Path(cfg.output_dir) / "validation" / f"step-{step}.png")


def _targets(cfg: HypernetTrainConfig, table: LayerTable) -> dict[str, Adapter]:
    if not cfg.targets_dir:
        return {}
    folder = Path(cfg.targets_dir)
    if not folder.is_dir():
        raise HyperdiffError(f"`targets_dir` '{folder}' does not exist")
    targets = {p.stem: Adapter.load(p, table) for p in sorted(folder.glob("*.safetensors"))}
    for ad in targets.values():
        if ad.kind != "lidb" or ad.lidb != cfg.hypernet.lidb:
            raise HyperdiffError(f"stage-1 targets in '{folder}' must be LiDB adapters with {cfg.hypernet.lidb}")
    return targets


def _weight_loss(keys, a_train, b_train, targets, table) -> torch.Tensor | None:
    have = [i for i, k in enumerate(keys) if str(k) in targets]
    if not have:
        return None
    losses = []
    for i in have:
        ad = targets[str(keys[i])]
        ta = torch.stack([ad.factors[r.name][0] for r in table]).to(a_train)  # (L, a, r)
        tb = torch.stack([ad.factors[r.name][1] for r in table]).to(b_train)  # (L, r, b)
        losses.append(F.mse_loss(a_train[i], ta) + F.mse_loss(b_train[i], tb))
    # a mean over the whole local batch (identities without a target count 0), like the diffusion term: equal shards
    # averaged by DDP then give the global batch's mean whatever the number of processes
    return torch.stack(losses).sum() / len(keys)
