"""Attention processors that add low-rank deltas to a UNet's q/k/v/out projections.

Contract (DESIGN.md, "Processors"):
- One class, `HyperLoRAAttnProcessor`, installed on every targeted diffusers `Attention` module. It computes
  exactly what diffusers' `AttnProcessor2_0` computes and, for each projection `p` of the module named `name`,
  adds `strength · scale · up (down x)` for every `LowRankDelta` keyed `f"{name}.{p}"`.
- Deltas come from two places, and all of them are applied (summed):
  * installed with the processor (`install`, `hyper_lora_processors`, `Adapter.applied`): used by every forward
    with no extra argument;
  * per call, through `cross_attention_kwargs={"hyper_lora": HyperLoRA | sequence of HyperLoRA}` — a key the
    processor declares, so diffusers passes it on (it drops undeclared keys and consumes `scale`).
- Shapes: `down` is (r, in) (shared by the batch) or (B, r, in) (one per sample); `up` is (out, r) or
  (B, out, r). Per-sample deltas must match the UNet batch exactly: classifier-free guidance runs
  `[uncond; cond]`, so use `HyperLoRA.repeat_for(num_images_per_prompt, guidance=True)`.
- With no deltas the processor's output equals `AttnProcessor2_0`'s bit for bit.
- Few kernels per module: the projections that read one input (q, k, v in self-attention; k, v in
  cross-attention; q; out) have their down-projections packed along the rank (`HyperLoRA.packed`, built once per
  HyperLoRA): one matmul for their rank-r intermediates, then one addmm/baddbmm per projection with the scales as
  its alpha. A whole batch's per-sample deltas go through one bmm.
- Deltas being trained (factors that require grad) on a half-precision UNet are computed in float32 and added once
  rounded: their factors are float32 master weights, and bfloat16's 8-bit mantissa in their products bent the
  learned direction (tests/test_device.py). Inference keeps the UNet's dtype.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hyperdiff.core.layers import LayerTable
from hyperdiff.errors import HyperdiffError

logger = logging.getLogger(__name__)

CROSS_ATTENTION_KWARG = "hyper_lora"


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = scale · up · down for one Linear; `down` (r, in) | (B, r, in), `up` (out, r) | (B, out, r)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        d, u = self.down, self.up
        if d.dim() not in (2, 3) or u.dim() != d.dim():
            raise HyperdiffError(f"`down`/`up` must both be 2-D or both 3-D, got {tuple(d.shape)} and {tuple(u.shape)}")
        if d.shape[-2] != u.shape[-1] or (d.dim() == 3 and d.shape[0] != u.shape[0]):
            raise HyperdiffError(f"`down` {tuple(d.shape)} and `up` {tuple(u.shape)} do not share a rank/batch")

    @property
    def batch(self) -> int | None:
        """Number of samples for per-sample deltas, None when shared by the whole batch."""
        return self.down.shape[0] if self.down.dim() == 3 else None

    def to(self, device=None, dtype=None) -> "LowRankDelta":
        """The same delta with both factors on `device` (and in `dtype`), e.g. once before many UNet calls."""
        return LowRankDelta(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype), self.scale)

    def repeat_for(self, num_images_per_prompt: int, guidance: bool) -> "LowRankDelta":
        if self.batch is None:
            return self

        def rep(t: torch.Tensor) -> torch.Tensor:
            t = t.repeat_interleave(num_images_per_prompt, dim=0)  # like diffusers' prompt_embeds repeat
            return torch.cat([t, t]) if guidance else t  # [uncond; cond]

        return LowRankDelta(rep(self.down), rep(self.up), self.scale)


def _accumulate(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """y + alpha · h upᵀ in one kernel over y (addmm / baddbmm; alpha scales inside it) for h (B, N, r)."""
    up = up.to(device=y.device, dtype=y.dtype)
    if up.dim() == 2:  # shared by the batch
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.T, alpha=alpha).view(y.shape)
    return torch.baddbmm(y, h, up.transpose(-1, -2), alpha=alpha)  # per sample: (B, N, r) @ (B, r, out)


@dataclass(frozen=True)
class PackedDeltas:
    """The deltas of several projections of one attention module that read the same input (q/k/v in
    self-attention, k/v in cross-attention), their down-projections stacked along the rank: one matmul computes
    every projection's rank-r intermediate, then one (b)addmm per projection accumulates into its output."""

    down: torch.Tensor  # (R, in) | (B, R, in), R = the projections' ranks summed
    ups: tuple[tuple[str, slice, torch.Tensor, float], ...]  # (projection, its rank slice of R, up, scale)
    batch: int | None

    @classmethod
    def of(cls, deltas: Sequence[tuple[str, LowRankDelta]]) -> "PackedDeltas":
        batch = next((d.batch for _, d in deltas if d.batch is not None), None)
        downs, ups, start = [], [], 0
        for proj, d in deltas:
            down = d.down if batch is None or d.batch is not None else d.down.expand(batch, -1, -1)
            up = d.up if batch is None or d.batch is not None else d.up.expand(batch, -1, -1)
            r = down.shape[-2]
            downs.append(down)
            ups.append((proj, slice(start, start + r), up, d.scale))
            start += r
        down = downs[0] if len(downs) == 1 else torch.cat(downs, dim=-2)
        return cls(down, tuple(ups), batch)

    def add_to(self, outputs: dict[str, torch.Tensor], x: torch.Tensor, strength: float) -> None:
        """outputs[p] += strength · scale_p · (x downᵀ)[..., slice_p] up_pᵀ for every packed projection p."""
        trained = self.down.requires_grad or any(up.requires_grad for _, _, up, _ in self.ups)
        half = x.dtype in (torch.float16, torch.bfloat16)
        work = torch.float32 if trained and half else x.dtype  # float32 products for float32 master factors
        h = x.to(work) @ self.down.to(device=x.device, dtype=work).transpose(-1, -2)  # (B, N, R): one matmul for all
        for proj, rank, up, scale in self.ups:
            y = outputs[proj]
            outputs[proj] = _accumulate(y.to(work), h[..., rank], up, scale * strength).to(y.dtype)


