"""Shared fixtures: everything offline, tiny seeded models, SD-shaped UNets on the meta device."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# oneDNN's native bfloat16 kernels (AVX512-BF16, AMX) round bf16 products differently from the emulated path the
# half-precision tolerances of tests/test_device.py were measured on: on such a CPU the bf16 fine-tune's learned
# delta has cosine 0.936 to float32's (0.95 asked; it passes emulated). Pin the ISA (fp32 kernels keep AVX-512) so the
# suite reads the same on every CPU; the native kernels' drift is an open question (docs/benchmarks.md).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")

import pytest
import torch

from hyperdiff.core.random_adapters import random_lidb, random_lora  # noqa: F401 (re-exported for tests)

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


def unet_inputs(unet, batch: int = 2, seed: int = 0, tokens: int = 7):
    """Seeded (latents, timesteps, text states) for a direct UNet call."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    t = torch.full((batch,), 500)
    e = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return x, t, e
