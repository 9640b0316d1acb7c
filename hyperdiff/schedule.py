"""Low-noise gain: an adapter applied more strongly in the last, low-noise part of sampling.

Contract:
- `LowNoiseGain(gain, below)`: at UNet timesteps t < `below` the adapter's ΔW is multiplied by `gain`; at t ≥ `below`
  it is applied as it is. `LowNoiseGain()` (gain 1) changes nothing. Sampling decides the layout first (hat,
  background, expression: high noise) and the fine detail of a face last, so extra strength late adds identity at
  a smaller cost in scene words than a constant gain (PhotoMaker's delayed identity merge rests on the same split).
  A hypernet carries its calibrated value (`HyperNetConfig.low_noise`) and stamps it on every adapter it predicts
  (`AdapterInfo.low_noise`); a fine-tune recipe stamps its own (`FinetuneConfig.low_noise`) on the adapters it
  trains. The native adapter file keeps it (`hyperdiff.low_noise`); diffusers and kohya LoRA files cannot say it, so
  an export applies ΔW at one strength (a warning says so).
- `per_timestep(unet, update)`: a context manager that calls `update(timestep, kwargs)` before every UNet forward
  and passes on the keyword arguments it returns (a forward pre-hook, removed on exit however the block ends). The
  pipeline uses it to re-fuse a fused adapter, or to swap the per-sample deltas in `cross_attention_kwargs`, when
  the strength changes.
- `diffusers_callback(low_noise, adapter_name)`: the same schedule for an exported LoRA file in vanilla diffusers (a
  `callback_on_step_end` that sets the LoRA's weight per step).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from hyperdiff.config import to_dict
from hyperdiff.errors import HyperdiffError

NUM_TIMESTEPS = 1000  # Stable Diffusion's training timesteps: t in [0, 1000)


@dataclass(frozen=True)
class LowNoiseGain:
    gain: float = 1.0  # ΔW × gain at timesteps below `below`
    below: int = 0  # in [0, 1000]; 0 = never

    def __post_init__(self) -> None:
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)) or not math.isfinite(self.gain) \
                or self.gain <= 0:
            raise HyperdiffError(f"`low_noise.gain` must be a positive number, got {self.gain!r}")
        if isinstance(self.below, bool) or not isinstance(self.below, int) or not 0 <= self.below <= NUM_TIMESTEPS:
            raise HyperdiffError(
                f"`low_noise.below` must be an integer timestep in [0, {NUM_TIMESTEPS}], got {self.below!r}")

    @property
    def active(self) -> bool:
        return self.gain != 1 and self.below > 0

    def factor(self, timestep: float) -> float:
        """The multiplier of ΔW at `timestep`."""
        return float(self.gain) if timestep < self.below else 1.0

    def to_dict(self) -> dict:
        return to_dict(self)


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


def diffusers_callback(low_noise: LowNoiseGain, adapter_name: str, weight: float = 1.0):
    """A `callback_on_step_end` for a vanilla diffusers pipeline that loaded an exported LoRA file as `adapter_name`
    (`pipe.load_lora_weights(file, adapter_name=...)`): it sets the LoRA's weight for each next step to
    `weight × low_noise.factor(t)`, which samples as hyperdiff does. The LoRA starts at `weight`, so `below` must not
    exceed the first timestep (calibrated values are far below it)."""

    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        timesteps = pipe.scheduler.timesteps
        if step + 1 < len(timesteps):
            pipe.set_adapters([adapter_name], [weight * low_noise.factor(float(timesteps[step + 1]))])
        return callback_kwargs

    return callback
