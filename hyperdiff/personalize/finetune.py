"""Fine-tuning engine: DreamBooth-style training of low-rank factors for one or many identities at once.

Contract:
- `finetune(pipe, references, config, start=None, prompts=None, prior=None)` trains, for each identity i, factors of
  kind `config.kind` — `lidb` (A_train, B_train with the aux bases of `config.lidb`) or `lora` (down, up of rank
  `config.rank`) — on every target Linear of `pipe.unet`, optionally on top of a fixed starting adapter `start[i]`.
  All identities train in one batch through the per-sample processors (one UNet call per step serves them all).
- Loss: the diffusion loss (epsilon or v target, as the pipeline's scheduler says) on the identity's reference
  latents with its prompts, plus `prior_weight` × the same loss on the base model's own images of varied class
  prompts (prior preservation, `make_prior`), computed with the identity's weights so they learn not to forget.
- Each step takes `config.batch_size` samples per identity: its images in turn, each with its own noise and timestep
  (and as many prior images); more samples per step give a less noisy gradient at a proportional cost.
- `identity_weight` > 0 adds that weight × `identity_loss` on the identity's samples, its reference image as the
  target (a frozen identity encoder, `identity_encoder`, "" = the shipped SynthFaces one): the denoising error on one
  reference says little about identity, the encoder says it directly. It costs a VAE decode per sample and step.
- `anchor_weight` > 0 adds that weight × the MSE between the prediction with the identity's weights and the start's
  own (no learned part; the base model's without a start) on fixed anchor samples: the identity's reference noised
  under each of `anchor_prompts` (the token in other scenes; noise and timesteps drawn once, `make_anchors`), one
  per step in turn, in the same UNet call as the reference samples. The learned part is kept from changing what
  other prompts naming the token do: the fine-tune learns the face, not the reference's expression.
- New factors start as a no-op that still learns: `up`/B_train = 0, `down`/A_train random.
- Returns one Adapter per identity; with `start`, the exact concatenation `start[i] + learned[i]` (rank r + r', no
  SVD): the rank-relaxed fast fine-tune. Every adapter samples with `config.low_noise` (`hyperdiff.core.schedule`; one
  strength by default); in a concatenation only the learned rank components do, and the start's keep the start's
  own schedule (`info.rank_schedules`), unless `start_keeps_schedule` is False. `snapshot(k, adapters)` also receives them, as they
  stand, after each step count k in `snapshot_steps`: with a constant learning rate and one seeded stream of draws, a
  run's state after k steps is that of a k-step run, so one run gives a whole convergence curve. One identity's start
  adapter is fused into a float32 UNet for the run (the processors then carry only the learned factors) and
  unfused, bit for bit, when it ends; a half-precision UNet carries it in the processors, unrounded. Deterministic in `config.seed` on CPU; progress via tqdm.
- Runs on the UNet's device: every random draw comes from one CPU generator (so a seed means the same noise on any
  device), the trainable factors are float32 there (their deltas computed in float32 also on a half-precision
  UNet: `hyperdiff.core.processors`), and a float16 UNet's loss is scaled (`torch.amp.GradScaler`) so its small
  gradients do not underflow. Adapters come back on the CPU.
- Its loss terms and the encodings they take are `hyperdiff.personalize.losses` (shared with hypernet training and
  the base-model trainer).
Uses: (a) DreamBooth-LiDB from scratch, (b) stage-1 targets for hypernet training, (c) rank-relaxed fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from hyperdiff.config import to_dict
from hyperdiff.core.adapter import Adapter
from hyperdiff.core.info import AdapterInfo
from hyperdiff.core.layers import LayerTable
from hyperdiff.core.lidb import LiDBConfig, aux_bases, compose
from hyperdiff.core.processors import HyperLoRA, LowRankDelta, hyper_lora_processors
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError, check_number_in, check_positive_int
from hyperdiff.inputs import check_prompt
from hyperdiff.personalize.losses import (diffusion_loss, draw_noise, encode_images, encode_prompts,
                                          frozen_identity_encoder, identity_embeddings, identity_loss,
                                          noise_prediction, per_sample_mse)

KINDS = ("lora", "lidb")
# Varied class prompts for prior preservation: the scene words the base model knows, without the identifier.
DEFAULT_PRIOR_PROMPTS = (
    "a face, smiling, on a red background",
    "a face, neutral, wearing a hat, on a blue background",
    "a face, surprised, on a green background",
    "a face, sad, wearing a hat, on a yellow background",
    "a face, smiling, wearing a hat, on a purple background",
    "a face, neutral, on a gray background",
    "a face, surprised, wearing a hat, on a red background",
    "a face, sad, on a blue background",
)
# Prompts for the anchor term: the identifier in scenes the fidelity benchmark does not ask for (nor its reference
# scene), every expression twice, half with a hat. `{token}` is the identifier.
DEFAULT_ANCHOR_PROMPTS = (
    "a {token} face, smiling, on a blue background",
    "a {token} face, smiling, wearing a hat, on a green background",
    "a {token} face, sad, on a red background",
    "a {token} face, sad, wearing a hat, on a gray background",
    "a {token} face, surprised, wearing a hat, on a yellow background",
    "a {token} face, surprised, on a purple background",
    "a {token} face, neutral, wearing a hat, on a red background",
    "a {token} face, neutral, on a green background",
)


@dataclass
class FinetuneConfig:
    kind: str = "lora"
    steps: int = 40
    batch_size: int = 1  # samples per identity per step: its images in turn, each with its own noise and timestep
    learning_rate: float = 1e-3
    rank: int = 4  # lora kind: r'
    alpha: float | None = None  # default: the rank (scale 1)
    lidb: LiDBConfig = field(default_factory=LiDBConfig)  # lidb kind
    init_std: float = 0.1  # std of the non-zero starting factor (down or A_train)
    prior_weight: float = 1.0  # 0 disables prior preservation
    prior_images: int = 8
    prior_steps: int = 20
    prior_guidance: float = 4.0
    prior_prompts: tuple[str, ...] = DEFAULT_PRIOR_PROMPTS
    instance_prompt: str = "a {token} face"
    token: str = "sks"
    identity_weight: float = 0.0  # identity-encoder loss on the one-step estimate x̂₀ of each reference sample
    identity_encoder: str = ""  # the identity_weight term's frozen encoder folder; "" = the shipped SynthFaces one
    anchor_weight: float = 0.0  # keep the start's predictions on the reference under `anchor_prompts` (0 = off)
    anchor_prompts: tuple[str, ...] = DEFAULT_ANCHOR_PROMPTS  # each names the subject by "{token}"
    seed: int = 0
    low_noise: LowNoiseGain = field(default_factory=LowNoiseGain)  # how its adapters sample (`hyperdiff.core.schedule`)
    start_keeps_schedule: bool = True  # on top of a start: its rank components keep the start's schedule

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HyperdiffError(f"`kind` must be one of {list(KINDS)}, got {self.kind!r}")
        for name in ("steps", "batch_size", "rank", "prior_images", "prior_steps"):
            check_positive_int(name, getattr(self, name))
        if not self.learning_rate > 0 or self.prior_weight < 0:
            raise HyperdiffError(f"`learning_rate` must be > 0 and `prior_weight` ≥ 0, got {self.learning_rate}, {self.prior_weight}")
        check_number_in("identity_weight", self.identity_weight, 0.0, 1e6)
        check_number_in("anchor_weight", self.anchor_weight, 0.0, 1e6)
        self.anchor_prompts = tuple(self.anchor_prompts)
        if not self.anchor_prompts or any(not isinstance(p, str) or "{token}" not in p for p in self.anchor_prompts):
            raise HyperdiffError(f"`anchor_prompts` must be prompts that each name the subject by {{token}}, got {list(self.anchor_prompts)}")
        for prompt in self.anchor_prompts:
            check_prompt("anchor_prompts", prompt, self.token)
        if not isinstance(self.start_keeps_schedule, bool):
            raise HyperdiffError(f"`start_keeps_schedule` must be True or False, got {self.start_keeps_schedule!r}")
        self.prior_prompts = tuple(self.prior_prompts)

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass
class Prior:
    """The base model's own images for prior preservation: latents (N, C, h, w) and text states (N, T, d)."""

    latents: torch.Tensor
    text: torch.Tensor


