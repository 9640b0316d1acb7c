"""The shipped SynthFaces defaults as a new user meets them, scored against the truth.

Four held-out identities (evaluation seeds, not the fidelity table's nor the demo's), each photographed in a scene of
its own on a coloured background (one with a hat, three expressions), personalized with `hyperdiff personalize` and
nothing but the CLI's defaults — zero-shot, and `--finetune-steps 40` with no caption typed (the embedded base reads
it from the reference) — then generated in two new scenes with `generate`'s defaults (25 steps, guidance 4, seed 0,
each adapter's own schedule). Identity is the encoder's cosine to the *true render* of that identity in the prompted
scene, never to the reference, under the shipped encoder (which the hypernet and the fine-tune train against) and
the judge (which neither saw). Measured on the shipped weights on 2026-12-07 (shipped encoder / judge, means over
the four): base 0.072 / 0.045, zero-shot 0.686 / 0.582, fine-tuned 0.687 / 0.639; so zero-shot − base 0.613 / 0.538
(4 of 4 identities) and fine-tune − zero-shot +0.001 / +0.056 (3 or more of 4 gaining). Asserted: zero-shot − base
≥ 0.3 for every identity's mean, and the fine-tune not below zero-shot on the mean (margin 0: under the shipped
encoder these four identities read only +0.001; the 16-identity benchmark reads +0.049 / +0.033 on two seeds'
mean, docs/fidelity.md) with at least 3 of 4 identities gaining.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hyperdiff import Adapter
from hyperdiff import synthfaces
from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET, HyperDreamBoothPipeline
from hyperdiff.synthfaces.detectors import default_encoder
from hyperdiff.synthfaces.encoder import JUDGE_ENCODER_DIR, IdentityEncoder
from hyperdiff.synthfaces.fidelity import DEFAULT_SCENES

SEEDS = list(synthfaces.eval_seeds(108))[104:]  # held out; not the fidelity table's, the demo's or the other test's
REFERENCES = [synthfaces.Scene("green", False, "neutral"), synthfaces.Scene("yellow", True, "sad"),
              synthfaces.Scene("purple", False, "smiling"), synthfaces.Scene("red", True, "surprised")]
SCENES = [synthfaces.Scene(*t) for t in DEFAULT_SCENES[:2]]  # red, smiling; blue, hat, neutral
ZS_MARGIN, FT_MARGIN = 0.3, 0.0  # about half the measured 0.613 / 0.538; the fine-tune's measured +0.001 / +0.056


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread, like this process (conftest.py)
    res = subprocess.run([sys.executable, "-m", "hyperdiff.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{kind: [image per (identity, scene)]} for "base", "zero-shot" and "fine-tuned", and the true renders."""
    assert EMBEDDED_HYPERNET.is_dir(), "no hypernet is shipped"
    tmp = tmp_path_factory.mktemp("truth")
    hdb = HyperDreamBoothPipeline.from_pretrained(load_hypernet=False)
    out = {"base": [], "zero-shot": [], "fine-tuned": [], "truth": []}
    for i, (seed, scene) in enumerate(zip(SEEDS, REFERENCES)):
        identity = synthfaces.Identity.from_seed(seed)
        ref = tmp / f"ref{i}.png"
        synthfaces.render(identity, scene, 64).save(ref)
        files = {"zero-shot": tmp / f"zs{i}.safetensors", "fine-tuned": tmp / f"ft{i}.safetensors"}
        cli("personalize", "--image", ref, "--out", files["zero-shot"])
        res = cli("personalize", "--image", ref, "--out", files["fine-tuned"], "--finetune-steps", "40")
        told = synthfaces.caption(scene, "sks")
        assert f"fine-tuned on caption (read from the references)='{told}'" in res.stdout  # the reference's own words
        adapters = {kind: Adapter.load(path) for kind, path in files.items()}
        for target in SCENES:
            prompt = synthfaces.caption(target, "sks")
            out["base"] += hdb.generate(prompt, None)
            for kind, adapter in adapters.items():  # `generate`'s defaults, as the CLI calls it
                out[kind] += hdb.generate(prompt, adapter)
            out["truth"].append(synthfaces.render(identity, target, 64))
    return out


@pytest.fixture(scope="module", params=["shipped", "judge"])
def truth(request, made):
    """{kind: truth similarity per identity (mean over the scenes)} under one encoder."""
    enc = default_encoder() if request.param == "shipped" else IdentityEncoder.from_pretrained(JUDGE_ENCODER_DIR)
    n = len(SCENES)
    per_image = {kind: enc.similarity(images, made["truth"]) for kind, images in made.items() if kind != "truth"}
    scores = {kind: [float(v[i:i + n].mean()) for i in range(0, len(v), n)] for kind, v in per_image.items()}
    return scores


def _gain(scores: dict, better: str, worse: str) -> tuple[float, int]:
    pairs = list(zip(scores[better], scores[worse]))
    return sum(b - w for b, w in pairs) / len(pairs), sum(b > w for b, w in pairs)


def test_zero_shot_brings_the_true_identity_that_the_base_model_lacks(truth):
    gain, wins = _gain(truth, "zero-shot", "base")
    assert gain >= ZS_MARGIN and wins == len(SEEDS), (gain, truth)


def test_the_default_fast_fine_tune_moves_toward_the_truth_beyond_zero_shot(truth):
    """No caption typed: the fine-tune's words come from the reference, so its coloured background, hat and
    expression stay out of the token and the 40 steps add identity over the prediction they start from."""
    gain, wins = _gain(truth, "fine-tuned", "zero-shot")
    assert gain >= FT_MARGIN and wins >= 3, (gain, truth)

