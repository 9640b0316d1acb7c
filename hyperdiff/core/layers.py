"""LayerTable: the target Linears of a UNet, keyed by stable dotted module names.

Contract:
- `LayerTable.from_unet(unet, targets=TargetConfig())` lists every `nn.Linear` named
  `<attention module>.<projection>` where the attention module is a diffusers `Attention` whose own name
  ends with one of `targets.attention` (default `attn1`, `attn2`) and the projection is one of
  `targets.projections` (default `to_q`, `to_k`, `to_v`, `to_out.0`). SD1.5: 128 rows.
- Rows carry the diffusers module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), the
  attention module path, the projection and `in_features`/`out_features` read from the module itself
  (never parsed from names). Works on the meta device.
- `fingerprint`: a stable hash (sha256 of names and shapes only) that is equal across builds, devices and
  machines for one architecture and target set; every adapter and hypernet carries it.
- Rows are in the UNet's module order; all lookups are by name.
- `LayerTable.from_header(header, targets)`: the same rows, so the same fingerprint, from the safetensors header of
  a diffusers UNet's weights ({name: {"shape": [out, in]}}; `hyperdiff.models.sources.unet_header`) with no module
  built: a target is `<attention>.<projection>.weight` with a 2-D shape, the attention's last name in
  `targets.attention`. A header does not hold the module order: rows come in natural order of the attention path
  (numbers compared as numbers), then in `targets.projections` order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Iterator

from torch import nn

from hyperdiff.errors import HyperdiffError

DEFAULT_ATTENTION = ("attn1", "attn2")
DEFAULT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
KNOWN_PROJECTIONS = DEFAULT_PROJECTIONS


@dataclass(frozen=True)
class TargetConfig:
    """Which Linears an adapter targets: attention modules by name suffix, projections by name."""

    attention: tuple[str, ...] = DEFAULT_ATTENTION
    projections: tuple[str, ...] = DEFAULT_PROJECTIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention", tuple(self.attention))
        object.__setattr__(self, "projections", tuple(self.projections))
        if not self.attention or not all(isinstance(a, str) and a for a in self.attention):
            raise HyperdiffError(f"`attention` must be a non-empty list of module names, got {list(self.attention)}")
        bad = [p for p in self.projections if p not in KNOWN_PROJECTIONS]
        if not self.projections or bad:
            raise HyperdiffError(
                f"`projections` must be a non-empty subset of {list(KNOWN_PROJECTIONS)}, got {list(self.projections)}"
            )

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def _natural(path: str) -> tuple:
    """Sort key of a dotted path with its numbers compared as numbers ("blocks.10" after "blocks.9")."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


@dataclass(frozen=True)
class LayerRow:
    """One target Linear."""

    name: str  # full dotted path of the Linear, e.g. "...attn1.to_out.0"
    attention: str  # dotted path of its diffusers Attention module, e.g. "...attn1"
    projection: str  # "to_q" | "to_k" | "to_v" | "to_out.0"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LayerTable:
    """Ordered, name-keyed table of the Linears an adapter acts on."""

    rows: tuple[LayerRow, ...]
    targets: TargetConfig = field(default_factory=TargetConfig)

    @classmethod
    def from_unet(cls, unet: nn.Module, targets: TargetConfig | None = None) -> "LayerTable":
        from diffusers.models.attention_processor import Attention

        targets = targets or TargetConfig()
        rows = []
        for attn_name, module in unet.named_modules():
            if not isinstance(module, Attention) or attn_name.rsplit(".", 1)[-1] not in targets.attention:
                continue
            for proj in targets.projections:
                linear = module.get_submodule(proj)
                if not isinstance(linear, nn.Linear):
                    raise HyperdiffError(f"`{attn_name}.{proj}` must be an nn.Linear, got {type(linear).__name__}")
                rows.append(LayerRow(f"{attn_name}.{proj}", attn_name, proj, linear.in_features, linear.out_features))
        if not rows:
            raise HyperdiffError(f"`unet` has no attention modules named {list(targets.attention)}: nothing to target")
        return cls(tuple(rows), targets)

    @classmethod
    def from_header(cls, header: dict, targets: TargetConfig | None = None) -> "LayerTable":
        targets = targets or TargetConfig()
        pattern = re.compile(r"^(?P<attn>.+\.(?:%s))\.(?P<proj>%s)\.weight$" % (
            "|".join(map(re.escape, targets.attention)), "|".join(map(re.escape, targets.projections))))
        rows = []
        for name, entry in header.items():
            match = pattern.match(name)
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if match is not None and isinstance(shape, list) and len(shape) == 2:
                rows.append(LayerRow(f"{match['attn']}.{match['proj']}", match["attn"], match["proj"],
                                     int(shape[1]), int(shape[0])))
        if not rows:
            raise HyperdiffError(f"the header names no attention modules {list(targets.attention)}: nothing to target")
        rows.sort(key=lambda r: (_natural(r.attention), targets.projections.index(r.projection)))
        return cls(tuple(rows), targets)

    # -- mapping-like access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> LayerRow:
        try:
            return self._index[name]
        except KeyError:
            raise HyperdiffError(f"layer '{name}' is not in this LayerTable ({len(self)} layers)") from None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    @property
    def attention_modules(self) -> list[str]:
        """Attention module paths in table order, each once."""
        return list(dict.fromkeys(r.attention for r in self.rows))

    @cached_property
    def _index(self) -> dict[str, LayerRow]:
        return {r.name: r for r in self.rows}

    # -- identity --------------------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 over (name, in, out) of every row, in name order; 16 hex digits."""
        payload = json.dumps(sorted((r.name, r.in_features, r.out_features) for r in self.rows), separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def cross_attention_dim(self) -> int | None:
        """Width of the text features read by cross-attention keys, from the modules (None without attn2.to_k)."""
        dims = {r.in_features for r in self.rows if r.attention.endswith("attn2") and r.projection == "to_k"}
        return dims.pop() if len(dims) == 1 else None

    @property
    def architecture(self) -> str:
        """modelspec architecture family, judged from module widths: v1 (768-d text), v2 (1024-d), else custom."""
        first = self.rows[0].in_features
        return {(320, 768): "stable-diffusion-v1", (320, 1024): "stable-diffusion-v2"}.get(
            (first, self.cross_attention_dim), "hyperdiff-custom"
        )

    def check_fingerprint(self, fingerprint: str, what: str) -> None:
        """Raise a clear error when `what` was made for another architecture."""
        if fingerprint != self.fingerprint:
            raise HyperdiffError(
                f"{what} was made for a base with layer fingerprint {fingerprint}, but this UNet has "
                f"{self.fingerprint}: load it onto the base it was trained for"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "LayerTable":
        """Inverse of `to_dict` (what a hypernet's config.json stores); no UNet needed."""
        targets = TargetConfig(**data["targets"])
        rows = []
        for name, (n_in, n_out) in data["layers"].items():
            proj = next((p for p in targets.projections if name.endswith("." + p)), None)
            if proj is None:
                raise HyperdiffError(f"layer '{name}' does not end with one of the projections {list(targets.projections)}")
            rows.append(LayerRow(name, name[: -len(proj) - 1], proj, int(n_in), int(n_out)))
        table = cls(tuple(rows), targets)
        if "fingerprint" in data:
            table.check_fingerprint(data["fingerprint"], "this layer table")
        return table

    def to_dict(self) -> dict:
        return {
            "targets": self.targets.to_dict(),
            "fingerprint": self.fingerprint,
            "layers": {r.name: [r.in_features, r.out_features] for r in self.rows},
        }