def initial_latents(pipe, generator: torch.Generator | list[torch.Generator], n: int) -> torch.Tensor:
    """The starting noise of a pipeline call for `n` images at the base's own size, drawn as diffusers draws it (one
    CPU generator for the batch, or one per image) but always in float32, then moved to the UNet's device and dtype:
    a seed gives the same image on every device and in every precision. (Given a CPU generator, diffusers draws in
    the UNet's dtype, and float16/bfloat16 draws are other numbers.) Pass it as the call's `latents`."""
    side = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, side, side)
    if isinstance(generator, list):
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generator])  # (n, C, h, w)
    else:
        noise = torch.randn((n, *shape), generator=generator)
    return noise.to(pipe.device, pipe.unet.dtype)


@torch.no_grad()
def make_prior(pipe, config: FinetuneConfig) -> Prior:
    """`config.prior_images` images of the base model over the varied class prompts (seeded, no adapter)."""
    prompts = [config.prior_prompts[i % len(config.prior_prompts)] for i in range(config.prior_images)]
    gen = torch.Generator().manual_seed(config.seed)
    latents = pipe(prompts, num_inference_steps=config.prior_steps, guidance_scale=config.prior_guidance,
                   latents=initial_latents(pipe, gen, len(prompts)), output_type="latent").images
    return Prior(latents, encode_prompts(pipe, prompts))


