"""The `hyperdiff` command line, run as a user runs it: a subprocess, files read back, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hyperdiff import Adapter, LayerTable
from hyperdiff.models import tiny_pipeline

from conftest import random_lidb


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "hyperdiff.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    table = LayerTable.from_unet(tiny_pipeline(seed=0).unet)
    return random_lidb(table, seed=1, token="sks").save(tmp_path_factory.mktemp("a") / "id.safetensors")


def test_help_names_every_command():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("export", "inspect", "demo"):
        assert cmd in out.stdout
    assert "--format" in run("export", "--help").stdout


@pytest.mark.parametrize("fmt, key", [("diffusers", ".lora.down.weight"), ("kohya", ".lora_down.weight")])
def test_export_writes_a_loadable_lora_file(adapter_file, tmp_path, fmt, key):
    out = tmp_path / "sub" / f"{fmt}.safetensors"
    res = run("export", adapter_file, "--format", fmt, "--out", out)
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    tensors = load_file(out)
    ad = Adapter.load(adapter_file)
    assert sum(k.endswith(key) for k in tensors) == len(ad.factors)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["hyperdiff.base_fingerprint"] == ad.fingerprint


def test_inspect_prints_the_adapter(adapter_file):
    res = run("inspect", adapter_file)
    assert res.returncode == 0, res.stderr
    assert "kind: lidb" in res.stdout and "values: 4,800" in res.stdout and "token: sks" in res.stdout
    assert "low-noise schedule: one strength" in res.stdout


def _bad_inputs(adapter_file, tmp_path):
    text = tmp_path / "text.safetensors"
    text.write_text("not tensors")
    lora = tmp_path / "lora.safetensors"
    Adapter.load(adapter_file).export(lora, "kohya")
    return {
        "absent adapter": (["export", tmp_path / "absent.safetensors", "--format", "kohya", "--out", tmp_path / "o.safetensors"], "does not exist"),
        "not safetensors": (["export", text, "--format", "kohya", "--out", tmp_path / "o.safetensors"], "is not a safetensors file"),
        "foreign lora": (["inspect", lora], "is a kohya LoRA export; load the native adapter"),
        "unwritable out": (["export", adapter_file, "--format", "kohya", "--out", "/proc/nope/o.safetensors"], "/proc/nope"),
        "out is a folder": (["export", adapter_file, "--format", "kohya", "--out", tmp_path], "is a folder"),
        "wrong suffix": (["export", adapter_file, "--format", "kohya", "--out", tmp_path / "o.ckpt"], "must end with .safetensors"),
        "unknown format": (["export", adapter_file, "--format", "ckpt", "--out", tmp_path / "o.safetensors"], "invalid choice"),
    }


def test_bad_inputs_exit_2_with_one_line_and_no_partial_file(adapter_file, tmp_path):
    for case, (args, needle) in _bad_inputs(adapter_file, tmp_path).items():
        res = run(*args)
        assert res.returncode == 2, (case, res.stderr)
        assert needle in res.stderr, (case, res.stderr)
        assert "Traceback" not in res.stderr, case
        if case != "unknown format":  # argparse prints usage + one error line
            assert res.stderr.strip().count("\n") == 0, (case, res.stderr)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("o.")]
    assert leftovers == []


def test_demo_runs_offline_and_writes_its_outputs(tmp_path):
    """The default demo on what is shipped: the embedded base with its hypernet, or DreamBooth-LiDB on the embedded
    base while no hypernet is shipped."""
    from hyperdiff.pipeline import EMBEDDED_HYPERNET

    res = run("demo", "--out", tmp_path / "demo")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "demo"
    with_hypernet = EMBEDDED_HYPERNET.is_dir()
    from hyperdiff.data import synthfaces
    from hyperdiff.demo import REFERENCE_SCENES, SCENES

    with Image.open(out / "sheet.png") as sheet:  # reference | [zero-shot |] personalized | base model | truth
        cols = 5 if with_hypernet else 4
        top = sheet.size[1] - 2 * 2 * 128
        assert sheet.size[0] == cols * 128 and 18 <= top <= 60  # titles on top
        for r, (i, k) in enumerate((i, k) for i in range(2) for k in range(len(SCENES))):  # identity-major rows
            identity = synthfaces.Identity.from_seed(1_000_000 + i)
            cells = {c: sheet.crop((c * 128, top + r * 128, (c + 1) * 128, top + (r + 1) * 128)) for c in (0, cols - 1)}
            want = {0: synthfaces.render(identity, REFERENCE_SCENES[i], 64),  # the coloured reference, and the truth:
                    cols - 1: synthfaces.render(identity, SCENES[k], 64)}  # that identity in the prompted scene
            for c, image in want.items():
                assert cells[c].tobytes() == image.resize((128, 128), Image.NEAREST).tobytes(), (r, c)
    assert all(scene.background != "gray" for scene in REFERENCE_SCENES)
    # the fine-tune ran with the defaults a user gets: told what each reference shows, read from it
    assert "identity 1000000: fine-tuned on caption (read from the references)='a sks face, neutral, on a green background'" in res.stdout
    assert "identity 1000001: fine-tuned on caption (read from the references)='a sks face, sad, wearing a hat, on a yellow background'" in res.stdout
    for seed in (1_000_000, 1_000_001):  # held-out identities
        ad = Adapter.load(out / f"identity{seed}.safetensors")
        assert (ad.kind, ad.rank) == (("lora", 1 + 4) if with_hypernet else ("lidb", 1))
        assert (out / f"identity{seed}.diffusers.safetensors").exists() and (out / f"identity{seed}.kohya.safetensors").exists()
    assert "step times:" in res.stdout and "Traceback" not in res.stderr
    line = next(l for l in res.stdout.splitlines() if "vanilla diffusers" in l)
    assert float(line.rsplit(" ", 1)[1]) <= 2 / 255  # PEFT's loader gives hyperdiff's image