@dataclass(frozen=True)
class HyperLoRA:
    """Deltas for one forward: `{layer name: LowRankDelta}` times a global `strength`."""

    layers: Mapping[str, LowRankDelta]
    strength: float = 1.0
    batch: int | None = field(init=False)

    _packs: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        batches = {d.batch for d in self.layers.values()} - {None}
        if len(batches) > 1:
            raise HyperdiffError(f"`hyper_lora` layers have different per-sample batch sizes {sorted(batches)}")
        object.__setattr__(self, "batch", batches.pop() if batches else None)
        object.__setattr__(self, "_packs", {})  # memo of `packed`: a function of the (immutable) layers

    def packed(self, attention: str, projections: tuple[str, ...]) -> PackedDeltas | None:
        """The deltas of `attention`'s `projections` (those this HyperLoRA has) packed for one matmul, built once
        per HyperLoRA (the processors ask at every UNet call); None when it has none of them."""
        key = (attention, projections)
        if key not in self._packs:
            found = [(p, self.layers[f"{attention}.{p}"]) for p in projections if f"{attention}.{p}" in self.layers]
            self._packs[key] = PackedDeltas.of(found) if found else None
        return self._packs[key]

    def repeat_for(self, num_images_per_prompt: int = 1, guidance: bool = True) -> "HyperLoRA":
        """Per-sample deltas laid out like the UNet batch of a diffusers pipeline call: each prompt's sample
        repeated `num_images_per_prompt` times, then the whole batch twice as `[uncond; cond]` under guidance."""
        if num_images_per_prompt < 1:
            raise HyperdiffError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt}")
        layers = {k: d.repeat_for(num_images_per_prompt, guidance) for k, d in self.layers.items()}
        return HyperLoRA(layers, self.strength)

    def to(self, device=None, dtype=None) -> "HyperLoRA":
        """Every layer's delta moved once (the processors would otherwise copy them on every UNet call)."""
        return HyperLoRA({k: d.to(device, dtype) for k, d in self.layers.items()}, self.strength)

    def scaled(self, strength: float) -> "HyperLoRA":
        return HyperLoRA(self.layers, self.strength * strength)


def _as_tuple(hyper_lora: HyperLoRA | Sequence[HyperLoRA] | None) -> tuple[HyperLoRA, ...]:
    if hyper_lora is None:
        return ()
    if isinstance(hyper_lora, HyperLoRA):
        return (hyper_lora,)
    items = tuple(hyper_lora)
    if not all(isinstance(h, HyperLoRA) for h in items):
        raise HyperdiffError(f"`{CROSS_ATTENTION_KWARG}` must be a HyperLoRA or a sequence of them, got {type(hyper_lora)}")
    return items


