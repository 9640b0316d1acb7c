"""Adapter: one identity's low-rank weight deltas for a UNet, and everything done with them.

Contract (DESIGN.md, "Adapter" and "Files"):
- Two kinds, keyed by stable dotted layer names:
  * `lora`: per layer `(down (r, in), up (out, r))`;
  * `lidb`: per layer `(A_train (a, r), B_train (r, b))` plus a `LiDBConfig` whose `aux_seed` regenerates the
    frozen aux bases (see `hyperdiff.core.lidb`), so a file stores only the trainable factors.
- ΔW of a layer = (alpha / rank) · up · down. `lora_factors()` gives `(down, up)` for both kinds (scale not folded).
- Factors live on the CPU (an identity is kilobytes, and files, mixing and exports need no device); whatever binds
  them to a UNet (`applied`, `fuse`, `hyper_lora(device=...)`) moves them to its device and dtype.
- Every adapter carries the `LayerTable` fingerprint and target set of its base; applying, fusing or loading it
  onto a UNet of another architecture is a `HyperdiffError`.
- Use: `applied(unet)` (processors, restored on exit), `fuse(unet)`/`unfuse(unet)` (bit-exact, see
  `hyperdiff.core.fusion`), `hyper_lora()` (per-call deltas for `cross_attention_kwargs`).
- Algebra on ΔW (not on factors): `w * ad` scales ΔW; `ad1 + ad2` (= `concat`) is the exact rank concatenation
  (rank r1 + r2, scales folded into `up`, alpha = rank); `mix(adapters, weights)` = Σ wᵢ·adᵢ.
- Files (`hyperdiff.core.formats`): `save`/`load` (native), `export(path, format="diffusers"|"kohya")`;
  `save_as(folder, format)` writes any of them under a name that says what it is (`file_name(format)`:
  `hyperdiff-<token>-<digest>-<format>.safetensors`, the digest a hash of the adapter's values).
- `info.low_noise` (a hypernet's calibrated low-noise gain or a fine-tune recipe's, `hyperdiff.core.schedule`) is how
  the pipeline samples with it; derived adapters (`w * ad`, `concat`, `mix`) keep the first one's, like the rest of
  `info`. `info.rank_schedules` (k₁, s₁), (k₂, s₂), … give the first k₁ rank components schedule s₁, the next k₂ s₂,
  and leave the rest to `low_noise`: a rank-relaxed fine-tune's start (the hypernet's prediction) keeps its own
  schedule while the learned components sample with the recipe's. `scaled(factors_at(t))` is the adapter as it
  samples at timestep t; `split_by_schedule()` gives one adapter per part, ΔWs summing to this one's, for LoRA
  files (one weight per step each).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from hyperdiff.core import formats, fusion
from hyperdiff.core.info import AdapterInfo
from hyperdiff.core.layers import LayerTable, TargetConfig
from hyperdiff.core.lidb import LiDBConfig, aux_bases, compose
from hyperdiff.core.processors import HyperLoRA, LowRankDelta, install, restore
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError

KINDS = ("lidb", "lora")
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class Adapter:
    """Low-rank deltas of one identity over named Linears of a UNet."""

    def __init__(
        self,
        *,
        kind: str,
        factors: Factors,
        dims: Mapping[str, tuple[int, int]],
        alpha: float,
        fingerprint: str,
        targets: TargetConfig = TargetConfig(),
        lidb: LiDBConfig | None = None,
        info: AdapterInfo = AdapterInfo(),
    ):
        if kind not in KINDS:
            raise HyperdiffError(f"`kind` must be one of {list(KINDS)}, got {kind!r}")
        if (kind == "lidb") != (lidb is not None):
            raise HyperdiffError("a LiDB adapter needs a `lidb` config and a LoRA adapter must not have one")
        if not factors:
            raise HyperdiffError("`factors` must name at least one layer, got none")
        if set(factors) != set(dims):
            raise HyperdiffError("`factors` and `dims` must name the same layers")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise HyperdiffError(f"`alpha` must be a positive finite number, got {alpha!r}")
        self.kind = kind
        self.factors = {k: (a.detach(), b.detach()) for k, a, b in ((k, *v) for k, v in factors.items())}
        self.dims = {k: (int(i), int(o)) for k, (i, o) in dims.items()}
        self.alpha = float(alpha)
        self.fingerprint = fingerprint
        self.targets = targets
        self.lidb = lidb
        self.info = info
        self.rank = self._check_shapes()
        if sum(k for k, _ in info.rank_schedules) > self.rank:
            raise HyperdiffError(f"`rank_schedules` cover {sum(k for k, _ in info.rank_schedules)} rank components, "
                                 f"the adapter has {self.rank}")

    def _check_shapes(self) -> int:
        labels = ("down", "up") if self.kind == "lora" else ("A_train", "B_train")
        ranks = set()
        for name, (first, second) in self.factors.items():
            n_in, n_out = self.dims[name]
            if self.kind == "lora":
                r = first.shape[0] if first.dim() == 2 and first.shape[0] > 0 else -1
                want = ((r, n_in), (n_out, r))  # down (r, in), up (out, r)
            else:
                r = self.lidb.rank
                want = ((self.lidb.a, r), (r, self.lidb.b))  # A_train (a, r), B_train (r, b)
            for label, t, shape in zip(labels, (first, second), want):
                if tuple(t.shape) != shape or not t.is_floating_point():
                    raise HyperdiffError(
                        f"`{name}.{label}` must be a floating tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}"
                    )
            ranks.add(r)
        if len(ranks) != 1:
            raise HyperdiffError(f"every layer must have the same rank, got ranks {sorted(ranks)}")
        return ranks.pop()

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_factors(
        cls, factors: Factors, table: LayerTable, alpha: float | None = None, info: AdapterInfo | None = None
    ) -> "Adapter":
        """A LoRA adapter from `{layer: (down (r, in), up (out, r))}`; alpha defaults to the rank (scale 1)."""
        cls._check_names(factors, table)
        rank = next(iter(factors.values()))[0].shape[0]
        return cls(
            kind="lora",
            factors=factors,
            dims={k: (table[k].in_features, table[k].out_features) for k in factors},
            alpha=float(rank if alpha is None else alpha),
            fingerprint=table.fingerprint,
            targets=table.targets,
            info=info or AdapterInfo(architecture=table.architecture),
        )

    @classmethod
    def from_lidb(
        cls,
        factors: Factors,
        table: LayerTable,
        config: LiDBConfig,
        alpha: float | None = None,
        info: AdapterInfo | None = None,
    ) -> "Adapter":
        """A LiDB adapter from `{layer: (A_train (a, r), B_train (r, b))}`; alpha defaults to the rank."""
        cls._check_names(factors, table)
        return cls(
            kind="lidb",
            factors=factors,
            dims={k: (table[k].in_features, table[k].out_features) for k in factors},
            alpha=float(config.rank if alpha is None else alpha),
            fingerprint=table.fingerprint,
            targets=table.targets,
            lidb=config,
            info=info or AdapterInfo(architecture=table.architecture),
        )

    @staticmethod
    def _check_names(factors: Factors, table: LayerTable) -> None:
        unknown = [k for k in factors if k not in table]
        if unknown:
            raise HyperdiffError(f"`factors` names {len(unknown)} layers that are not in the LayerTable, e.g. '{unknown[0]}'")

    def _derive(self, factors: Factors, *, kind: str | None = None, alpha: float | None = None, **info) -> "Adapter":
        kind = kind or self.kind
        return Adapter(
            kind=kind,
            factors=factors,
            dims={k: self.dims[k] for k in factors},
            alpha=self.alpha if alpha is None else alpha,
            fingerprint=self.fingerprint,
            targets=self.targets,
            lidb=self.lidb if kind == "lidb" else None,
            info=replace(self.info, **info),
        )

    # -- views --------------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layer_names(self) -> list[str]:
        return list(self.factors)

    @property
    def num_values(self) -> int:
        """Stored values (SD1.5, LiDB a=100 b=50 r=1: 19,200)."""
        return sum(a.numel() + b.numel() for a, b in self.factors.values())

    @cached_property
    def _lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.kind == "lora":
            return dict(self.factors)
        out = {}
        for name, (a_train, b_train) in self.factors.items():
            a_aux, b_aux = aux_bases(name, *self.dims[name], self.lidb)
            out[name] = compose(a_train, b_train, a_aux, b_aux)  # down (r, in), up (out, r)
        return out

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`{layer: (down (r, in), up (out, r))}`; ΔW = scale · up · down."""
        return dict(self._lora)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW (out, in) of one layer, scale included, float32."""
        down, up = self._lora[name]
        return self.scale * (up.float() @ down.float())

    def to_lora(self) -> "Adapter":
        """The same ΔW as a plain LoRA adapter (LiDB composed)."""
        return self if self.kind == "lora" else self._derive(self.lora_factors(), kind="lora")

    def hyper_lora(self, strength: float = 1.0, device=None, dtype=None) -> HyperLoRA:
        """Per-call deltas for `cross_attention_kwargs={"hyper_lora": ...}`."""
        layers = {
            k: LowRankDelta(d.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype), self.scale)
            for k, (d, u) in self._lora.items()
        }
        return HyperLoRA(layers, strength)

    def __repr__(self) -> str:
        return (
            f"Adapter(kind={self.kind!r}, layers={len(self.factors)}, rank={self.rank}, alpha={self.alpha:g}, "
            f"fingerprint={self.fingerprint!r}, values={self.num_values})"
        )

    # -- binding to a UNet --------------------------------------------------------------------------------
    def check_table(self, table: LayerTable) -> None:
        """Raise unless this adapter fits `table` (same architecture fingerprint, known layers, same dims)."""
        table.check_fingerprint(self.fingerprint, "this adapter")
        for name, dims in self.dims.items():
            row = table[name]
            if dims != (row.in_features, row.out_features):
                raise HyperdiffError(f"adapter layer '{name}' has dims {dims}, the UNet has {(row.in_features, row.out_features)}")

    def table_for(self, unet: nn.Module) -> LayerTable:
        table = LayerTable.from_unet(unet, self.targets)
        self.check_table(table)
        return table

    @contextmanager
    def applied(self, unet: nn.Module, strength: float = 1.0) -> Iterator["Adapter"]:
        """Inside the block every forward of `unet` uses this adapter; processors are restored on exit."""
        table = self.table_for(unet)
        param = next(unet.parameters())
        previous = install(unet, table, [self.hyper_lora(strength, param.device, param.dtype)])
        try:
            yield self
        finally:
            restore(unet, previous)

    def with_schedule(self, low_noise: LowNoiseGain) -> "Adapter":
        """The same ΔW sampled with `low_noise` where `info.low_noise` applied (`info.rank_schedules` kept)."""
        return self._derive(self.factors, low_noise=low_noise)

    @property
    def schedule_parts(self) -> tuple[tuple[int, LowNoiseGain], ...]:
        """(rank count, schedule) over every rank component: `info.rank_schedules`, then the rest's `low_noise`."""
        rest = self.rank - sum(k for k, _ in self.info.rank_schedules)
        return self.info.rank_schedules + (((rest, self.info.low_noise),) if rest else ())

    def split_by_schedule(self) -> tuple["Adapter", ...]:
        """One LoRA adapter per part of `schedule_parts`: its rank components, with its schedule as `info.low_noise`;
        their ΔWs sum to this adapter's. A LoRA file applies one weight per step to all of itself, so an adapter whose
        parts have their own schedules exports part by part (`hyperdiff export --split`) and diffusers samples the
        files together (`schedule.diffusers_schedule`). An adapter with one schedule is its own only part."""
        parts = self.schedule_parts
        if len(parts) == 1:
            return (self,)
        out, first = [], 0
        for i, (k, low_noise) in enumerate(parts, 1):
            factors = {n: (d[first:first + k].clone(), u[:, first:first + k].clone())  # (k, in), (out, k)
                       for n, (d, u) in self._lora.items()}
            out.append(self._derive(factors, kind="lora", alpha=self.scale * k, low_noise=low_noise, rank_schedules=(),
                                    source=f"part {i} of {len(parts)} (rank {k}) of: {self.info.source}"))
            first += k
        return tuple(out)

    def factors_at(self, timestep: float, low_noise: LowNoiseGain | None = None) -> tuple[float, ...]:
        """ΔW's factor at `timestep`: one for the whole adapter, or one per rank component where its parts' schedules
        (`info.rank_schedules`) differ there; `low_noise` replaces every schedule. Cheap: the sampling hooks call it
        on every UNet call and build `scaled(factors)` only when it changes."""
        if low_noise is not None or not self.info.rank_schedules:
            return ((low_noise or self.info.low_noise).factor(timestep),)
        factors = tuple(s.factor(timestep) for k, s in self.schedule_parts for _ in range(k))
        return factors[:1] if len(set(factors)) == 1 else factors

    def scaled(self, factors: tuple[float, ...]) -> "Adapter":
        """This adapter with ΔW times `factors` (from `factors_at`); (1,) gives this adapter itself."""
        if len(factors) == 1:
            return self if factors[0] == 1 else factors[0] * self
        column = torch.tensor(factors)  # (r,): one factor per rank component
        return self._derive({k: (d, u * column) for k, (d, u) in self._lora.items()}, kind="lora")  # up · diag

    def fuse(self, unet: nn.Module, strength: float = 1.0) -> None:
        """Add ΔW into the Linear weights (zero inference overhead); `unfuse` restores them bit for bit."""
        self.table_for(unet)
        s = self.scale * strength
        fusion.fuse(unet, self, {k: (d, u * s) for k, (d, u) in self._lora.items()})

    def unfuse(self, unet: nn.Module) -> None:
        fusion.unfuse(unet, self)

    # -- algebra on ΔW ------------------------------------------------------------------------------------
    def __mul__(self, weight: float) -> "Adapter":
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            return NotImplemented
        # ΔW is linear in `up` (LoRA) and in B_train (LiDB): scale that factor, keep the kind.
        return self._derive({k: (a, b * weight) for k, (a, b) in self.factors.items()}, source=f"{weight:g}*({self.info.source})")

    __rmul__ = __mul__

    def __add__(self, other: "Adapter") -> "Adapter":
        if not isinstance(other, Adapter):
            return NotImplemented
        return Adapter.concat([self, other])

    @staticmethod
    def concat(adapters: Sequence["Adapter"]) -> "Adapter":
        """Exact sum of ΔWs as one LoRA of rank Σrᵢ: down = [downᵢ], up = [scaleᵢ·upᵢ], alpha = rank."""
        if not adapters:
            raise HyperdiffError("`adapters` must hold at least one adapter, got none")
        first = adapters[0]
        for ad in adapters[1:]:
            if ad.fingerprint != first.fingerprint:
                raise HyperdiffError(
                    f"cannot combine adapters of different bases (fingerprints {first.fingerprint} and {ad.fingerprint})"
                )
        names = list(dict.fromkeys(n for ad in adapters for n in ad.factors))
        dims = {n: next(ad.dims[n] for ad in adapters if n in ad.dims) for n in names}
        factors = {}
        for name in names:
            downs, ups = [], []
            n_in, n_out = dims[name]
            for ad in adapters:
                if name in ad._lora:
                    d, u = ad._lora[name]
                    downs.append(d.float())
                    ups.append(u.float() * ad.scale)
                else:  # layer absent from this adapter: zero block keeps every layer at the same rank
                    downs.append(torch.zeros(ad.rank, n_in))
                    ups.append(torch.zeros(n_out, ad.rank))
            factors[name] = (torch.cat(downs, 0), torch.cat(ups, 1))  # (Σr, in), (out, Σr)
        rank = sum(ad.rank for ad in adapters)
        sources = " + ".join(f"({ad.info.source})" for ad in adapters)
        return Adapter(
            kind="lora",
            factors=factors,
            dims=dims,
            alpha=float(rank),
            fingerprint=first.fingerprint,
            targets=first.targets,
            info=replace(first.info, source=sources),
        )

    @staticmethod
    def mix(adapters: Sequence["Adapter"], weights: Sequence[float]) -> "Adapter":
        """Σ wᵢ·ΔWᵢ; adapters with weight 0 are left out, so mix([a, b], [1, 0]) has exactly a's ΔW."""
        if len(adapters) != len(weights) or not adapters:
            raise HyperdiffError(f"`weights` must give one number per adapter, got {len(weights)} for {len(adapters)}")
        kept = [w * ad for ad, w in zip(adapters, weights) if w != 0]
        if not kept:
            raise HyperdiffError("`weights` must not all be zero")
        return kept[0] if len(kept) == 1 else Adapter.concat(kept)

    @staticmethod
    def stack(adapters: Sequence["Adapter"], table: LayerTable, strength: float = 1.0) -> HyperLoRA:
        """Per-sample deltas, sample i = adapters[i]: down (B, r, in), up (B, out, r), ranks padded with zero
        rows, each adapter's scale folded into its `up`; a layer an adapter lacks is zero for that sample."""
        if not adapters:
            raise HyperdiffError("`adapters` must hold at least one adapter, got none")
        rank = max(ad.rank for ad in adapters)
        layers = {}
        for row in table:
            downs, ups = [], []
            for ad in adapters:
                down, up = ad._lora.get(row.name, (torch.zeros(ad.rank, row.in_features), torch.zeros(row.out_features, ad.rank)))
                pad = rank - down.shape[0]
                downs.append(torch.nn.functional.pad(down.float(), (0, 0, 0, pad)))  # (rank, in)
                ups.append(torch.nn.functional.pad(up.float() * ad.scale, (0, pad)))  # (out, rank)
            layers[row.name] = LowRankDelta(torch.stack(downs), torch.stack(ups))
        return HyperLoRA(layers, strength)

    # -- files --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Native `.safetensors` (see DESIGN.md "Files"), written atomically."""
        return formats.save_native(self, path)

    @classmethod
    def load(cls, path: str | Path, table: LayerTable | None = None) -> "Adapter":
        """Read and validate a native file; with `table`, also check it fits that UNet."""
        path = Path(path)
        fields, rank = formats.read_native(path)
        try:
            adapter = Adapter(**fields)
        except HyperdiffError as e:
            raise HyperdiffError(f"adapter file '{path}': {e}") from None
        if adapter.rank != rank:
            raise HyperdiffError(f"adapter file '{path}' says rank {rank} but its tensors have rank {adapter.rank}")
        if table is not None:
            adapter.check_table(table)
        return adapter

    @property
    def digest(self) -> str:
        """Short hex hash of what this adapter computes (kind, alpha, factor values): equal adapters, equal digest."""
        return formats.digest(self)

    def file_name(self, format: str = "native") -> str:
        return formats.file_name(self, format)

    def save_as(self, folder: str | Path, format: str = "native") -> Path:
        """Write `folder / file_name(format)` (native, diffusers or kohya), atomically; returns the path."""
        return formats.write(self, folder, format)

    def export(self, path: str | Path, format: str = "diffusers") -> Path:
        """Write a LoRA file other tools load: `diffusers` (PEFT, `load_lora_weights`) or `kohya` (A1111/ComfyUI)."""
        return formats.export(self, path, format)

    def export_parts(self, path: str | Path, format: str = "diffusers") -> list[Path]:
        """One LoRA file per schedule part (`split_by_schedule`), named `path` + `-part1`, `-part2`, …"""
        return formats.export_parts(self, path, format)