def _init_factors(
    table: LayerTable, n: int, config: FinetuneConfig, gen: torch.Generator, device: torch.device
) -> dict[str, list[torch.Tensor]]:
    """Float32 leaf tensors on `device`, drawn on the CPU from `gen`."""
    factors = {}
    for row in table:
        if config.kind == "lora":
            first = torch.randn(n, config.rank, row.in_features, generator=gen) * (config.init_std / row.in_features**0.5)
            second = torch.zeros(n, row.out_features, config.rank)  # up = 0
        else:
            lidb = config.lidb
            first = torch.randn(n, lidb.a, lidb.rank, generator=gen) * config.init_std  # A_train
            second = torch.zeros(n, lidb.rank, lidb.b)  # B_train = 0
        factors[row.name] = [first.to(device).requires_grad_(), second.to(device).requires_grad_()]
    return factors


def _deltas(table: LayerTable, factors, config: FinetuneConfig, scale: float, shared: bool) -> dict[str, LowRankDelta]:
    """Per-identity deltas (n, r, in), (n, out, r); `shared` (n = 1): that one identity's (r, in), (out, r), which the
    processors apply to the whole batch at once."""
    out = {}
    for row in table:
        first, second = factors[row.name]
        if config.kind == "lora":
            down, up = first, second  # (n, r, in), (n, out, r)
        else:
            aux = aux_bases(row.name, row.in_features, row.out_features, config.lidb, first.device)
            down, up = compose(first, second, *aux)
        out[row.name] = LowRankDelta(down[0], up[0], scale) if shared else LowRankDelta(down, up, scale)
    return out


