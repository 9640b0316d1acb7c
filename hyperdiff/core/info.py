"""AdapterInfo: what an adapter says of itself besides its factors, carried into every file format.

Contract: provenance (`base_model`, `token`, `source`), modelspec fields (`architecture`, `resolution`,
`prediction_type`) and how hyperdiff samples the adapter: `low_noise` (a hypernet's calibrated low-noise gain or a
fine-tune recipe's, `hyperdiff.core.schedule`; the native format only: LoRA files cannot say it) and `rank_schedules`
((k₁, s₁), (k₂, s₂), …: the first k₁ rank components sample with s₁, the next k₂ with s₂, the rest with `low_noise`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError


@dataclass(frozen=True)
class AdapterInfo:
    """Metadata carried into every file format (`low_noise` into the native one only: LoRA files cannot say it)."""

    base_model: str = ""  # hub id, folder or file of the base, or "synthfaces"
    token: str = ""  # identifier token in prompts, e.g. "sks"
    source: str = ""  # what made it, e.g. "hypernet:<id> finetune_steps=40"
    architecture: str = "hyperdiff-custom"  # modelspec family: stable-diffusion-v1 | stable-diffusion-v2 | ...
    resolution: str = ""  # e.g. "512x512"
    prediction_type: str = "epsilon"
    low_noise: LowNoiseGain = LowNoiseGain()  # how hyperdiff applies it in sampling (`hyperdiff.core.schedule`)
    rank_schedules: tuple[tuple[int, LowNoiseGain], ...] = ()  # leading rank components with schedules of their own

    def __post_init__(self) -> None:
        for item in self.rank_schedules:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int) and item[0] > 0
                    and isinstance(item[1], LowNoiseGain)):
                raise HyperdiffError(f"`rank_schedules` must hold (positive rank count, LowNoiseGain) pairs, got {item!r}")

    @property
    def scheduled(self) -> bool:
        """Whether sampling applies ΔW at other than one strength somewhere."""
        return self.low_noise.active or any(s.active for _, s in self.rank_schedules)

    def describe_schedule(self) -> str:
        """In words: "×1.5 below timestep 300" or, per rank part, "rank 1: …; the rest: …"."""
        if all(s == self.low_noise for _, s in self.rank_schedules):
            return self.low_noise.describe()
        parts = [f"rank {k}: {s.describe()}" for k, s in self.rank_schedules]
        return "; ".join(parts + [f"the rest: {self.low_noise.describe()}"])

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["AdapterInfo"]