class HyperLoRAAttnProcessor:
    """`AttnProcessor2_0` with additive low-rank deltas on to_q, to_k, to_v and to_out.0."""

    def __init__(self, name: str, installed: Sequence[HyperLoRA] = ()):
        self.name = name  # dotted path of the Attention module this instance serves
        self.installed = tuple(installed)

    def _add_deltas(self, outputs: dict[str, torch.Tensor], x: torch.Tensor, projections: tuple[str, ...],
                    active: tuple[HyperLoRA, ...]) -> None:
        """Add every active delta of `projections` (all reading `x`) to their `outputs`, packed per HyperLoRA."""
        for hl in active:
            pack = hl.packed(self.name, projections)
            if pack is None:
                continue
            if pack.batch is not None and pack.batch != x.shape[0]:
                raise HyperdiffError(
                    f"`hyper_lora` deltas for '{self.name}.{pack.ups[0][0]}' have batch {pack.batch} but the UNet "
                    f"batch is {x.shape[0]}: with classifier-free guidance or several images per prompt use "
                    "HyperLoRA.repeat_for(...)"
                )
            pack.add_to(outputs, x, hl.strength)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        hyper_lora: HyperLoRA | Sequence[HyperLoRA] | None = None,
    ) -> torch.Tensor:
        active = self.installed + _as_tuple(hyper_lora)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, HW, C)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        if self_attention:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        qkv = {"to_q": attn.to_q(hidden_states),  # (B, N, inner)
               "to_k": attn.to_k(encoder_hidden_states),  # (B, M, inner)
               "to_v": attn.to_v(encoder_hidden_states)}  # (B, M, inner)
        if active:  # q, k and v read one input in self-attention: one packed down-projection for the three
            if self_attention:
                self._add_deltas(qkv, hidden_states, ("to_q", "to_k", "to_v"), active)
            else:
                self._add_deltas(qkv, hidden_states, ("to_q",), active)
                self._add_deltas(qkv, encoder_hidden_states, ("to_k", "to_v"), active)
        query, key, value = qkv["to_q"], qkv["to_k"], qkv["to_v"]

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, M, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, M, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (B, h, N, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)  # (B, N, inner)

        out = {"to_out.0": attn.to_out[0](hidden_states)}  # (B, N, out)
        if active:
            self._add_deltas(out, hidden_states, ("to_out.0",), active)
        hidden_states = out["to_out.0"]
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _check_layers(table: LayerTable, hyper_loras: Sequence[HyperLoRA]) -> None:
    for hl in hyper_loras:
        unknown = [k for k in hl.layers if k not in table]
        if unknown:
            raise HyperdiffError(f"`hyper_lora` names {len(unknown)} layers this UNet does not target, e.g. '{unknown[0]}'")
        for name, d in hl.layers.items():
            row = table[name]
            if d.down.shape[-1] != row.in_features or d.up.shape[-2] != row.out_features:
                raise HyperdiffError(
                    f"`hyper_lora` delta for '{name}' maps {d.down.shape[-1]} → {d.up.shape[-2]} features, "
                    f"expected {row.in_features} → {row.out_features}"
                )


def install(unet: nn.Module, table: LayerTable, hyper_loras: Sequence[HyperLoRA] = ()) -> dict[str, object]:
    """Put a `HyperLoRAAttnProcessor` on every attention module of `table`, keeping deltas already installed
    by an enclosing `install` and adding `hyper_loras`. Returns the previous processors by module path."""
    _check_layers(table, hyper_loras)
    previous: dict[str, object] = {}
    for path in table.attention_modules:
        attn = unet.get_submodule(path)
        prev = attn.processor
        previous[path] = prev
        inherited = prev.installed if isinstance(prev, HyperLoRAAttnProcessor) else ()
        if not isinstance(prev, HyperLoRAAttnProcessor) and type(prev).__name__ not in ("AttnProcessor2_0", "AttnProcessor"):
            logger.warning("replacing %s on '%s' with HyperLoRAAttnProcessor", type(prev).__name__, path)
        attn.set_processor(HyperLoRAAttnProcessor(path, inherited + tuple(hyper_loras)))
    return previous


def restore(unet: nn.Module, previous: Mapping[str, object]) -> None:
    """Put back the processors `install` returned."""
    for path, proc in previous.items():
        unet.get_submodule(path).set_processor(proc)


@contextmanager
def hyper_lora_processors(unet: nn.Module, table: LayerTable | None = None, *hyper_loras: HyperLoRA) -> Iterator[None]:
    """Within the block, every forward of `unet` uses `hyper_loras` (and accepts more per call); the previous
    processors come back on exit, also on an exception."""
    table = table or LayerTable.from_unet(unet)
    previous = install(unet, table, hyper_loras)
    try:
        yield
    finally:
        restore(unet, previous)