@dataclass
class Anchors:
    """The anchor term's fixed samples, K per identity (`anchor_prompts` in turn, the identity's images in turn): clean
    latents and noise (n, K, C, h, w), timesteps (n, K), the prompts' text states (K, T, d), and `kept`, the
    start's prediction on them (n, K, C, h, w): what the learned part must not change."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    kept: torch.Tensor

    def at(self, step: int) -> tuple[torch.Tensor, ...]:
        """Step `step`'s anchor sample of every identity (anchor `step` mod K): latents, noise (n, C, h, w),
        timesteps (n,), text (n, T, d), kept (n, C, h, w)."""
        k = step % self.text.shape[0]
        n = self.latents.shape[0]
        return (self.latents[:, k], self.noise[:, k], self.timesteps[:, k], self.text[k].expand(n, -1, -1),
                self.kept[:, k])


@torch.no_grad()
def make_anchors(pipe, noise_scheduler, latents: Sequence[torch.Tensor], config: FinetuneConfig,
                 starts: Sequence[Sequence[HyperLoRA]], gen: torch.Generator) -> Anchors:
    """`Anchors` for identities with reference latents `latents[i]` (n_i, C, h, w), the start's prediction made
    with the per-call deltas `starts[i]` (inside `hyper_lora_processors`; [] for none or a fused start). Noise and
    timesteps are drawn from `gen`, identity by identity."""
    prompts = [p.format(token=config.token) for p in config.anchor_prompts]
    text = encode_prompts(pipe, prompts)  # (K, T, d)
    rows = []
    for lat, start in zip(latents, starts):
        clean = lat[[k % lat.shape[0] for k in range(len(prompts))]]  # (K, C, h, w)
        noise, t = draw_noise(noise_scheduler, clean, gen)
        kept = noise_prediction(pipe, noise_scheduler, clean, text, list(start), noise, t)[0]  # (K, C, h, w)
        rows.append((clean, noise, t, kept))
    clean, noise, t, kept = (torch.stack(r) for r in zip(*rows))  # (n, K, ...)
    return Anchors(clean, noise, t, text, kept)


def _interleave(main: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Identity-major batches: main (n * bs, ...) and extra (n, ...) -> (n * (bs + 1), ...), each identity's bs
    samples followed by its extra one."""
    n = extra.shape[0]
    return torch.cat([main.reshape(n, -1, *main.shape[1:]), extra.unsqueeze(1)], dim=1).flatten(0, 1)


