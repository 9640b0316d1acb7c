"""scripts/train_base.py end to end on a miniature config: a loadable diffusers folder, and exact resume."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent

MINI = {
    "model": {"image_size": 32, "unet_block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention_dim": 16,
              "attention_head_dim": 2, "text_hidden_size": 16, "text_layers": 1, "text_heads": 2,
              "vae_block_out_channels": [16, 16], "scheduler": "dpm"},
    "data": {"images": 48, "seed": 0},
    "vae": {"steps": 3, "batch_size": 4, "crop": 16, "warmup_steps": 0},
    "unet": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "ema_decay": 0.9},
    "checkpointing_steps": 3,
    "checkpoints_total_limit": 5,
    "report_to": "none",
}


@pytest.fixture(scope="module")
def train_base():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_base

    return train_base


def _run(train_base, tmp: Path, name: str) -> Path:
    cfg = dict(MINI, output_dir=str(tmp / name), export_dir=str(tmp / name / "export"),
               data=dict(MINI["data"], cache_dir=str(tmp / "cache")))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_base.main(["--config", str(path)]) == 0
    return tmp / name / "export"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for k, v in load_file(next((folder / part).glob("*.safetensors"))).items():
            out[f"{part}.{k}"] = v
    return out


def test_training_exports_a_diffusers_folder_and_resumes_exactly(train_base, tmp_path):
    export = _run(train_base, tmp_path, "full")
    weights = _weights(export)
    assert {v.dtype for k, v in weights.items() if not k.startswith("text_encoder.")} == {torch.float16}  # small
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True, safety_checker=None)
    image = pipe("a face, smiling, on a red background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' std

    # A run that died after step 3: its VAE, caches and checkpoint-3 are all a new run has; it must finish with the
    # weights of the uninterrupted run (batches are seeded by step; optimizer, schedule and EMA come back). Equal to
    # float rounding, not bit for bit: the first step after a resume already differs by 1 ulp (6e-8) in fp32, which
    # the fp16 export shows as ≤ 1 fp16 ulp; a run that restarted from scratch instead would rewrite checkpoint-3.
    run = tmp_path / "resumed"
    (run / "unet").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "vae", run / "vae")
    shutil.copy(tmp_path / "full" / "latents.safetensors", run / "latents.safetensors")
    shutil.copytree(tmp_path / "full" / "unet" / "checkpoint-3", run / "unet" / "checkpoint-3")
    assert (run / "unet" / "checkpoint-3" / "ema.safetensors").exists()
    marker = run / "unet" / "checkpoint-3" / "left-by-the-dead-run"
    marker.touch()  # a run that started over would rewrite checkpoint-3 (and drop this file) at its step 3
    resumed = _run(train_base, tmp_path, "resumed")
    assert marker.exists()
    a, b = _weights(export), _weights(resumed)
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-3


def test_bad_config_is_one_line(train_base, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"vae": {"steps": 0}}))
    assert train_base.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_base: error:") and "`steps` must be a positive integer, got 0" in err and "\n" not in err
