"""HyperDreamBoothPipeline: one photo in, a personalized adapter out in seconds, then images.

Contract:
- `from_pretrained(base=None, hypernet=None, device=None, dtype=None)`: with no arguments, the embedded SynthFaces
  base and its hypernet when one is shipped; otherwise any base `load_base` accepts and a hypernet folder made by
  `save_pretrained` for that base (the layer fingerprints must match), or none. Device: cuda, then mps, then cpu;
  dtype: fp16 on cuda/mps, fp32 on cpu; both overridable by object or name ("cuda:1", "bfloat16"), and a device
  this machine lacks is a one-line error. The hypernet stays float32 (it is small); adapters live on the CPU.
  With a hypernet, a base whose layer table its weights' header gives (`hyperdiff.models.sources.unet_header`: the embedded
  base, diffusers folders, cached hub ids) is a `DeferredBase`, loaded on the first use of `.pipe` (a fine-tune, a
  generation; its table is then checked against the header's): zero-shot `personalize` reads only the hypernet.
  `defer_base=False` loads it at once (a server that will generate).
- `personalize(images, token, finetune_steps, seed)` → Adapter: the hypernet's zero-shot LiDB prediction, then, with
  `finetune_steps > 0`, the rank-relaxed fast fine-tune (a rank-r' LoRA trained on top, returned as the exact
  concatenation; on the embedded base with the identity encoder's term, `SYNTHFACES_FAST_FINETUNE`). Without a hypernet
  (none given, none shipped for the base), `finetune_steps > 0` fine-tunes LiDB factors from scratch (DreamBooth-LiDB)
  and 0 is a one-line error saying so. A zero-shot adapter carries the hypernet's low-noise gain
  (`hyperdiff.core.schedule`); a fine-tuned one samples its learned rank components with its recipe's
  (`FinetuneConfig.low_noise`) and the start's with the hypernet's (`AdapterInfo.rank_schedules`). `caption` (what the
  references show, the subject named by the token; one for all or one per image) replaces the fine-tune's instance
  prompt "a {token} face". With no caption, a pipeline that has a `captioner` (the embedded base's:
  `synthfaces.detectors.reference_caption`, which reads background, hat and expression from each reference) captions
  every reference itself, so the fine-tune learns the face and not the photo's scene; without one the instance prompt
  stays. The adapter's `info.source` records the captions and whether they were read or given.
- `generate(prompt, adapter, ...)` → list of PIL images. One adapter is fused for the call (zero overhead) and unfused
  after, also on an error; a list of adapters (one per image) runs as one batch through the per-sample processors.
  Image i uses the generator seeded `seed + i`, so any image can be reproduced alone; the noise is drawn in float32
  on the CPU, so a seed gives the same image (within rounding) on every device and in every precision. An adapter
  with a schedule (`info.low_noise`, `info.rank_schedules`: `hyperdiff.core.schedule`) samples at each timestep as
  `Adapter.factors_at` says: the fused weights are re-fused when its factors change, the per-sample deltas swapped;
  `low_noise=LowNoiseGain()` samples every adapter at one strength, as an exported LoRA file does.
- `sample_adapters(image, n, prompt)` → (images of n sampled adapters, per-pixel spread map of the image's size).
- `mix(adapters, weights)` → `Adapter.mix`.
- `encoder_view(images)` → the reference images as the hypernet's image encoder sees them (its own preprocessing).
The pipeline holds no state between calls besides the loaded models and a cache of the (deterministic) prior-
preservation images: adapters are passed explicitly.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from hyperdiff.core.adapter import Adapter
from hyperdiff.core.layers import LayerTable
from hyperdiff.core.processors import HyperLoRA, hyper_lora_processors
from hyperdiff.core.schedule import LowNoiseGain, per_timestep
from hyperdiff.errors import HyperdiffError, check_int_in
from hyperdiff.hypernet import HyperNetwork
from hyperdiff.inputs import ASSETS_DIR, MAX_IMAGES, MAX_STEPS, check_captions, check_generate, check_personalize, load_images  # noqa: F401 (re-exported)
from hyperdiff.personalize.finetune import FinetuneConfig, finetune, initial_latents, make_prior

EMBEDDED_HYPERNET = ASSETS_DIR / "synthfaces" / "hypernet"
# fine-tune defaults: the rank-relaxed fast fine-tune on top of a hypernet prediction, and without a hypernet
# DreamBooth-LiDB from scratch (the fidelity benchmark's row). Both: lr 1e-2, no prior preservation, 4 samples per
# step. On 16 SynthFaces validation identities (40 captioned steps) 4 samples per step reached ID similarity 0.382
# against 0.221 with one, scene words 58 % against 55 %, for 2.1x the time; lr 2e-2 with one sample fell to 0.144. A
# prior at lr 1e-3 left the zero-shot identity where it was (0.013 -> 0.008); pass a FinetuneConfig with
# prior_weight > 0 to keep more editability (docs/hypernet.md, "The shipped hypernet").
FAST_FINETUNE = FinetuneConfig(kind="lora", rank=4, learning_rate=1e-2, batch_size=4, prior_weight=0.0)
# On the embedded SynthFaces base the fast fine-tune also trains against the shipped identity encoder
# (`identity_weight`): the denoising error alone had come to lower the identity-trained hypernet's identity (8
# validation identities, captioned: zero-shot 0.611 -> 0.457 / 0.516 at lr 1e-3 / 3e-3), this recipe raises it to
# 0.746 (docs/finetune.md, "The fast fine-tune"). The encoder knows SynthFaces faces only, so other bases keep FAST_FINETUNE.
# Its adapters sample their learned rank components with ΔW × 1.5 below timestep 200 and off from timestep 800 (the
# start's keep the hypernet's × 1.5 below 300: `FinetuneConfig.start_keeps_schedule`), chosen by the hypernet
# calibration's rule (the most identity keeping scene words within 2 points of the lower of the base model's and the
# fine-tune's own at one strength; `scripts/calibrate_finetune.py`) on 16 validation identities, H's fine-tunes with
# and without the reference's caption: captioned 0.716 / 88.2 % at one strength -> 0.760 / 86.8 %, uncaptioned
# 0.648 / 83.7 % -> 0.711 / 85.4 %. Left on at high noise the learned part draws the reference's scene: × 1.25 below
# 200 there kept 78.1 % uncaptioned (docs/finetune.md, "The fast fine-tune").
# The anchor term (`anchor_weight` 5: the start's predictions kept under 8 other prompts naming the token) keeps the
# reference's expression out of the token: on the same identities captioned 0.747 / 90.3 % (expression 78 % against
# 71 %), uncaptioned 0.698 / 89.9 %, for about 0.1-0.3 s more per identity; weights 3 / 10 / 30 read 0.753 / 0.738 /
# 0.733 captioned with 89.6 / 90.3 / 89.6 %. Under it the rule picks × 2 below 200 by 0.003 (uncaptioned 88.5 %), so
# the schedule stays.
# Re-tuning on the truth-scored measure (2026-12-08; `scripts/calibrate_finetune.py --recipe ...`, 8 validation
# identities, references in random scenes, the read caption; ID to the truth / judge / scene words as the recipe
# samples): this recipe read 0.747 / 0.701 / 88.9 %, lr 6e-3 with identity weight 2 0.767 / 0.732 / 88.2 %. Held out
# (16 identities, two seeds) that candidate added 0.020 of truth similarity but fell to 89.9 % of scene words (87.3 %
# without a caption), below the 90 % this recipe keeps (91.0 %), and its bfloat16 fine-tune strays from float32's
# (tests/test_device.py): not shipped (docs/finetune.md).
SYNTHFACES_FAST_FINETUNE = replace(FAST_FINETUNE, learning_rate=3e-3, batch_size=2, identity_weight=1.0,
                                   low_noise=LowNoiseGain(1.5, 200, 800), anchor_weight=5.0)
DREAMBOOTH_LIDB = FinetuneConfig(kind="lidb", learning_rate=1e-2, batch_size=4, prior_weight=0.0)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` → `default_device()`; otherwise a cpu, cuda[:N] or mps device that this machine has."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HyperdiffError(f"`device` must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise HyperdiffError(f"`device` {str(dev)!r} is not available: this machine has {count} CUDA device(s); use cpu")
    elif dev.type == "mps":
        if not _mps_available():
            raise HyperdiffError(f"`device` {str(dev)!r} is not available on this machine; use cpu")
    elif dev.type != "cpu":
        raise HyperdiffError(f"`device` must be cpu, cuda, cuda:N or mps, got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` → float16 on cuda/mps, float32 on cpu; otherwise one of `DTYPES` (by name or object)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise HyperdiffError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}")


def caption_record(adapter: Adapter) -> str:
    """What a fine-tuned adapter's record says it was told, as `personalize` wrote it ("caption (read from the
    references)='a sks face, ...'"), or "" when no caption was used."""
    source = adapter.info.source
    return source[source.index("; caption") + 2:] if "; caption" in source else ""


