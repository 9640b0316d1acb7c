"""LiDB: Lightweight DreamBooth factorisation of a low-rank weight delta.

Contract (DESIGN.md, "LiDB"):
    ΔW = up · down,   down = A_trainᵀ · A_aux  (r × in),   up = B_auxᵀ · B_trainᵀ  (out × r)
with trainable A_train (a × r) and B_train (r × b), and frozen auxiliary bases A_aux (a × in), B_aux (b × out).

- Aux bases have rows of unit norm. When rows ≤ columns the rows are orthonormal (a Haar-random orthonormal
  frame). When rows > columns (tiny models, e.g. a = 100 > in = 32) rows cannot all be orthogonal: the basis
  stacks independent orthonormal blocks, so rows keep unit norm and the basis keeps full column rank (every
  down/up direction stays reachable) while every layer keeps the same trainable shapes, so one hypernet head
  serves all layers.
- Bases are regenerated bit-identically from `(aux_seed, layer name, "A"|"B")`: a sha256-derived seed feeds a
  CPU `torch.Generator`; the QR runs in float64 on one thread (LAPACK results may depend on the thread count;
  on 2 cores the threaded QR is also 50× slower) with the sign fixed by diag(R), then rounds to float32.
  Python's `hash()` is never used.
- `compose` accepts leading batch dimensions on the trainable factors: A_train (..., a, r) → down (..., r, in).
- `aux_bases(..., device=...)` also keeps a copy on that device (cached like the CPU basis), so training on a GPU
  copies each basis there once, not on every step.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from hyperdiff.errors import HyperdiffError, check_positive_int


@dataclass(frozen=True)
class LiDBConfig:
    """Shapes and seed of a LiDB factorisation (paper defaults: a=100, b=50, r=1)."""

    rank: int = 1
    a: int = 100
    b: int = 50
    aux_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "a", "b"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.aux_seed, bool) or not isinstance(self.aux_seed, int) or not 0 <= self.aux_seed < 2**63:
            raise HyperdiffError(f"`aux_seed` must be an integer in [0, 2**63), got {self.aux_seed!r}")

    @property
    def trainable_per_layer(self) -> int:
        """Values in A_train (a × r) plus B_train (r × b)."""
        return self.rank * (self.a + self.b)

    def to_dict(self) -> dict:
        return asdict(self)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the sha256 of the parts' text; equal on every machine and Python run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=1024)
def _aux_basis_cached(rows: int, cols: int, seed: int) -> torch.Tensor:
    with _one_thread():
        return _orthonormal_rows(rows, cols, seed)


def _orthonormal_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    remaining = rows
    while remaining > 0:
        k = min(remaining, cols)
        gauss = torch.randn(cols, k, generator=gen, dtype=torch.float64)  # (cols, k)
        q, r = torch.linalg.qr(gauss)  # q: (cols, k) orthonormal columns
        q = q * torch.where(torch.diagonal(r) >= 0, 1.0, -1.0)  # fix signs: unique and Haar-distributed
        blocks.append(q.T)  # (k, cols), orthonormal rows
        remaining -= k
    basis = torch.cat(blocks).to(torch.float32)  # (rows, cols)
    basis.requires_grad_(False)
    return basis


@lru_cache(maxsize=1024)
def _aux_basis_on(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    return _aux_basis_cached(rows, cols, seed).to(device)


def aux_basis(rows: int, cols: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Frozen (rows × cols) float32 basis with unit-norm rows; orthonormal rows when rows ≤ cols. Computed on the
    CPU; with another `device`, a copy there.

    The returned tensor is shared (cached): never modify it in place.
    """
    check_positive_int("rows", rows)
    check_positive_int("cols", cols)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return _aux_basis_cached(rows, cols, seed)
    return _aux_basis_on(rows, cols, seed, device)


def aux_bases(
    name: str, in_features: int, out_features: int, config: LiDBConfig, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_aux (a × in), B_aux (b × out)) for one layer, from `(aux_seed, name)`, on `device` (default: CPU).

    Cached per layer and device: the training loops ask for every layer's bases at every step, and the seeds' hashing
    then runs once, not twice per layer per step."""
    return _aux_bases_cached(name, in_features, out_features, config, torch.device(device or "cpu"))


@lru_cache(maxsize=4096)
def _aux_bases_cached(
    name: str, in_features: int, out_features: int, config: LiDBConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    a_aux = aux_basis(config.a, in_features, stable_seed(config.aux_seed, name, "A"), device)
    b_aux = aux_basis(config.b, out_features, stable_seed(config.aux_seed, name, "B"), device)
    return a_aux, b_aux


def compose(
    a_train: torch.Tensor, b_train: torch.Tensor, a_aux: torch.Tensor, b_aux: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiDB factors → LoRA factors.

    a_train: (..., a, r), b_train: (..., r, b), a_aux: (a, in), b_aux: (b, out)
    returns down: (..., r, in) = A_trainᵀ A_aux and up: (..., out, r) = B_auxᵀ B_trainᵀ.
    """
    a_aux = a_aux.to(device=a_train.device, dtype=a_train.dtype)
    b_aux = b_aux.to(device=b_train.device, dtype=b_train.dtype)
    down = a_train.transpose(-1, -2) @ a_aux  # (..., r, in)
    up = b_aux.T @ b_train.transpose(-1, -2)  # (..., out, r)
    return down, up


def lidb_parameter_count(num_layers: int, config: LiDBConfig) -> int:
    """Trainable values of a LiDB adapter over `num_layers` layers (SD1.5, paper defaults: 128 × 150 = 19,200)."""
    return num_layers * config.trainable_per_layer


def lora_parameter_count(dims: list[tuple[int, int]], rank: int) -> int:
    """Values of a plain LoRA of `rank` over layers with (in, out) dims (SD1.5, rank 1: 199,296)."""
    return sum(rank * (i + o) for i, o in dims)
