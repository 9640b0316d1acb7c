"""The report and benchmark scripts' machinery on the tiny base: every row and file comes out and reads back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from hyperdiff.evaluation import evaluate_base, write_report
from hyperdiff.models import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_base_report_covers_every_scene_and_writes_its_files(tmp_path):
    result, grid = evaluate_base(tiny_pipeline(seed=0), per_scene=1, steps=2, diversity_images=4)
    assert result["images"] == 48
    assert set(result["accuracy"]) == {"background", "hat", "expression"}
    assert all(0 <= v <= 1 for v in result["accuracy"].values())
    assert len(result["accuracy_per_value"]) == 6 + 2 + 4
    div = result["diversity"]
    assert div["same_identity"] > div["different_identity"] + 0.5  # real renders: the encoder's two levels
    paths = write_report(result, grid, tmp_path)
    assert json.loads(paths["json"].read_text())["images"] == 48
    assert "| background |" in paths["markdown"].read_text()
    with Image.open(paths["grid"]) as im:
        assert im.size == (8 * 96, 18 + 6 * 96)  # 6 backgrounds × (hat × 4 expressions)


def test_fidelity_benchmark_rows_and_table(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_fidelity
    import train_hypernet

    run = tmp_path / "hp"
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(run), "--max_train_steps", "1"]) == 0
    from hyperdiff.fidelity import FidelityConfig, run_fidelity, write_fidelity
    from hyperdiff.hypernet import HyperNetwork

    pipe = tiny_pipeline(seed=0)
    config = FidelityConfig(identities=2, scenes=(("red", False, "smiling"),), steps=2, finetune_steps=2, dreambooth_curve=(2, 3))
    result = run_fidelity(pipe, {"attention": HyperNetwork.from_pretrained(run)}, config, {"k1": HyperNetwork.from_pretrained(run)})
    rows = result["rows"]
    assert list(rows) == ["base", "dreambooth_lidb", "attention", "attention+ft", "k1"]  # ablations: zero-shot only
    assert rows["k1"]["id_similarity"] == rows["attention"]["id_similarity"]  # the same hypernet, the same images
    assert [c["steps"] for c in rows["dreambooth_lidb"]["curve"]] == [2, 3]
    assert rows["attention"]["adapter_values"] == 32 * 150 and rows["attention+ft"]["adapter_values"] > 32 * 150
    assert min(result["identities"]) >= 1_000_000  # evaluation seeds only
    md = write_fidelity(result, tmp_path / "out")["markdown"].read_text()
    assert [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ")][1:] == [f"| {r}" for r in rows]
    assert "DreamBooth-LiDB convergence" in md
    for bad in (["--hypernet", "bad"], ["--ablation", "=x"], ["--curve", "10,x"]):
        assert eval_fidelity.main(["--base", "hyperdiff:tiny", *bad, "--out", str(tmp_path)]) == 2
