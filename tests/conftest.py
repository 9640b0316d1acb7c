"""Shared fixtures: everything offline, tiny seeded models, SD-shaped UNets on the meta device."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hyperdiff import Adapter, LayerTable, LiDBConfig

# Tiny models gain nothing from a second thread, and on 2 shared cores OpenMP's threaded kernels can run 50×
# slower whenever the other core is busy (a CLI subprocess, another test process).
torch.set_num_threads(1)


@pytest.fixture
def pipe():
    """A fresh tiny pipeline (tests may install processors or fuse into it)."""
    from hyperdiff.models import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd15_unet():
    from hyperdiff.models.configs import build_unet

    return build_unet("sd15", device="meta")


@pytest.fixture(scope="session")
def sd21_unet():
    from hyperdiff.models.configs import build_unet

    return build_unet("sd21", device="meta")


def random_lora(table: LayerTable, seed: int, rank: int = 2, alpha: float | None = None, std: float = 0.2) -> Adapter:
    """A LoRA adapter with non-zero random factors on every layer (so it can fail tests)."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        r.name: (
            torch.randn(rank, r.in_features, generator=g) * std / r.in_features**0.5 * 4,
            torch.randn(r.out_features, rank, generator=g) * std,
        )
        for r in table
    }
    return Adapter.from_factors(factors, table, alpha=alpha)


def random_lidb(table: LayerTable, seed: int, config: LiDBConfig = LiDBConfig(), std: float = 0.3) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        r.name: (torch.randn(config.a, config.rank, generator=g) * std, torch.randn(config.rank, config.b, generator=g) * std)
        for r in table
    }
    return Adapter.from_lidb(factors, table, config)


def unet_inputs(unet, batch: int = 2, seed: int = 0, tokens: int = 7):
    """Seeded (latents, timesteps, text states) for a direct UNet call."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    t = torch.full((batch,), 500)
    e = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return x, t, e
