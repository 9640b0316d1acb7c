"""Fusing low-rank deltas into Linear weights, and exact unfusing.

Contract:
- `fuse(unet, key, deltas)` adds `ΔW = up · down` to the weight of each named Linear (in place for float32
  weights; accumulated in float32 and rounded once for half-precision weights). `key` is the object that owns the deltas (an Adapter); it must not be fused twice
  into the same UNet.
- `unfuse(unet, key)` removes one fused entry, in any order, and leaves the weights *bit for bit* as if only the
  remaining entries had been fused: the first fuse into a UNet keeps a copy of the original weights of the
  layers it touches; unfuse restores those copies and re-fuses the remaining entries in their original order
  (deterministic, so bit-exact). When nothing is fused any more the copies are dropped.
- The per-UNet record lives in a `WeakKeyDictionary` keyed by the UNet module, so it dies with the UNet. The
  copies of original weights are kept after the last unfuse, so swapping adapters costs no copy of the base;
  they are trusted again only while each weight is the same tensor with the same in-place version counter
  (`Tensor._version`) as when hyperdiff last wrote it — weights changed by other code are copied afresh.
  `forget(unet)` drops the copies. Weights changed by other code *while* something is fused are overwritten
  by unfuse.
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
class _FuseRecord:
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # name → weight before any fuse
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (id, _version) after our last write
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


def _stamp(weight: torch.Tensor) -> tuple[int, int]:
    return id(weight), weight._version


@torch.no_grad()
def _add(unet: nn.Module, record: _FuseRecord, deltas: Deltas) -> None:
    for name, (down, up) in deltas.items():
        weight = _linear(unet, name).weight  # (out, in)
        if weight.dtype == torch.float32:  # one in-place GEMM pass over W: W += up @ down
            weight.addmm_(up.to(weight), down.to(weight))
        else:  # half precision: accumulate in float32, round once
            delta = up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)
            weight.copy_((weight.float() + delta).to(weight.dtype))
        record.stamps[name] = _stamp(weight)


@torch.no_grad()
def fuse(unet: nn.Module, key: object, deltas: Deltas) -> None:
    record = _RECORDS.setdefault(unet, _FuseRecord())
    if any(k is key for k, _ in record.entries):
        raise HyperdiffError("this adapter is already fused into this UNet: unfuse it first")
    touched = {n for _, d in record.entries for n in d}
    for name in deltas:
        weight = _linear(unet, name).weight
        if name not in touched and record.stamps.get(name) != _stamp(weight):
            record.originals[name] = weight.detach().clone()  # the base changed (or first fuse): copy it
            record.stamps[name] = _stamp(weight)
    _add(unet, record, deltas)
    record.entries.append((key, deltas))


@torch.no_grad()
def unfuse(unet: nn.Module, key: object) -> None:
    record = _RECORDS.get(unet)
    if record is None or not any(k is key for k, _ in record.entries):
        raise HyperdiffError("this adapter is not fused into this UNet")
    touched = {n for _, d in record.entries for n in d}
    record.entries = [(k, d) for k, d in record.entries if k is not key]
    for name in touched:
        weight = _linear(unet, name).weight
        weight.copy_(record.originals[name])
        record.stamps[name] = _stamp(weight)
    for _, deltas in record.entries:
        _add(unet, record, deltas)


def fused_count(unet: nn.Module) -> int:
    """How many adapters are fused into `unet` right now."""
    record = _RECORDS.get(unet)
    return len(record.entries) if record else 0


def forget(unet: nn.Module) -> None:
    """Drop the kept copies of `unet`'s original weights (only when nothing is fused)."""
    if fused_count(unet):
        raise HyperdiffError("`unet` still has fused adapters: unfuse them before forget()")
    _RECORDS.pop(unet, None)
