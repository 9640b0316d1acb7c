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


def run(*args, cwd=None, raw=False):
    """`raw`: stdout and stderr as written, carriage returns kept (text mode would turn them into newlines)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", "hyperdiff.cli", *map(str, args)], capture_output=True, text=not raw,
                         env=env, cwd=cwd, timeout=300)
    if raw:
        res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    return res


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
    from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET

    res = run("demo", "--out", tmp_path / "demo")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "demo"
    with_hypernet = EMBEDDED_HYPERNET.is_dir()
    from hyperdiff import synthfaces
    from hyperdiff.synthfaces.demo import REFERENCE_SCENES, SCENES

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


# -- every argument checked before a model loads ----------------------------------------------------------------------
def _argument_cases(adapter_file, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (0, 160, 0)).save(ref)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out" / "a.safetensors"
    p = ["personalize", "--image", ref, "--out", out]
    g = ["generate", "--adapter", adapter_file, "--prompt", "a sks face", "--out", tmp_path / "images"]
    return {
        "negative fine-tune steps": ([*p, "--finetune-steps", "-3"], "`finetune_steps`"),
        "absurd fine-tune steps": ([*p, "--finetune-steps", "1000000000"], "`finetune_steps`"),
        "token with a space": ([*p, "--token", "a b"], "`token`"),
        "negative seed": ([*p, "--seed", "-1"], "`seed`"),
        "absent image": (["personalize", "--image", tmp_path / "absent.png", "--out", out], "absent.png' does not exist"),
        "not an image": (["personalize", "--image", fake, "--out", out], "cannot be read as an image"),
        "out suffix": (["personalize", "--image", ref, "--out", tmp_path / "a.ckpt"], "must end with .safetensors"),
        "out under a file": (["personalize", "--image", ref, "--out", a_file / "a.safetensors"], "is a file, expected a folder"),
        "out unwritable": (["personalize", "--image", ref, "--out", "/proc/nope/a.safetensors"], "is not writable"),
        "out is a folder": (["personalize", "--image", ref, "--out", tmp_path], "is a folder"),
        "caption count": ([*p, "--image", ref, "--image", ref, "--caption", "a", "--caption", "b"], "`--caption`"),
        "caption without the token": ([*p, "--finetune-steps", "2", "--caption", "a face"], "must name the subject"),
        "unknown device": ([*p, "--device", "tpu"], "`device`"),
        "unknown dtype": ([*p, "--dtype", "float8"], "`dtype`"),
        "absent hypernet": ([*p, "--hypernet", tmp_path / "nowhere"], "has no config.json"),
        "zero steps": ([*g, "--steps", "0"], "`steps`"),
        "no images": ([*g, "--num-images", "0"], "`num_images`"),
        "a million images": ([*g, "--num-images", "1000000"], "`num_images`"),
        "NaN guidance": ([*g, "--guidance", "nan"], "`guidance`"),
        "strength out of range": ([*g, "--strength", "11"], "`strength`"),
        "generate negative seed": ([*g, "--seed", "-5"], "`seed`"),
        "empty prompt": ([*g[:3], "--prompt", " ", *g[5:]], "`prompt`"),
        "10,000-character prompt": ([*g[:3], "--prompt", "sks " * 2500, *g[5:]], "`prompt` is 10,000 characters"),
        "images out is a file": ([*g[:5], "--out", a_file], "is a file, expected a folder"),
        "absent adapter": (["generate", "--adapter", tmp_path / "none.safetensors", *g[3:]], "does not exist"),
        "adapter not safetensors": (["generate", "--adapter", fake, *g[3:]], "is not a safetensors file"),
        "low-noise gain": ([*g, "--low-noise-gain", "-1"], "`low_noise.gain`"),
        "low-noise below": ([*g, "--low-noise-below", "2000"], "`low_noise.below`"),
        "export out suffix": (["export", adapter_file, "--format", "kohya", "--out", tmp_path / "x.pt"], ".safetensors"),
        "ui port": (["ui", "--port", "0"], "`--port`"),
        "ui device": (["ui", "--device", "cuda:x"], "`device`"),
        "demo out is a file": (["demo", "--out", a_file], "is a file, expected a folder"),
    }


def test_every_bad_argument_exits_2_with_one_line_before_any_model_loads(adapter_file, tmp_path, monkeypatch, capsys):
    """In process, with every model loader replaced by one that fails the test: each case must be refused first."""
    from hyperdiff import cli
    from hyperdiff.models import base as bases
    from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline
    from ui import app

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(HyperDreamBoothPipeline, "from_pretrained", loaded)
    monkeypatch.setattr(bases, "load_base", loaded)
    monkeypatch.setattr(app, "serve", loaded)
    cases = _argument_cases(adapter_file, tmp_path)
    for case, (args, needle) in cases.items():
        assert cli.main([str(a) for a in args]) == 2, case
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hyperdiff: error: ") and needle in lines[0], (case, lines)
        assert captured.out == "", case
    assert not (tmp_path / "out").exists() and not (tmp_path / "images").exists()  # nothing written, no folder made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "fake.png", "ref.png"]


def test_argument_errors_and_help_import_no_torch(adapter_file, tmp_path):
    """The checks run before torch is imported, so bad input is answered at once (the CLI process as users run it)."""
    cases = _argument_cases(adapter_file, tmp_path)
    chosen = [cases[c][0] for c in ("negative fine-tune steps", "absent image", "out under a file", "zero steps",
                                    "NaN guidance", "absent adapter", "ui port")]
    code = ("import sys; from hyperdiff.cli import main\n"
            f"codes = [main(list(map(str, a))) for a in {[[str(a) for a in args] for args in chosen]!r}]\n"
            "print(codes, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == f"{[2] * len(chosen)} False False", (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == len(chosen)
    res = subprocess.run([sys.executable, "-c", "import sys; from hyperdiff.cli import main\n"
                          "try: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().endswith("False") and "personalize" in res.stdout


def test_library_progress_bars_and_logs_stay_off_stderr_unless_verbose(tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (0, 160, 0)).save(ref)
    quiet = run("personalize", "--image", ref, "--out", tmp_path / "a.safetensors", "--finetune-steps", "2", raw=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading" not in quiet.stderr and "torchvision" not in quiet.stderr, quiet.stderr
    assert "fine-tune" in quiet.stderr  # the CLI's own bar, redrawn in place on one line and erased at its end
    assert "\n" not in quiet.stderr and quiet.stderr.split("\r")[-1].strip() == "", repr(quiet.stderr[-200:])
    verbose = run("personalize", "--image", ref, "--out", tmp_path / "b.safetensors", "--finetune-steps", "1", "--verbose")
    assert verbose.returncode == 0 and "Loading pipeline components" in verbose.stderr, verbose.stderr
    zero_shot = run("personalize", "--image", ref, "--out", tmp_path / "c.safetensors", "--verbose")
    assert zero_shot.returncode == 0 and "Loading pipeline components" not in zero_shot.stderr  # no base loads
    assert Adapter.load(tmp_path / "a.safetensors").info.source != Adapter.load(tmp_path / "b.safetensors").info.source
