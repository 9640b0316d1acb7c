"""The report and benchmark scripts' machinery on the tiny base: every row and file comes out and reads back."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError
from hyperdiff.models import tiny_pipeline
from hyperdiff.synthfaces.evaluation import evaluate_base, write_report

ROOT = Path(__file__).resolve().parent.parent


def test_base_report_covers_every_scene_and_writes_its_files(tmp_path):
    from hyperdiff.synthfaces.encoder import DEFAULT_ENCODER_DIR, IdentityEncoder

    judge = IdentityEncoder.from_pretrained(DEFAULT_ENCODER_DIR)  # the shipped encoder, loaded again
    result, grid = evaluate_base(tiny_pipeline(seed=0), per_scene=1, steps=2, diversity_images=4, judge=judge)
    assert result["images"] == 48
    assert set(result["accuracy"]) == {"background", "hat", "expression"}
    assert all(0 <= v <= 1 for v in result["accuracy"].values())
    assert len(result["accuracy_per_value"]) == 6 + 2 + 4
    # the judge reads the encoder's words (hat, expression) of the same images: the same encoder, the same counts
    assert result["accuracy_judge"] == {w: result["accuracy"][w] for w in ("hat", "expression")}
    assert result["accuracy_per_value_judge"] == {k: v for k, v in result["accuracy_per_value"].items()
                                                  if not k.startswith("background=")}
    div = result["diversity"]
    assert div["same_identity"] > div["different_identity"] + 0.5  # real renders: the encoder's two levels
    paths = write_report(result, grid, tmp_path)
    assert json.loads(paths["json"].read_text())["images"] == 48
    md = paths["markdown"].read_text()
    assert "| scene word | obeyed | judge | goal |" in md
    assert f"| expression | {result['accuracy']['expression']:.1%} | {result['accuracy_judge']['expression']:.1%} | ≥ 90 % |" in md
    assert f"| background | {result['accuracy']['background']:.1%} | – | ≥ 95 % |" in md
    with Image.open(paths["grid"]) as im:
        assert im.size == (8 * 96, 18 + 6 * 96)  # 6 backgrounds × (hat × 4 expressions)
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_base

    assert eval_base.main(["--judge", str(tmp_path / "none"), "--out", str(tmp_path / "bad")]) == 2  # before any work
    assert not (tmp_path / "bad").exists()


def test_fidelity_benchmark_rows_and_table(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_fidelity
    import train_hypernet

    run = tmp_path / "hp"
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(run), "--max_train_steps", "1"]) == 0
    from hyperdiff.synthfaces.fidelity import FidelityConfig, run_fidelity, write_fidelity
    from hyperdiff.hypernet import HyperNetwork

    pipe = tiny_pipeline(seed=0)
    judge = str(ROOT / "hyperdiff" / "assets" / "synthfaces" / "identity_encoder")  # the shipped encoder, loaded again
    config = FidelityConfig(identities=2, scenes=(("red", False, "smiling"),), steps=2, finetune_steps=2, dreambooth_curve=(2, 3),
                            dreambooth_plain=True, judge=judge)
    result = run_fidelity(pipe, {"attention": HyperNetwork.from_pretrained(run)}, config, {"k1": HyperNetwork.from_pretrained(run)})
    rows = result["rows"]
    assert list(rows) == ["base", "dreambooth_lidb", "dreambooth_lidb+plain", "attention", "attention+ft",
                          "attention+ft@one-strength", "attention+ft+plain", "attention+ft+plain@one-strength",
                          "k1"]  # ablations: zero-shot only; the embedded base's fine-tune recipe samples with a gain
    assert rows["k1"]["truth_similarity"] == rows["attention"]["truth_similarity"]  # the same hypernet, the same images
    assert [c["steps"] for c in rows["dreambooth_lidb"]["curve"]] == [2, 3]
    assert all(c["seconds"] > 0 and c["seconds_batched"] > 0 for c in rows["dreambooth_lidb"]["curve"])
    assert rows["dreambooth_lidb"]["seconds"] == rows["dreambooth_lidb"]["curve"][-1]["seconds"]  # alone, like the hypernet rows
    assert rows["attention"]["adapter_values"] == 32 * 150 and rows["attention+ft"]["adapter_values"] > 32 * 150
    assert min(result["identities"]) >= 1_000_000  # evaluation seeds only
    for row in rows.values():  # one image counts once for each word: the overall score is the mean of the words'
        assert list(row["scene_words"]) == ["background", "hat", "expression"]
        assert abs(sum(row["scene_words"].values()) / 3 - row["scene_fidelity"]) < 1e-12
        for key in ("truth_similarity", "reference_similarity", "copy_index"):  # the judge scored the same images
            assert row[f"{key}_judge"] == row[key]
        assert abs(row["copy_index"] - (row["reference_similarity"] - row["truth_similarity"])) < 1e-12
        # two identities: the row is their mean, and the standard error of a mean of two is half their difference
        for key in ("truth_similarity", "scene_fidelity"):
            a, b = (p[key] for p in row["per_identity"])
            assert abs((a + b) / 2 - row[key]) < 1e-12 and abs(abs(a - b) / 2 - row["standard_error"][key]) < 1e-12
    assert len({p["truth_similarity"] for p in rows["attention"]["per_identity"]}) == 2
    md = write_fidelity(result, tmp_path / "out")["markdown"].read_text()
    base_line = next(line for line in md.splitlines() if line.startswith("| base |"))
    assert md.splitlines()[0].startswith("| method | ID to the truth | judge | ID to the reference (copy) | copy index |"
                                         " scene fidelity |")
    se, cells = rows["base"]["standard_error"], base_line.split(" | ")
    assert cells[2] == f"{rows['base']['truth_similarity_judge']:.3f} ± {se['truth_similarity_judge']:.3f}"
    assert cells[3:5] == [f"{rows['base']['reference_similarity']:.3f}", f"{rows['base']['copy_index']:+.3f}"]
    assert cells[5] == f"{rows['base']['scene_fidelity']:.1%} ± {se['scene_fidelity']:.1%}"
    assert "± is the standard error of the mean over the 2 identities." in md
    assert cells[6] == " / ".join(f"{rows['base']['scene_words'][w]:.0%}" for w in ("background", "hat", "expression"))
    main_table = md.split("\n\n")[0].splitlines()
    assert [line.split(" | ")[0] for line in main_table[2:]] == [f"| {r}" for r in rows]
    curve = rows["dreambooth_lidb"]["curve"]  # one run, taken after 2 and 3 steps
    assert curve[0]["seconds"] < curve[1]["seconds"] and curve[0]["seconds_batched"] < curve[1]["seconds_batched"]
    assert rows["dreambooth_lidb+plain"]["truth_similarity"] != rows["dreambooth_lidb"]["truth_similarity"]  # another prompt
    assert [c["steps"] for c in rows["dreambooth_lidb+plain"]["curve"]] == [2, 3]
    assert sum(line.startswith("dreambooth_lidb+plain convergence") for line in md.splitlines()) == 1
    line = next(line for line in md.splitlines() if line.startswith("dreambooth_lidb convergence"))
    assert f"3 steps → {curve[1]['truth_similarity']:.3f} / {curve[1]['truth_similarity_judge']:.3f} / {curve[1]['scene_fidelity']:.1%}" in line
    for bad in (["--hypernet", "bad"], ["--ablation", "=x"], ["--curve", "10,x"], ["--curve", "10,0"], ["--seed", "-1"],
                ["--judge", str(tmp_path / "none"), "--curve", "1"], ["--reference", "a face on the moon"]):
        assert eval_fidelity.main(["--base", "hyperdiff:tiny", *bad, "--out", str(tmp_path)]) == 2


def test_fidelity_rows_of_a_low_noise_hypernet_and_without_dreambooth(tmp_path):
    """A hypernet whose adapters carry a low-noise gain also gets its zero-shot row at one strength: the images of
    the same hypernet without the gain; so does a fine-tune row whose recipe carries one (the recipe's schedule on the
    learned rank components, the hypernet's on the start's; with `start_keeps_schedule=False` the recipe's on all, and
    both hypernets' fine-tunes score alike), and at one strength it scores as a one-strength recipe's fine-tune. `--no-dreambooth` leaves the slow rows out."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_fidelity
    from test_hypernet import make_hypernet, randomise_b_head

    from hyperdiff.synthfaces.fidelity import FidelityConfig, run_fidelity
    from hyperdiff.hypernet import HyperNetwork
    from hyperdiff.core.layers import LayerTable
    from hyperdiff.personalize.pipeline import SYNTHFACES_FAST_FINETUNE

    pipe = tiny_pipeline(seed=0)
    folder = tmp_path / "late"
    hp = randomise_b_head(make_hypernet(LayerTable.from_unet(pipe.unet), seed=0), std=0.1)
    hp.save_pretrained(tmp_path / "plain")
    hp.set_gain(1.0, low_noise=LowNoiseGain(3.0, 1000))  # every step: ΔW × 3
    hp.save_pretrained(folder)
    recipe = replace(SYNTHFACES_FAST_FINETUNE, identity_weight=0.0, low_noise=LowNoiseGain(4.0, 1000))
    config = FidelityConfig(identities=1, scenes=(("red", False, "smiling"),), steps=2, finetune_steps=1,
                            dreambooth_rows=False, finetune=recipe)
    plain = HyperNetwork.from_pretrained(tmp_path / "plain")
    rows = run_fidelity(pipe, {"late": hp, "plain": plain}, config)["rows"]
    tuned = [f"{name}+ft{caption}{one}" for name in ("late", "plain") for caption in ("", "+plain")
             for one in ("", "@one-strength")]
    assert list(rows) == ["base", "late", "late@one-strength", *tuned[:4], "plain", *tuned[4:]]
    assert rows["late@one-strength"]["truth_similarity"] == rows["plain"]["truth_similarity"] != rows["late"]["truth_similarity"]
    for label in ("+ft", "+ft+plain"):  # ×4 on both learned parts; the start keeps its hypernet's: ×3 / one strength
        assert rows[f"late{label}"]["truth_similarity"] != rows[f"plain{label}"]["truth_similarity"]
        assert rows[f"late{label}@one-strength"]["truth_similarity"] == rows[f"plain{label}@one-strength"]["truth_similarity"]
        assert rows[f"late{label}"]["truth_similarity"] != rows[f"late{label}@one-strength"]["truth_similarity"]
    whole = replace(config, finetune=replace(recipe, start_keeps_schedule=False))  # the recipe's ×4 on every part
    same = run_fidelity(pipe, {"late": hp, "plain": plain}, whole)["rows"]
    assert same["late+ft"]["truth_similarity"] == same["plain+ft"]["truth_similarity"] != rows["plain+ft"]["truth_similarity"]
    at_one = replace(config, finetune=replace(recipe, low_noise=LowNoiseGain()))
    one = run_fidelity(pipe, {"plain": plain}, at_one)["rows"]
    assert list(one) == ["base", "plain", "plain+ft", "plain+ft+plain"]
    assert one["plain+ft"]["truth_similarity"] == rows["plain+ft@one-strength"]["truth_similarity"]
    assert eval_fidelity.main(["--base", "hyperdiff:tiny", "--hypernet", f"late={folder}", "--no-dreambooth", "--identities",
                               "1", "--steps", "2", "--finetune-steps", "1", "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| late@one-strength |" in md and "dreambooth" not in md.replace("--no-dreambooth", "")
    assert "±" not in md and rows["late"]["standard_error"]["truth_similarity"] is None  # one identity: no spread to show
    # another seed replicates the table on the same identity: other noise, so other images and scores
    assert eval_fidelity.main(["--base", "hyperdiff:tiny", "--hypernet", f"late={folder}", "--no-dreambooth", "--identities",
                               "1", "--steps", "2", "--finetune-steps", "1", "--seed", "1", "--out", str(tmp_path / "s1")]) == 0
    runs = [json.loads((tmp_path / out / "fidelity.json").read_text()) for out in ("out", "s1")]
    assert [r["config"]["seed"] for r in runs] == [0, 1] and runs[0]["identities"] == runs[1]["identities"]
    for row in ("base", "late", "late+ft"):
        assert runs[0]["rows"][row]["truth_similarity"] != runs[1]["rows"][row]["truth_similarity"]


def test_gain_calibration_picks_the_best_gain_within_the_scene_tolerance(tmp_path, monkeypatch):
    """The rule, on a scorer that reads the gain back from the adapters it is given (their ΔW against the
    uncalibrated prediction): ID similarity rises up to gain 3, scene fidelity falls from gain 2.5 on."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_hypernet

    import hyperdiff.synthfaces.calibrate as calibrate
    import hyperdiff.synthfaces.fidelity as fidelity
    from hyperdiff import synthfaces
    from hyperdiff.hypernet import HyperNetwork

    run = tmp_path / "hp"
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(run), "--max_train_steps", "1"]) == 0
    hp = HyperNetwork.from_pretrained(run)
    plain = {}
    base = {"scene_fidelity": 0.9}

    def score(pipe, adapters, refs, config, low_noise=None):
        if adapters[0] is None:  # the base model's row
            return {"truth_similarity": 0.0, **base}
        name = adapters[0].layer_names[0]
        if not plain:
            plain["delta"] = adapters[0].delta_weight(name)  # gain 1 comes first
        gain = float((adapters[0].delta_weight(name) * plain["delta"]).sum() / plain["delta"].square().sum())
        late = 0.0 if low_noise is None else (low_noise.gain - 1) * low_noise.below / 1000  # more identity, no scene cost
        return {"truth_similarity": min(gain, 3.0) / 10 + late,
                "scene_fidelity": 0.9 - (0.05 if gain > 2.2 else 0.01 * (gain - 1)) - (0.1 if late > 0.2 else 0)}

    monkeypatch.setattr(calibrate, "_score", score)
    result = calibrate.calibrate_gain(tiny_pipeline(seed=0), hp, [3, 2, 2.5], fidelity.FidelityConfig(identities=2))
    assert [r["gain"] for r in result["rows"]] == [1.0, 2.0, 2.5, 3.0]  # 1 is always scored, as the reference
    assert abs(result["rows"][2]["truth_similarity"] - 0.25) < 1e-4  # the adapters really were scaled
    assert result["gain"] == 2.0  # 2.5 and 3 lose 5 points of scene fidelity: more than the tolerance
    assert result["identities"] == list(synthfaces.VAL_SEEDS[:2])  # validation identities, never evaluation ones
    assert calibrate.calibrate_gain(tiny_pipeline(seed=0), hp, [3], fidelity.FidelityConfig(identities=2), 0.1)["gain"] == 3.0
    base["scene_fidelity"] = 0.86  # the base model itself obeys fewer scene words: 0.85 keeps its editability
    result = calibrate.calibrate_gain(tiny_pipeline(seed=0), hp, [3, 2, 2.5], fidelity.FidelityConfig(identities=2))
    assert result["gain"] == 3.0 and result["base"]["scene_fidelity"] == 0.86
    base["scene_fidelity"] = 0.95  # above gain 1's: gain 1 stays the reference
    assert calibrate.calibrate_gain(tiny_pipeline(seed=0), hp, [3, 2, 2.5], fidelity.FidelityConfig(identities=2))["gain"] == 2.0
    # low-noise candidates: each gain is scored at one strength and with each; the same rule picks among all rows
    lows = [LowNoiseGain(1.5, 300), LowNoiseGain(3.0, 300), LowNoiseGain(1.0, 300)]  # the last is no candidate
    result = calibrate.calibrate_gain(tiny_pipeline(seed=0), hp, [2], fidelity.FidelityConfig(identities=2), low_noise=lows)
    assert [(r["gain"], r["low_noise"]["gain"]) for r in result["rows"]] == [(g, lo) for g in (1.0, 2.0) for lo in (1, 1.5, 3)]
    assert abs(result["rows"][4]["truth_similarity"] - (0.2 + 0.15)) < 1e-4  # gain 2 and ×1.5 below 300 reached the scorer
    assert result["gain"] == 2.0 and result["low_noise"] == {"gain": 1.5, "below": 300}  # ×3 loses 10 scene points


def test_calibrate_script_writes_a_hypernet_whose_deltas_carry_the_gain(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate_hypernet
    import train_hypernet

    from hyperdiff import synthfaces
    from hyperdiff.hypernet import HyperNetwork

    run, out = tmp_path / "hp", tmp_path / "calibrated"
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(run), "--max_train_steps", "2"]) == 0
    for bad in (["--gains", "1,x"], ["--gains", "0,2"], ["--identities", "0"], ["--tolerance", "-1"],
                ["--low-noise-gains", "2,x"], ["--low-noise-gains", "-1"], ["--low-noise-gains", "2", "--low-noise-below", "2000"]):
        assert calibrate_hypernet.main(["--base", "hyperdiff:tiny", "--hypernet", str(run), "--out", str(out), "--steps", "2", *bad]) == 2, bad
    assert not out.exists()  # a refused call writes nothing
    assert calibrate_hypernet.main(["--base", "hyperdiff:tiny", "--hypernet", str(run), "--out", str(out), "--gains", "2",
                                    "--identities", "1", "--steps", "2", "--tolerance", "1", "--dtype", "float32",
                                    "--low-noise-gains", "3", "--low-noise-below", "500"]) == 0
    saved = json.loads((out / "config.json").read_text())
    gain, low = saved["info"]["calibration"]["gain"], saved["info"]["calibration"]["low_noise"]
    assert gain in (1.0, 2.0) and [r["gain"] for r in saved["info"]["calibration"]["rows"]] == [1.0, 1.0, 2.0, 2.0]
    assert low in ({"gain": 1.0, "below": 0}, {"gain": 3.0, "below": 500}) and saved["config"]["low_noise"] == low
    assert saved["config"]["alpha"] == gain * json.loads((run / "config.json").read_text())["config"]["alpha"]
    ref = synthfaces.render(synthfaces.Identity.from_seed(1_000_000), synthfaces.Scene("gray", False, "neutral"), 64)
    before = HyperNetwork.from_pretrained(run).predict([ref])
    doubled = HyperNetwork.from_pretrained(run)
    doubled.set_gain(2.5)
    with pytest.raises(HyperdiffError, match="`gain` must be a positive number, got 0"):
        doubled.set_gain(0)
    assert HyperNetwork.from_pretrained(out).predict([ref]).info.low_noise == LowNoiseGain(**low)  # adapters carry it
    for hp, g in ((HyperNetwork.from_pretrained(out), gain), (doubled, 2.5)):
        after = hp.predict([ref])
        for name in before.layer_names:
            torch.testing.assert_close(after.delta_weight(name), g * before.delta_weight(name))
    assert any(before.delta_weight(name).abs().max() > 0 for name in before.layer_names)  # a real check, not 0 = 0


def test_finetune_calibration_picks_a_schedule_that_both_fine_tunes_pass(tmp_path, monkeypatch):
    """The rule for the fast fine-tune's schedule, on a scorer that reads back what it is given (the caption from the
    adapters' record, the schedule passed to it): a candidate must keep both fine-tunes, told the caption read from
    the reference and not,
    within the tolerance of their own floors; the one with the most identity over both wins."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_hypernet

    import hyperdiff.synthfaces.calibrate as calibrate
    import hyperdiff.synthfaces.fidelity as fidelity
    from hyperdiff import synthfaces
    from hyperdiff.hypernet import HyperNetwork
    from hyperdiff.personalize.pipeline import FAST_FINETUNE

    run = tmp_path / "hp"
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(run), "--max_train_steps", "1"]) == 0
    hp = HyperNetwork.from_pretrained(run)
    seen = []

    def score(pipe, adapters, refs, config, low_noise=None):
        if adapters[0] is None:  # the base model's row
            return {"truth_similarity": 0.0, "scene_fidelity": 0.9}
        seen.append(adapters[0].rank)  # fine-tuned: the prediction's rank + the recipe's
        # one strength throughout is passed as the call's schedule; a candidate is the learned part's own, and the
        # start's rank keeps the hypernet's schedule
        start = hp.predict([Image.new("RGB", (32, 32))])
        assert adapters[0].info.rank_schedules == ((start.rank, hp.config.low_noise),)
        low_noise = low_noise or adapters[0].info.low_noise
        captioned = "caption (read from the references)=" in adapters[0].info.source
        late = (low_noise.gain - 1) * low_noise.below / 1000
        source = adapters[0].info.source  # the recipe the adapters were trained with: identity and scene cost
        gain, cost = (0.2, 0.01) if " lr=0.05" in source else (0.3, 0.1) if " lr=0.07" in source else (0.0, 0.0)
        return {"truth_similarity": 0.5 + 0.1 * captioned + late + gain,
                "scene_fidelity": (0.88 - 0.15 * late - cost) if captioned else (0.82 - 0.3 * late)}

    monkeypatch.setattr(calibrate, "_score", score)
    config = fidelity.FidelityConfig(identities=2, finetune_steps=1, finetune=replace(FAST_FINETUNE, steps=1))
    lows = [LowNoiseGain(1.25, 200), LowNoiseGain(1.5, 200), LowNoiseGain(3.0, 500), LowNoiseGain(1.0, 300)]
    result = calibrate.calibrate_finetune(tiny_pipeline(seed=0), hp, lows, config)
    assert [(r["caption"], r["low_noise"]["gain"]) for r in result["rows"]] == [
        (c, g) for c in (True, False) for g in (1.0, 1.25, 1.5, 3.0)]  # one strength first; gain 1 is no candidate
    assert len(seen) == 8 and set(seen) == {hp.predict([Image.new("RGB", (32, 32))]).rank + FAST_FINETUNE.rank}
    assert result["identities"] == list(synthfaces.VAL_SEEDS[:2])
    # × 1.5 below 200 keeps the captioned fine-tune (0.865 ≥ 0.86) but not the plain one (0.79 < 0.80)
    assert result["low_noise"] == {"gain": 1.25, "below": 200}
    result = calibrate.calibrate_finetune(tiny_pipeline(seed=0), hp, lows, config, tolerance=0.05)
    assert result["low_noise"] == {"gain": 1.5, "below": 200}  # now both pass; × 3 below 500 still fails both
    assert calibrate.calibrate_finetune(tiny_pipeline(seed=0), hp, lows[2:], config)["low_noise"] == {"gain": 1.0, "below": 0}
    # recipes: each is trained and scored with every schedule, against the floor of the first (the recipe as it is)
    # at one strength: lr 0.05 gains 0.2 of identity for 0.01 of scene words and wins; lr 0.07 gains 0.3 but costs
    # 0.1, below that floor (its own one-strength score would have let it through)
    fast, faster = replace(config.finetune, learning_rate=0.05), replace(config.finetune, learning_rate=0.07)
    result = calibrate.calibrate_finetune(tiny_pipeline(seed=0), hp, lows[:2], config, tolerance=0.05,
                                         recipes=[config.finetune, fast, faster])
    assert result["recipes"] == [{}, {"learning_rate": 0.05}, {"learning_rate": 0.07}]
    assert result["recipe"] == {"learning_rate": 0.05} and result["low_noise"] == {"gain": 1.5, "below": 200}
    assert [(r["recipe"], r["caption"], r["low_noise"]["gain"]) for r in result["rows"]] == [
        (j, c, g) for j in (0, 1, 2) for c in (True, False) for g in (1.0, 1.25, 1.5)]
    assert max(r["truth_similarity"] for r in result["rows"] if r["recipe"] == 2) > 0.8  # the best, refused
    seen.clear()  # only told the caption (`plain` False): one set of adapters, scored once per schedule
    result = calibrate.calibrate_finetune(tiny_pipeline(seed=0), hp, lows[:2], config, recipes=[fast], plain=False)
    assert [r["caption"] for r in result["rows"]] == [True] * 3 and len(seen) == 3
    assert result["low_noise"] == {"gain": 1.5, "below": 200}  # the plain fine-tune no longer holds it back


def test_calibrate_finetune_script_writes_its_scores_and_choice(tmp_path, capsys):
    """On the tiny base: every bad flag is one error line and exit 2 with nothing written; a run writes the JSON
    with both fine-tunes' rows, the choice among the candidates, and the recipe it calibrated."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate_finetune
    import train_hypernet

    run, out = tmp_path / "hp", tmp_path / "cal" / "schedule.json"
    assert train_hypernet.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(run), "--max_train_steps", "1"]) == 0
    common = ["--base", "hyperdiff:tiny", "--hypernet", str(run), "--out", str(out), "--steps", "2", "--identities", "1",
              "--finetune-steps", "1"]
    capsys.readouterr()
    for bad, flag in ((["--low-noise-gains", "2,x"], "--low-noise-gains"), (["--low-noise-gains", "-1"], "low_noise.gain"),
                      (["--low-noise-gains", "2", "--low-noise-below", "2000"], "low_noise.below"),
                      (["--low-noise-gains", "2", "--identities", "0"], "identities"),
                      (["--low-noise-gains", "2", "--finetune-steps", "0"], "finetune_steps"),
                      (["--low-noise-gains", "2", "--tolerance", "-1"], "tolerance")):
        assert calibrate_finetune.main([*common, *bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("calibrate_finetune: error:") and flag in err[0], (bad, err)
    no_hypernet = [a for a in common if a != str(run) and a != "--hypernet"]
    assert calibrate_finetune.main([*no_hypernet, "--low-noise-gains", "2"]) == 2
    assert not out.exists()
    capsys.readouterr()
    for bad, flag in ((["--recipe", "learning_rate=-1"], "learning_rate"), (["--recipe", "nope=1"], "nope"),
                      (["--recipe", " "], "--recipe")):
        assert calibrate_finetune.main([*common, *bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], (bad, err)
    assert not out.exists()
    assert calibrate_finetune.main([*common, "--low-noise-gains", "3", "--low-noise-below", "500", "--tolerance", "1",
                                    "--recipe", "learning_rate=0.02 rank=2"]) == 0
    saved = json.loads(out.read_text())
    chosen = "one strength" if saved["low_noise"]["gain"] == 1.0 else "×3 below timestep 500"
    recipe = "(the recipe as it is)" if saved["recipe"] == {} else "(learning_rate=0.02 rank=2)"
    assert f"chose {recipe}, {chosen}; wrote {out}" in capsys.readouterr().out
    assert saved["recipes"] == [{}, {"learning_rate": 0.02, "rank": 2}]
    assert [(r["recipe"], r["caption"], r["low_noise"]) for r in saved["rows"]] == [
        (j, c, lo) for j in (0, 1) for c in (True, False) for lo in ({"gain": 1.0, "below": 0}, {"gain": 3.0, "below": 500})]
    assert saved["low_noise"] in ({"gain": 1.0, "below": 0}, {"gain": 3.0, "below": 500})
    assert saved["config"]["finetune_steps"] == 1 and saved["config"]["finetune"]["rank"] == 4
    assert saved["rows"][0]["truth_similarity"] != saved["rows"][2]["truth_similarity"]  # the caption changed the adapters


def test_fidelity_scores_identity_against_the_true_render_and_counts_copying():
    """Each generation is scored against the world's own render of that identity in the prompted scene, recomputed
    here through the public calls (generate, render, the encoder); similarity to the reference is the copy column,
    and where the reference *is* the prompted scene, truth and reference are one image: the copy index is 0."""
    from hyperdiff import synthfaces
    from hyperdiff.synthfaces.fidelity import REFERENCE_CONDITIONS, FidelityConfig, reference_scene, run_fidelity
    from hyperdiff.synthfaces.detectors import default_encoder
    from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

    pipe = tiny_pipeline(seed=0)
    scenes = (("red", False, "smiling"), ("blue", True, "sad"))
    config = FidelityConfig(identities=2, scenes=scenes, steps=2, dreambooth_rows=False, seed=5)
    result = run_fidelity(pipe, {}, config)
    base = result["rows"]["base"]
    hdb, enc = HyperDreamBoothPipeline(pipe, None), default_encoder()
    truth, copy = [], []
    for i, seed in enumerate(result["identities"]):
        identity, ref_scene = synthfaces.Identity.from_seed(seed), reference_scene(seed, config)
        reference = synthfaces.render(identity, ref_scene, 32)
        assert result["references"][i] == synthfaces.caption(ref_scene)
        for k, t in enumerate(scenes):
            scene = synthfaces.Scene(*t)
            image = hdb.generate(synthfaces.caption(scene, "sks"), None, steps=2, seed=5 + 1000 * i + k)[0]
            truth.append(float(enc.similarity([image], [synthfaces.render(identity, scene, 32)])[0]))
            copy.append(float(enc.similarity([image], [reference])[0]))
    assert abs(base["truth_similarity"] - sum(truth) / 4) < 1e-6
    assert abs(base["reference_similarity"] - sum(copy) / 4) < 1e-6
    assert abs(base["copy_index"] - (sum(copy) - sum(truth)) / 4) < 1e-6 and abs(base["copy_index"]) > 1e-4
    # per reference condition: each identity counts under the conditions its reference meets, with its own scores
    for condition, meets in REFERENCE_CONDITIONS.items():
        chosen = [i for i, s in enumerate(result["identities"]) if meets(reference_scene(s, config))]
        got = base["by_reference"].get(condition)
        assert (got is None) == (not chosen), condition
        if chosen:
            assert got["identities"] == len(chosen)
            want = sum(base["per_identity"][i]["truth_similarity"] for i in chosen) / len(chosen)
            assert abs(got["truth_similarity"] - want) < 1e-12
    # the reference in the one prompted scene: the truth is the reference, nothing to copy beyond it
    same = run_fidelity(pipe, {}, replace(config, scenes=scenes[:1], reference_scene=scenes[0]))["rows"]["base"]
    assert same["truth_similarity"] == same["reference_similarity"] and same["copy_index"] == 0.0


def test_references_are_drawn_in_varied_scenes_from_the_identity_seed():
    """Random references: one scene per identity, from its seed alone (the same for every run seed), and varied —
    a user's photo has any background, hat and expression. A fixed scene is checked like any scene."""
    from hyperdiff import synthfaces
    from hyperdiff.synthfaces.fidelity import FidelityConfig, reference_scene

    seeds = list(synthfaces.eval_seeds(16))
    drawn = [reference_scene(s, FidelityConfig()) for s in seeds]
    assert drawn == [reference_scene(s, FidelityConfig(seed=7)) for s in seeds]
    assert len({s.background for s in drawn}) >= 4 and {s.hat for s in drawn} == {True, False}
    assert len({s.expression for s in drawn}) >= 3
    assert reference_scene(seeds[0], FidelityConfig(reference_scene=("green", False, "neutral"))) == synthfaces.Scene("green")
    for bad in (("mauve", False, "neutral"), "gray", 3):
        with pytest.raises(HyperdiffError, match="`reference_scene` must be 'random' or"):
            FidelityConfig(reference_scene=bad)
