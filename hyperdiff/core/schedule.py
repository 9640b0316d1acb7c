"""Low-noise gain: an adapter applied more strongly in the last, low-noise part of sampling.

Contract:
- `LowNoiseGain(gain, below, off_from)`: at UNet timesteps t < `below` the adapter's ΔW is multiplied by `gain`; at
  `below` ≤ t < `off_from` it is applied as it is; at t ≥ `off_from` (1000, the default: never) it is off. `LowNoiseGain()`
  changes nothing. Sampling decides the layout first (hat,
  background, expression: high noise) and the fine detail of a face last, so extra strength late adds identity at
  a smaller cost in scene words than a constant gain (PhotoMaker's delayed identity merge rests on the same split).
  For the same reason an adapter that learned its reference's scene along with its identity (a fine-tune on one
  image) can be kept out of the high-noise steps that lay the scene out (`off_from`).
  A hypernet carries its calibrated value (`HyperNetConfig.low_noise`) and stamps it on every adapter it predicts
  (`AdapterInfo.low_noise`); a fine-tune recipe stamps its own (`FinetuneConfig.low_noise`) on the adapters it
  trains. The native adapter file keeps it (`hyperdiff.low_noise`); an export keeps it in its metadata too
  (`hyperdiff.core.formats.file_schedule`), but diffusers', A1111's and ComfyUI's loaders apply ΔW at one strength (a
  warning says so) unless diffusers is given the schedule (`diffusers_schedule`).
- `per_timestep(unet, update)`: a context manager that calls `update(timestep, kwargs)` before every UNet forward
  and passes on the keyword arguments it returns (a forward pre-hook, removed on exit however the block ends). The
  pipeline uses it to re-fuse a fused adapter, or to swap the per-sample deltas in `cross_attention_kwargs`, when
  the strength changes.
- `diffusers_schedule(pipe, {adapter_name: schedule}, num_inference_steps)`: the same schedules for exported LoRA files
  in vanilla diffusers: it sets each LoRA's weight for the first step and returns a `callback_on_step_end` that sets
  them for each next one. An adapter whose rank parts have their own schedules exports one file per part
  (`Adapter.split_by_schedule`), each loaded under its own name.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from hyperdiff.config import to_dict
from hyperdiff.errors import HyperdiffError, check_number_in
from hyperdiff.inputs import MAX_STRENGTH

NUM_TIMESTEPS = 1000  # Stable Diffusion's training timesteps: t in [0, 1000)


@dataclass(frozen=True)
class LowNoiseGain:
    gain: float = 1.0  # ΔW × gain at timesteps below `below`
    below: int = 0  # in [0, 1000]; 0 = never
    off_from: int = NUM_TIMESTEPS  # ΔW off at timesteps ≥ off_from; in [below, 1000]; 1000 = never

    def __post_init__(self) -> None:
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)) or not math.isfinite(self.gain) \
                or self.gain <= 0:
            raise HyperdiffError(f"`low_noise.gain` must be a positive number, got {self.gain!r}")
        if isinstance(self.below, bool) or not isinstance(self.below, int) or not 0 <= self.below <= NUM_TIMESTEPS:
            raise HyperdiffError(
                f"`low_noise.below` must be an integer timestep in [0, {NUM_TIMESTEPS}], got {self.below!r}")
        if isinstance(self.off_from, bool) or not isinstance(self.off_from, int) \
                or not max(self.below, 1) <= self.off_from <= NUM_TIMESTEPS:
            raise HyperdiffError(f"`low_noise.off_from` must be an integer timestep in [max(`below`, 1), {NUM_TIMESTEPS}], "
                                 f"got {self.off_from!r} (`below` is {self.below})")

    @property
    def active(self) -> bool:
        return (self.gain != 1 and self.below > 0) or self.off_from < NUM_TIMESTEPS

    def factor(self, timestep: float) -> float:
        """The multiplier of ΔW at `timestep`."""
        if timestep >= self.off_from:
            return 0.0
        return float(self.gain) if timestep < self.below else 1.0

    def describe(self) -> str:
        """In words, for messages: "×1.25 below timestep 200, off from 800", "one strength"."""
        parts = [f"×{self.gain:g} below timestep {self.below}"] if self.gain != 1 and self.below > 0 else []
        parts += [f"off from timestep {self.off_from}"] if self.off_from < NUM_TIMESTEPS else []
        return ", ".join(parts) or "one strength"

    def to_dict(self) -> dict:
        """`off_from` only when set, so the metadata and file names of schedules without it read as before."""
        d = to_dict(self)
        if self.off_from == NUM_TIMESTEPS:
            del d["off_from"]
        return d


def _timestep(args: tuple, kwargs: dict) -> float:
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    return float(t.flatten()[0]) if torch.is_tensor(t) else float(t)  # one timestep for the whole batch in SD sampling


@contextmanager
def per_timestep(unet: nn.Module, update: Callable[[float, dict], dict]) -> Iterator[None]:
    def hook(module, args, kwargs):
        return args, update(_timestep(args, kwargs), kwargs)

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def diffusers_schedule(pipe, schedules: Mapping[str, LowNoiseGain], num_inference_steps: int,
                       weights: Mapping[str, float] | None = None):
    """Sample exported LoRA files in a vanilla diffusers pipeline as hyperdiff samples their adapters. `pipe` has loaded
    each file under its adapter name (`pipe.load_lora_weights(file, adapter_name=name)`); `schedules` maps those names
    to their schedules (an export's own: `hyperdiff.core.formats.file_schedule(file)`; one file per part of an adapter whose
    parts have their own: `Adapter.split_by_schedule`), `weights` to their strengths (default 1). Call this right before
    `pipe(..., num_inference_steps=num_inference_steps, callback_on_step_end=<the result>)`: it sets every LoRA's
    weight for the first step (`weight × schedule.factor(first timestep)`) and returns the `callback_on_step_end` that
    sets them for each next step."""
    if not isinstance(schedules, Mapping) or not schedules:
        raise HyperdiffError(f"`schedules` must map adapter names to LowNoiseGain schedules, got {schedules!r}")
    for name, schedule in schedules.items():
        if not isinstance(schedule, LowNoiseGain):
            raise HyperdiffError(f"`schedules[{name!r}]` must be a LowNoiseGain, got {type(schedule).__name__}")
    weights = dict(weights or {})
    if set(weights) - set(schedules):
        raise HyperdiffError(f"`weights` names adapters without a schedule: {sorted(set(weights) - set(schedules))}")
    names = list(schedules)
    strength = [check_number_in(f"weights[{n!r}]", weights.get(n, 1.0), -MAX_STRENGTH, MAX_STRENGTH) for n in names]
    pipe.scheduler.set_timesteps(num_inference_steps)  # the call sets the same timesteps again
    timesteps = [float(t) for t in pipe.scheduler.timesteps]

    def set_weights(t: float) -> None:
        pipe.set_adapters(names, [w * schedules[n].factor(t) for n, w in zip(names, strength)])

    set_weights(timesteps[0])

    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step + 1 < len(timesteps):
            set_weights(timesteps[step + 1])
        return callback_kwargs

    return callback
