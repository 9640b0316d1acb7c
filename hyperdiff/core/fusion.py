"""Fusing low-rank deltas into Linear weights, and exact unfusing.

Contract:
- `fuse(unet, key, deltas)` makes each named Linear compute with `W + ΔW`, `ΔW = up · down`. `key` is the object
  that owns the deltas (an Adapter); it must not be fused twice into the same UNet.
- `unfuse(unet, key)` removes one fused entry, in any order, and leaves the weights *bit for bit* as if only the
  remaining entries had been fused (in their original order: deterministic, so bit-exact).
- How, in one pass over the weights per swap: the base weights are never written. The first entry fused into a
  layer writes `W + ΔW` into a second buffer of the layer's shape (one elementwise pass for rank 1, `addcmul`; an
  `addmm` for higher ranks; accumulated in float32 and rounded once for half-precision weights) and points the
  Parameter at it (`weight.data`: the Parameter object, its name and `requires_grad` stay); further entries
  accumulate into that buffer in place. Unfusing the last entry of a layer points it back at its base storage — no
  copy at all; with entries left, the buffer is rebuilt from the base. So a fuse + unfuse touches the weights once
  where an in-place add and a restoring copy touch them twice. Code that captures storage pointers (CUDA graphs)
  must capture again after a swap.
- The base of a layer is whatever its weight holds when nothing is fused into it: changes made by other code
  between swaps (a training step, a new `.to()`) are the new base. Weights replaced by other code *while* something
  is fused get the base's values copied into them by unfuse (the change is overwritten, the new storage kept).
- The per-UNet record lives in a `WeakKeyDictionary` keyed by the UNet module, so it dies with the UNet. It keeps
  each layer's buffer after the last unfuse (the next swap allocates nothing; memory: one copy of the touched
  weights, as a kept copy of the originals would); `forget(unet)` drops them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from hyperdiff.errors import HyperdiffError

Deltas = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # name → (down (r, in), up (out, r)), scale folded in


@dataclass
class _Layer:
    base: torch.Tensor  # the weights with nothing fused (the storage the Parameter held before the first fuse)
    buffer: torch.Tensor  # W + the fused deltas, which the Parameter points at while anything is fused


@dataclass
class _FuseRecord:
    layers: dict[str, _Layer] = field(default_factory=dict)  # name → its base and fused buffer
    entries: list[tuple[object, Deltas]] = field(default_factory=list)  # (key, deltas) in fuse order


_RECORDS: "weakref.WeakKeyDictionary[nn.Module, _FuseRecord]" = weakref.WeakKeyDictionary()


def _linear(unet: nn.Module, name: str) -> nn.Linear:
    try:
        module = unet.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise HyperdiffError(f"layer '{name}' is not an nn.Linear of this UNet")
    return module


@torch.no_grad()
def _write(out: torch.Tensor, start: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> None:
    """out = start + up @ down (out may be start): one elementwise pass for rank 1; half precision accumulates in
    float32 and rounds once."""
    if out.dtype == torch.float32:
        down, up = down.to(out), up.to(out)
        if down.shape[0] == 1:  # (out, 1) * (1, in): an outer product, added elementwise
            torch.addcmul(start, up, down, out=out)
        else:
            torch.addmm(start, up, down, out=out)
        return
    delta = up.to(out.device, torch.float32) @ down.to(out.device, torch.float32)
    out.copy_((start.float() + delta).to(out.dtype))


def _fused_into(record: _FuseRecord, name: str, skip: object = None) -> list[Deltas]:
    return [d for k, d in record.entries if k is not skip and name in d]


@torch.no_grad()
def fuse(unet: nn.Module, key: object, deltas: Deltas) -> None:
    record = _RECORDS.setdefault(unet, _FuseRecord())
    if any(k is key for k, _ in record.entries):
        raise HyperdiffError("this adapter is already fused into this UNet: unfuse it first")
    linears = {name: _linear(unet, name) for name in deltas}  # every name checked before any weight changes
    for name, (down, up) in deltas.items():
        weight = linears[name].weight
        layer = record.layers.get(name)
        if _fused_into(record, name):  # already fused by another entry: the weight is its buffer, add in place
            _write(weight.data, weight.data, down, up)
            continue
        live = weight.data  # nothing fused here: the live weights are the base (changed by others or not)
        if layer is None or layer.buffer.shape != live.shape or layer.buffer.dtype != live.dtype \
                or layer.buffer.device != live.device or layer.buffer.data_ptr() == live.data_ptr():
            layer = record.layers[name] = _Layer(live, torch.empty_like(live))
        layer.base = live
        _write(layer.buffer, live, down, up)
        weight.data = layer.buffer
    record.entries.append((key, deltas))


@torch.no_grad()
def unfuse(unet: nn.Module, key: object) -> None:
    record = _RECORDS.get(unet)
    if record is None or not any(k is key for k, _ in record.entries):
        raise HyperdiffError("this adapter is not fused into this UNet")
    removed = next(d for k, d in record.entries if k is key)
    for name in removed:
        weight, layer = _linear(unet, name).weight, record.layers[name]
        remaining = _fused_into(record, name, skip=key)
        replaced = weight.data.data_ptr() != layer.buffer.data_ptr()  # by other code while fused
        if not remaining:
            if replaced:
                weight.data.copy_(layer.base)  # keep their storage, restore the values
            else:
                weight.data = layer.base
            continue
        target = weight.data if replaced else layer.buffer
        for i, (down, up) in enumerate(d[name] for d in remaining):  # rebuilt from the base in fuse order
            _write(target, layer.base if i == 0 else target, down, up)
    record.entries = [(k, d) for k, d in record.entries if k is not key]


def fused_count(unet: nn.Module) -> int:
    """How many adapters are fused into `unet` right now."""
    record = _RECORDS.get(unet)
    return len(record.entries) if record else 0


def forget(unet: nn.Module) -> None:
    """Drop the kept fuse buffers of `unet` (only when nothing is fused)."""
    if fused_count(unet):
        raise HyperdiffError("`unet` still has fused adapters: unfuse them before forget()")
    _RECORDS.pop(unet, None)
