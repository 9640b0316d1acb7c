"""The benchmark scripts check their flags before building any model: a bad one exits 2 with one error line that
names it, and no JSON is written. (Their JSON goes through `atomic_path`, tested with the CLI's outputs.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script, flags, named", [
    ("bench_personalize.py", ["--repeats", "0"], "--repeats: must be a positive integer, got '0'"),
    ("bench_personalize.py", ["--finetune_steps", "-3"], "--finetune_steps: must be a positive integer"),
    ("bench_personalize.py", ["--vision", "small"], "--vision: invalid choice: 'small'"),
    ("bench_personalize.py", ["--device", "tpu"], "`device` must be cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("bench_core.py", ["--latent", "x"], "--latent: must be a positive integer, got 'x'"),
    ("bench_core.py", ["--dtype", "float8"], "`dtype` must be one of"),
    ("bench_core.py", ["--out", str(SCRIPTS)], f"`--out` '{SCRIPTS}' is a folder, expected a file path"),
    ("bench_core.py", ["--batches", "2,0"], "--batches: must be positive integers separated by commas, got '2,0'"),
    ("bench_cli.py", ["--repeats", "0"], "--repeats: must be a positive integer, got '0'"),
    ("bench_cli.py", ["--finetune_steps", "-1"], "--finetune_steps: must be 0 or a positive integer, got -1"),
])
def test_a_bad_flag_is_one_usage_error_before_any_work(tmp_path, script, flags, named):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(SCRIPTS / script), "--out", str(out), *flags], capture_output=True,
                         text=True, timeout=120)  # a later --out wins
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: ") and named in errors[0], res.stderr
    assert "Traceback" not in res.stderr and not res.stdout and not out.exists()