def _split(both: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `_interleave` for `n` identities: (n * (bs + 1), ...) -> (n * bs, ...), (n, ...)."""
    grouped = both.reshape(n, -1, *both.shape[1:])  # (n, bs + 1, ...)
    return grouped[:, :-1].flatten(0, 1), grouped[:, -1]


def finetune(
    pipe,
    references: Sequence[Sequence[Image.Image]],
    config: FinetuneConfig = FinetuneConfig(),
    start: Sequence[Adapter] | None = None,
    prompts: Sequence[Sequence[str]] | None = None,
    prior: Prior | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    snapshot_steps: Collection[int] = (),
    snapshot: Callable[[int, list[Adapter]], None] | None = None,
) -> list[Adapter]:
    """Train one adapter per identity (`references[i]`: its images; `prompts[i]`: one prompt per image)."""
    from diffusers import DDPMScheduler

    if not references or any(len(r) == 0 for r in references):
        raise HyperdiffError("`references` must give at least one image for every identity")
    if start is not None and len(start) != len(references):
        raise HyperdiffError(f"`start` must give one adapter per identity, got {len(start)} for {len(references)}")
    if prompts is not None and [len(p) for p in prompts] != [len(r) for r in references]:
        raise HyperdiffError("`prompts` must give one prompt per reference image")
    if any(not isinstance(k, int) or not 1 <= k <= config.steps for k in snapshot_steps):
        raise HyperdiffError(f"`snapshot_steps` must be step counts from 1 to `steps` ({config.steps}), got {sorted(snapshot_steps)}")
    if snapshot_steps and snapshot is None:
        raise HyperdiffError("`snapshot_steps` needs a `snapshot` callable to receive the adapters")
    n = len(references)
    table = LayerTable.from_unet(pipe.unet)
    if start is not None:
        for ad in start:
            ad.check_table(table)
    gen = torch.Generator().manual_seed(config.seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    instance = config.instance_prompt.format(token=config.token)
    latents = [encode_images(pipe, refs) for refs in references]  # per identity (n_i, C, h, w)
    texts = [encode_prompts(pipe, p if prompts is not None else [instance] * len(refs)) for refs, p in zip(references, prompts or [None] * n)]
    if config.prior_weight > 0 and prior is None:
        prior = make_prior(pipe, config)
    device = pipe.unet.device
    encoder = frozen_identity_encoder(config.identity_encoder, device) if config.identity_weight > 0 else None
    # the identity term's targets, embedded once: per identity (n_i, e), indexed like `latents` each step
    embedded = [identity_embeddings(encoder, refs) for refs in references] if encoder is not None else None
    factors = _init_factors(table, n, config, gen, device)
    rank = config.rank if config.kind == "lora" else config.lidb.rank
    alpha = float(config.alpha if config.alpha is not None else rank)
    params = [t for pair in factors.values() for t in pair]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    # float16 on cuda: scale the loss so the UNet's small gradients do not underflow. 2**10 rather than the default
    # 2**16 keeps the first steps from overflowing (each overflow skips a step, and a fast fine-tune has 40).
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10,
                                  enabled=pipe.unet.dtype == torch.float16 and device.type == "cuda")
    bs = config.batch_size
    # One identity: its deltas serve every sample of the batch as they are (the processors' shared form: one addmm,
    # nothing repeated or batched). Several: each identity's deltas repeated for its bs samples (per-sample form).
    shared = n == 1

    def laid_out(learned: HyperLoRA, reps: int, start_laid_out: HyperLoRA | None) -> list[HyperLoRA]:
        """The per-call deltas for a batch of `reps` samples per identity: the learned ones (shared or repeated) and,
        for several identities, their starts laid out alike."""
        own = learned if shared else learned.repeat_for(reps, guidance=False)
        return [own] + ([start_laid_out] if start_laid_out is not None else [])

    def adapters(done: int) -> list[Adapter]:
        """The factors as they stand after `done` steps, one Adapter per identity (copied to the CPU; the start
        concatenated)."""
        source = f"finetune {config.kind} steps={done} batch_size={config.batch_size} lr={config.learning_rate:g}"
        if encoder is not None:
            source += f" identity_weight={config.identity_weight:g}"
        if config.anchor_weight > 0:
            source += f" anchor_weight={config.anchor_weight:g}"
        info = AdapterInfo(token=config.token, source=source, architecture=table.architecture,
                           low_noise=config.low_noise)
        out = []
        for i in range(n):
            trained = {name: (f[i].detach().cpu().clone(), s[i].detach().cpu().clone()) for name, (f, s) in factors.items()}
            ad = (Adapter.from_factors(trained, table, alpha=alpha, info=info) if config.kind == "lora"
                  else Adapter.from_lidb(trained, table, config.lidb, alpha=alpha, info=info))
            if start is not None:  # the learned part samples as the recipe says; the start as it did, or as the recipe
                ad = Adapter.concat([start[i], ad])
                lead = start[i].schedule_parts if config.start_keeps_schedule else ()
                ad.info = replace(ad.info, low_noise=config.low_noise, rank_schedules=lead)
            out.append(ad)
        return out

    # The starting adapters: one identity's is fused into a float32 UNet for the run (no processor work per step;
    # unfused bit for bit at the end) and installed in the processors of a half-precision one (rounded into bfloat16
    # weights a delta a hundredth of the weight keeps only a few bits: the bf16 fine-tune's learned delta had cosine
    # 0.936 to float32's, 0.954 so, with the learned part in float32 too); several are laid out like the batch.
    # With the anchor term each identity's batch holds one more sample, its anchor of the step (`_interleave`).
    per_identity = bs + 1 if config.anchor_weight > 0 else bs
    fixed = fixed_main = None  # the starts laid out for the prior's samples and for the main batch
    if start is not None and not shared:
        stacked = Adapter.stack(start, table).to(device)
        fixed = stacked.repeat_for(bs, guidance=False)
        fixed_main = stacked.repeat_for(per_identity, guidance=False)
    # the UNet and the VAE (whose decoder the identity term runs backward through) are frozen for the run: no weight
    # gradients are computed or left behind in them
    frozen = [p for module in (pipe.unet, pipe.vae) for p in module.parameters()]
    wanted_grad = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    fused = None  # one identity's start adapter while it is fused into the UNet
    try:
        installed = ()  # a half-precision UNet's start goes through the processors instead (see above)
        if start is not None and shared and pipe.unet.dtype == torch.float32:
            start[0].fuse(pipe.unet)
            fused = start[0]
        elif start is not None and shared:
            installed = (start[0].hyper_lora(device=device, dtype=pipe.unet.dtype),)
        with hyper_lora_processors(pipe.unet, table, *installed):
            anchors = None
            if config.anchor_weight > 0:  # the start's predictions, made once: fused (one identity) or per call
                starts = [[ad.hyper_lora(device=device)] for ad in start] if start is not None and not shared else [[]] * n
                anchors = make_anchors(pipe, noise_scheduler, latents, config, starts, gen)
            for step in tqdm(range(config.steps), desc="fine-tune", disable=not progress, leave=False):
                pick = [[(step * bs + j) % lat.shape[0] for j in range(bs)] for lat in latents]
                x = torch.cat([lat[i] for lat, i in zip(latents, pick)])  # (n * bs, C, h, w), identity-major
                txt = torch.cat([t[i] for t, i in zip(texts, pick)])  # (n * bs, T, d)
                learned = HyperLoRA(_deltas(table, factors, config, alpha / rank, shared))
                active = laid_out(learned, bs, fixed)
                noise, t = draw_noise(noise_scheduler, x, gen)
                if anchors is None:
                    pred, target = noise_prediction(pipe, noise_scheduler, x, txt, active, noise, t)
                else:  # one UNet call for the reference samples and the anchors
                    a_latents, a_noise, a_t, a_text, kept = anchors.at(step)
                    both, targets = noise_prediction(pipe, noise_scheduler, _interleave(x, a_latents), _interleave(txt, a_text),
                                                     laid_out(learned, per_identity, fixed_main), _interleave(noise, a_noise), _interleave(t, a_t))
                    (pred, moved), target = _split(both, n), _split(targets, n)[0]
                loss = per_sample_mse(pred, target).mean()
                if encoder is not None:
                    wanted = torch.cat([e[i] for e, i in zip(embedded, pick)])  # (n * bs, e): each sample's reference
                    loss = loss + config.identity_weight * identity_loss(pipe, noise_scheduler, encoder, x, noise, t, pred, wanted)
                if anchors is not None:
                    loss = loss + config.anchor_weight * per_sample_mse(moved, kept).mean()
                if config.prior_weight > 0:
                    j = torch.randint(0, prior.latents.shape[0], (n * bs,), generator=gen)
                    loss = loss + config.prior_weight * diffusion_loss(pipe, noise_scheduler, prior.latents[j], prior.text[j], active, gen)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # a step whose scaled gradients overflowed is skipped, the scale lowered
                scaler.update()
                if callback is not None:
                    callback(step, loss.item())
                if step + 1 in snapshot_steps:
                    snapshot(step + 1, adapters(step + 1))
    finally:
        if fused is not None:
            fused.unfuse(pipe.unet)
        for p, g in zip(frozen, wanted_grad):
            p.requires_grad_(g)
    return adapters(config.steps)