@dataclass(frozen=True)
class DeferredBase:
    """A base not loaded yet: what zero-shot prediction needs of it (its layer table, read from its weights' header:
    `LayerTable.from_header`), and `load`, called when a fine-tune or a generation first needs the rest."""

    load: Callable[[], object]
    table: LayerTable
    device: torch.device
    dtype: torch.dtype


class HyperDreamBoothPipeline:
    def __init__(self, pipe, hypernet: HyperNetwork | None, base_name: str = "", hypernet_name: str = "",
                 fast_finetune: FinetuneConfig = FAST_FINETUNE, captioner: Callable[[Image.Image], str] | None = None):
        """`pipe`: a diffusers pipeline, or a `DeferredBase` loaded on first use of `.pipe`; `hypernet=None` makes a
        generation-only pipeline (adapters from files); `fast_finetune` is the recipe of `personalize(finetune_steps
        > 0)` on top of the hypernet's prediction, and `captioner` (a reference image -> a caption template naming
        the subject `{token}`) what the fine-tune is told when no caption is given (`from_pretrained` picks both per
        base)."""
        self.hypernet, self.fast_finetune, self.captioner = hypernet, fast_finetune, captioner
        self._base, self._loading = pipe, threading.Lock()
        self.table = pipe.table if isinstance(pipe, DeferredBase) else self._ready(pipe)
        if hypernet is not None:
            self.table.check_fingerprint(hypernet.fingerprint, "the hypernet")
        self.base_name, self.hypernet_name = base_name, hypernet_name
        self._priors: dict = {}  # cache of deterministic prior-preservation images, see `_prior`

    @staticmethod
    def _ready(pipe) -> LayerTable:
        pipe.set_progress_bar_config(disable=True)
        return LayerTable.from_unet(pipe.unet)

    @property
    def pipe(self):
        """The diffusers pipeline, loaded now when `from_pretrained` deferred it (zero-shot needs only the hypernet)."""
        with self._loading:
            if isinstance(self._base, DeferredBase):
                pipe = self._base.load()
                table = self._ready(pipe)
                table.check_fingerprint(self._base.table.fingerprint, f"the header of base {self.base_name!r}")
                self._base, self.table = pipe, table  # the module-ordered table from here on
            return self._base

    @property
    def loaded(self) -> bool:
        """Whether the base pipeline is in memory (False until a deferred one is first used)."""
        return not isinstance(self._base, DeferredBase)

    @classmethod
    def from_pretrained(
        cls, base: str | None = None, hypernet: str | Path | None = None, device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, load_hypernet: bool = True, defer_base: bool = True,
    ) -> "HyperDreamBoothPipeline":
        """With a hypernet and `defer_base`, a base whose layer table its weights' header gives (the embedded base,
        diffusers folders, cached hub ids) loads on first use: zero-shot `personalize` never loads it."""
        from hyperdiff.models.sources import unet_header

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if hypernet is None and (base is not None or not EMBEDDED_HYPERNET.is_dir()):
            load_hypernet = False  # the embedded hypernet belongs to the embedded base, and only when shipped
        common = {"base_name": base or "synthfaces (embedded)",
                  "fast_finetune": SYNTHFACES_FAST_FINETUNE if base is None else FAST_FINETUNE}
        if base is None:  # the embedded world's detectors read what a reference shows: its caption when none is typed
            from hyperdiff.synthfaces.detectors import reference_caption

            common["captioner"] = reference_caption
        header = unet_header(base) if load_hypernet and defer_base else None  # also checks `base` in one line
        table = LayerTable.from_header(header) if header else None

        def load():
            from hyperdiff.models import load_base

            return load_base(base, dtype=dtype, device=device)

        pipe = DeferredBase(load, table, device, dtype) if table is not None else load()
        if not load_hypernet:
            return cls(pipe, None, **common)
        path = Path(hypernet) if hypernet is not None else EMBEDDED_HYPERNET
        hp = HyperNetwork.from_pretrained(path, table or LayerTable.from_unet(pipe.unet)).to(device)
        return cls(pipe, hp, hypernet_name=str(hypernet or "synthfaces (embedded)"), **common)

    @property
    def device(self) -> torch.device:
        return self._base.device if isinstance(self._base, DeferredBase) else self._base.unet.device

    def describe(self) -> dict:
        """What is loaded: names, fingerprint, device and dtype."""
        return {"base": self.base_name, "hypernet": self.hypernet_name or "-", "fingerprint": self.table.fingerprint,
                "layers": len(self.table), "device": str(self.device), "dtype": str(self._dtype).replace("torch.", "")}

    @property
    def _dtype(self) -> torch.dtype:
        return self._base.dtype if isinstance(self._base, DeferredBase) else self._base.unet.dtype

    # -- personalization -----------------------------------------------------------------------------------------
    def _require_hypernet(self) -> HyperNetwork:
        if self.hypernet is None:
            raise HyperdiffError("this pipeline was loaded without a hypernet: pass one (--hypernet PATH) for zero-shot "
                                 "personalization, or finetune_steps > 0 to fine-tune from scratch (DreamBooth-LiDB)")
        return self.hypernet

    def personalize(
        self, images, token: str = "sks", finetune_steps: int = 0, seed: int = 0,
        finetune_config: FinetuneConfig | None = None, callback: Callable[[int, float], None] | None = None,
        caption: str | Sequence[str] | None = None,
    ) -> Adapter:
        """An adapter for the identity in `images`: the hypernet's prediction, then `finetune_steps` of fine-tuning.

        `caption` describes the references for the fine-tune, the subject named by `{token}` or the token itself
        (e.g. "a {token} face, neutral, on a gray background"): one string for every image, or one per image. It
        replaces the instance prompt "a {token} face", so what the words name (background, hat, expression) is not
        learned into the token. None: the pipeline's `captioner` reads each reference's caption (the embedded base),
        else the instance prompt. Pass "a {token} face" to fine-tune without a caption.
        """
        check_personalize(finetune_steps, token, seed)
        refs = load_images(images)
        captions = check_captions(caption, len(refs), token)
        if self.hypernet is None and not finetune_steps:
            self._require_hypernet()  # nothing to predict with and nothing to train: say what to pass
        start = [self.hypernet.predict(refs, token=token)] if self.hypernet is not None else None
        how = f"hypernet {self.hypernet_name}"
        adapter = start[0] if start else None
        read, told = "", None
        if finetune_steps:
            cfg = replace(finetune_config or (self.fast_finetune if start else DREAMBOOTH_LIDB),
                          steps=finetune_steps, token=token, seed=seed)
            if captions is None and self.captioner is not None:  # what each reference shows, read from it
                captions = [self.captioner(im) for im in refs]
                read = " (read from the references)"
            if not start:
                how = "DreamBooth-LiDB" if cfg.kind == "lidb" else "DreamBooth-LoRA"
            prior = self._prior(cfg) if cfg.prior_weight > 0 else None
            told = [c.format(token=token) for c in captions] if captions is not None else None  # one per image
            adapter = finetune(self.pipe, [refs], cfg, start=start, prompts=[told] if told else None, prior=prior,
                               progress=False, callback=callback)[0]
        source = f"{how}; finetune_steps={finetune_steps}"
        if finetune_steps:
            source += f"; {adapter.info.source}"  # the engine's recipe: kind, batch size, learning rate, identity weight
        if finetune_steps and told:
            source += f"; caption{read}=" + (repr(told[0]) if len(set(told)) == 1 else repr(told))
        adapter.info = replace(adapter.info, base_model=self.base_name, token=token, source=source)
        return adapter

    def encoder_view(self, images) -> list[Image.Image]:
        """What the hypernet's image encoder sees of each reference: its resize/crop, normalisation undone."""
        hypernet = self._require_hypernet()
        return hypernet.encoder.view(load_images(images))

    def _prior(self, cfg: FinetuneConfig):
        """The base model's prior-preservation images depend only on the prior settings: made once per pipeline."""
        key = (cfg.prior_prompts, cfg.prior_images, cfg.prior_steps, cfg.prior_guidance, cfg.seed)
        if key not in self._priors:
            self._priors[key] = make_prior(self.pipe, cfg)
        return self._priors[key]

    def mix(self, adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
        return Adapter.mix(adapters, weights)

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(
        self, prompt: str, adapter: Adapter | Sequence[Adapter] | None = None, negative_prompt: str | None = None,
        num_images: int = 1, steps: int = 25, guidance: float = 4.0, seed: int = 0, strength: float = 1.0,
        low_noise: LowNoiseGain | None = None, on_step: Callable[[int], None] | None = None,
    ) -> list[Image.Image]:
        """`low_noise` replaces every adapter's own `info.low_noise` for this call (None: each adapter's own);
        `on_step(i)` is called after each denoising step i (a progress bar's tick)."""
        check_generate(prompt, num_images, steps, guidance, strength, seed, negative_prompt)
        if isinstance(adapter, Sequence) and not isinstance(adapter, Adapter):
            adapters = list(adapter)
            if len(adapters) != num_images:
                num_images = len(adapters)
        else:
            adapters = None
        gens = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        kwargs = dict(prompt=[prompt] * num_images, negative_prompt=[negative_prompt] * num_images if negative_prompt else None,
                      num_inference_steps=steps, guidance_scale=guidance, latents=initial_latents(self.pipe, gens, num_images),
                      output_type="pil")
        if on_step is not None:  # diffusers' step-end callback hands its tensors back unchanged
            kwargs["callback_on_step_end"] = lambda pipe, i, t, tensors: (on_step(i), tensors)[1]
        if adapters is not None:  # one adapter per image: per-sample deltas, laid out like the CFG batch
            for ad in adapters:
                ad.check_table(self.table)
            with hyper_lora_processors(self.pipe.unet, self.table), \
                    self._per_sample(adapters, low_noise, strength, guidance > 1) as deltas:
                return self.pipe(**kwargs, cross_attention_kwargs={"hyper_lora": deltas}).images
        if adapter is None:
            return self.pipe(**kwargs).images
        with self._fused(adapter, low_noise, strength):
            return self.pipe(**kwargs).images

    @staticmethod
    def _scheduled(adapter: Adapter, low_noise: LowNoiseGain | None) -> bool:
        return adapter.info.scheduled if low_noise is None else low_noise.active

    @contextmanager
    def _fused(self, adapter: Adapter, low_noise: LowNoiseGain | None, strength: float) -> Iterator[None]:
        """The adapter fused into the UNet for the block (unfused after, also on an error), re-fused as it samples
        at each UNet call's timestep (`Adapter.factors_at`: its schedule's factors) whenever they change."""
        unet = self.pipe.unet
        fused = {"key": (1.0,), "adapter": adapter}  # what is fused now, and its factors

        def refuse(t: float, unet_kwargs: dict) -> dict:
            key = adapter.factors_at(t, low_noise)
            if key != fused["key"]:
                fused["adapter"].unfuse(unet)
                fused.update(key=key, adapter=adapter.scaled(key))
                fused["adapter"].fuse(unet, strength=strength)
            return unet_kwargs

        adapter.fuse(unet, strength=strength)
        try:  # no hook on the hot path without a schedule
            with per_timestep(unet, refuse) if self._scheduled(adapter, low_noise) else nullcontext():
                yield
        finally:
            fused["adapter"].unfuse(unet)

    @contextmanager
    def _per_sample(self, adapters: list[Adapter], low_noise: LowNoiseGain | None, strength: float,
                    guidance: bool) -> Iterator[HyperLoRA]:
        """Yields the first step's per-sample deltas (image i = adapters[i], laid out like the CFG batch) and swaps
        each UNet call's for those of its timestep (`Adapter.factors_at`; built once per set of factors)."""
        stacked: dict[tuple, HyperLoRA] = {}

        def deltas(t: float | None) -> HyperLoRA:
            key = tuple((1.0,) if t is None else ad.factors_at(t, low_noise) for ad in adapters)
            if key not in stacked:
                scaled = [ad.scaled(f) for ad, f in zip(adapters, key)]
                stacked[key] = Adapter.stack(scaled, self.table, strength).repeat_for(1, guidance).to(self.device)
            return stacked[key]

        def update(t: float, unet_kwargs: dict) -> dict:
            attention = {**(unet_kwargs.get("cross_attention_kwargs") or {}), "hyper_lora": deltas(t)}
            return {**unet_kwargs, "cross_attention_kwargs": attention}

        # without a schedule, one set of deltas serves the whole call: no hook on the UNet's hot path
        scheduled = any(self._scheduled(ad, low_noise) for ad in adapters)
        with per_timestep(self.pipe.unet, update) if scheduled else nullcontext():
            yield deltas(None)

    def sample_adapters(
        self, image, n: int = 4, prompt: str = "a sks face", seed: int = 0, steps: int = 25, guidance: float = 4.0,
    ) -> tuple[list[Image.Image], Image.Image]:
        """Images of n adapters sampled for one reference, and their per-pixel spread (std over the n images,
        mean over colour channels, scaled to 0..255) as a grayscale image of the same size."""
        check_int_in("n", n, 2, MAX_IMAGES)
        adapters = self._require_hypernet().sample(load_images(image), n, seed=seed)
        images = []
        for ad in adapters:  # the same noise for every adapter, so the spread is the adapters' alone
            images += self.generate(prompt, ad, num_images=1, steps=steps, guidance=guidance, seed=seed)
        stack = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (n, H, W, 3)
        spread = stack.std(axis=0).mean(axis=-1)  # (H, W)
        scaled = (spread / max(float(spread.max()), 1e-6) * 255).round().astype(np.uint8)
        return images, Image.fromarray(scaled, mode="L")

