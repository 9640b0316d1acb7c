"""Half precision and GPUs: the shipped pipeline gives the same adapters and images as float32 on the CPU, within
rounding, through the API and the CLI's `--device`/`--dtype`.

Everywhere: bfloat16 on the CPU (the half-precision paths: the processors cast the deltas, the fine-tune trains float32
factors through a half UNet, adapters come back float32 on the CPU). Where CUDA is present (never in CI; run
`pytest tests/test_device.py` on a GPU machine): cuda in float16 (the fine-tune's loss scaling) and bfloat16, and
the diffusers export loaded by vanilla diffusers on cuda. The reference is always float32 on the CPU; a seed's noise
is drawn in float32 on the CPU whatever the device and precision (diffusers would draw other numbers in half precision).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hyperdiff import Adapter
from hyperdiff import synthfaces as sf
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

PROMPT = "a sks face, smiling, on a red background"
SETUPS = [("cpu", "bfloat16")] + ([("cuda", "float16"), ("cuda", "bfloat16")] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _arr(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def _delta(ad: Adapter, names) -> torch.Tensor:
    return torch.cat([ad.delta_weight(n).flatten() for n in names])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ref():
    return sf.render(sf.Identity.from_seed(1_000_003), sf.Scene("gray", False, "neutral"), 64)


@pytest.fixture(scope="module")
def reference(ref):
    """float32 on the CPU: the pipeline, its zero-shot and 10-step adapters, their images and the base model's."""
    hdb = HyperDreamBoothPipeline.from_pretrained(device="cpu")
    zero, tuned = hdb.personalize([ref]), hdb.personalize([ref], finetune_steps=10)
    images = _arr(hdb.generate(PROMPT, tuned, num_images=2, steps=20))
    base = _arr(hdb.generate(PROMPT, None, num_images=2, steps=20))
    return hdb, zero, tuned, images, base


@pytest.mark.parametrize("device, dtype", SETUPS)
def test_personalize_and_generate_match_float32_on_the_cpu(reference, ref, device, dtype):
    hdb32, zero32, tuned32, images32, base32 = reference
    hdb = HyperDreamBoothPipeline.from_pretrained(device=device, dtype=dtype)
    assert hdb.describe()["device"].startswith(device) and hdb.describe()["dtype"] == dtype
    names = hdb.table.names
    zero = hdb.personalize([ref])  # the hypernet stays float32: only the device's arithmetic differs
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for pair in zero.factors.values() for t in pair)
    assert _rel(_delta(zero, names), _delta(zero32, names)) < 1e-2
    tuned = hdb.personalize([ref], finetune_steps=10)  # same seed: the same noise and timesteps on every device
    learned, learned32 = _delta(tuned, names) - _delta(zero, names), _delta(tuned32, names) - _delta(zero32, names)
    assert float(torch.nn.functional.cosine_similarity(learned, learned32, dim=0)) > 0.95
    assert 0.8 < float(learned.norm() / learned32.norm()) < 1.25  # it learned as much (no underflowed gradients)
    effect = np.abs(images32 - base32).mean()  # what the adapter changes in float32 (≈ 35 of 255)
    fused = _arr(hdb.generate(PROMPT, tuned32, num_images=2, steps=20))
    per_sample = _arr(hdb.generate(PROMPT, [tuned32, tuned32], steps=20))
    assert effect > 10
    assert np.abs(fused - images32).mean() < 0.15 * effect  # measured on the CPU in bfloat16: 1.3
    assert np.abs(per_sample - fused).mean() < 0.15 * effect  # processors vs fused weights: 1.4


@needs_cuda
def test_the_diffusers_export_loads_in_vanilla_diffusers_on_cuda(reference, tmp_path):
    hdb = HyperDreamBoothPipeline.from_pretrained(device="cuda", dtype="float16")
    tuned32 = reference[2]
    ours = _arr(hdb.generate(PROMPT, tuned32, num_images=1, steps=20))
    hdb.pipe.load_lora_weights(str(tuned32.export(tmp_path / "id.safetensors", "diffusers")), adapter_name="id")
    side = hdb.pipe.unet.config.sample_size  # generate() draws its noise in float32 on the CPU, then casts it
    noise = torch.randn((1, hdb.pipe.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(0))
    theirs = _arr(hdb.pipe(PROMPT, num_inference_steps=20, guidance_scale=4.0, latents=noise.to("cuda", torch.float16)).images)
    assert np.abs(theirs - ours).mean() < 2.0


@needs_cuda
def test_cli_runs_on_cuda_and_its_file_reproduces_the_api(reference, ref, tmp_path):
    ref.save(tmp_path / "ref.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "hyperdiff.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)

    out = tmp_path / "me.safetensors"
    res = run("personalize", "--image", tmp_path / "ref.png", "--out", out, "--finetune-steps", "10", "--device", "cuda")
    assert res.returncode == 0, res.stderr
    res = run("generate", "--adapter", out, "--prompt", PROMPT, "--out", tmp_path / "imgs", "--steps", "20", "--device", "cuda")
    assert res.returncode == 0, res.stderr
    hdb = HyperDreamBoothPipeline.from_pretrained(device="cuda")
    api = _arr(hdb.generate(PROMPT, Adapter.load(out), steps=20))
    assert np.abs(_arr([Image.open(tmp_path / "imgs" / "me_seed0.png")]) - api).mean() < 1.0
    names = hdb.table.names
    assert _rel(_delta(Adapter.load(out), names), _delta(reference[2], names)) < 0.3  # float16 vs float32 fine-tune
