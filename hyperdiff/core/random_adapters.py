"""Seeded random adapters: stand-ins for trained ones in benchmarks, demos and tests.

Contract: `random_lora(table, seed, ...)` and `random_lidb(table, seed, ...)` draw every factor non-zero from a
local CPU `torch.Generator(seed)` (never the global RNG), so the same arguments give the same adapter bit for bit.
Magnitudes are chosen so the adapter visibly changes a UNet's output without swamping it.
"""

from __future__ import annotations

import torch

from hyperdiff.core.adapter import Adapter
from hyperdiff.core.info import AdapterInfo
from hyperdiff.core.layers import LayerTable
from hyperdiff.core.lidb import LiDBConfig


def random_lora(
    table: LayerTable, seed: int, rank: int = 2, alpha: float | None = None, std: float = 0.2, token: str = ""
) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    factors = {
        r.name: (
            torch.randn(rank, r.in_features, generator=gen) * (4 * std / r.in_features**0.5),  # down (r, in)
            torch.randn(r.out_features, rank, generator=gen) * std,  # up (out, r)
        )
        for r in table
    }
    info = AdapterInfo(token=token, source=f"random_lora(seed={seed})", architecture=table.architecture)
    return Adapter.from_factors(factors, table, alpha=alpha, info=info)


def random_lidb(
    table: LayerTable, seed: int, config: LiDBConfig = LiDBConfig(), std: float = 0.3, token: str = ""
) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    factors = {
        r.name: (
            torch.randn(config.a, config.rank, generator=gen) * std,  # A_train (a, r)
            torch.randn(config.rank, config.b, generator=gen) * std,  # B_train (r, b)
        )
        for r in table
    }
    info = AdapterInfo(token=token, source=f"random_lidb(seed={seed})", architecture=table.architecture)
    return Adapter.from_lidb(factors, table, config, info=info)
