"""The shipped SynthFaces hypernet, zero-shot and fast fine-tuned, on held-out identities (evaluation seeds, never
trained on).

Four identities × two scenes, 25 steps, guidance 4, the same seeds with and without the adapter. The identity-encoder
similarity to the reference is measured for each image, by the shipped encoder (which the hypernet and the embedded
base's fast fine-tune train against: `identity_weight`) and by the judge (another seed's encoder, which neither
saw). Measured on base version 4.1 with H's low-noise gain (× 1.5 below timestep 300), shipped encoder / judge:
personalized images are 0.560 / 0.489 closer to their reference than the base model's (4 of 4 identities closer
under both; at one strength 0.511 / 0.430), and 0.401 / 0.320 closer to their own reference than to the other three
(fine-tuned: 0.517 / 0.467). The 40-step fast fine-tune, told the reference's caption, at one strength added
0.150 / 0.198 over zero-shot at one strength, the prediction it starts from (4 of 4 identities gained under both),
and each sampled as it samples by default (the fine-tune's parts with their own schedules), the fine-tune read
0.117 / 0.142 over zero-shot (4 of 4). The asserted margins are about half of these or less, and stay so in all six
of the benchmark's scenes (0.548 / 0.446, 0.424 / 0.346, 0.220 / 0.237 and 0.146 / 0.170, in the same order).
What the recipe's schedule adds over the same fine-tuned adapter at one strength is not asserted here: on these
four identities it reads +0.020 / +0.006 in these two scenes and −0.025 / −0.030 in all six (one identity of four
gaining), while on the 16 held-out identities of the fidelity benchmark it adds 0.041 / 0.021 and 2.4 points of
scene words; four identities are too few to tell its sign, so the benchmark reports it (docs/finetune.md, "The
fast fine-tune").
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from hyperdiff import Adapter
from hyperdiff import synthfaces
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.personalize.finetune import finetune
from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET, SYNTHFACES_FAST_FINETUNE, HyperDreamBoothPipeline
from hyperdiff.synthfaces.detectors import default_encoder, reference_caption
from hyperdiff.synthfaces.encoder import JUDGE_ENCODER_DIR, IdentityEncoder
from hyperdiff.synthfaces.fidelity import DEFAULT_SCENES

SEEDS = list(synthfaces.eval_seeds(104))[100:]  # held out, and not the fidelity table's or the demo's identities
SCENES = [synthfaces.Scene(*t) for t in DEFAULT_SCENES[:2]]
REFERENCE = synthfaces.Scene("gray", False, "neutral")  # the scene these figures were measured from
CAPTION = synthfaces.caption(REFERENCE, "sks")  # what the reference shows, for the fine-tune


@pytest.fixture(scope="module")
def hdb():
    assert EMBEDDED_HYPERNET.is_dir(), "no hypernet is shipped"
    return HyperDreamBoothPipeline.from_pretrained()


@pytest.fixture(scope="module")
def images(hdb):
    """(references, {kind: images}): one image per (identity, scene), the same seeds. Kinds: "zero-shot" and
    "fine-tuned" (the pipeline's default for the embedded base, 40 steps, told the reference's caption), each sampled
    as it samples by default (zero-shot with the hypernet's low-noise gain, the fine-tune's start with the same and its
    learned part with the recipe's); "one-strength" and "fine-tuned at one strength", the same adapters without them;
    "base"."""
    refs = [synthfaces.render(synthfaces.Identity.from_seed(s), REFERENCE, 64) for s in SEEDS]
    made = {"zero-shot": [], "one-strength": [], "fine-tuned": [], "fine-tuned at one strength": [], "base": []}
    for i, ref in enumerate(refs):
        zero = hdb.personalize([ref], seed=0)
        tuned = hdb.personalize([ref], finetune_steps=40, seed=0, caption=CAPTION)
        assert tuned.info.low_noise == SYNTHFACES_FAST_FINETUNE.low_noise != zero.info.low_noise, tuned.info
        assert tuned.info.rank_schedules == ((zero.rank, zero.info.low_noise),), tuned.info
        adapters = {"zero-shot": (zero, None), "one-strength": (zero, LowNoiseGain()), "base": (None, None),
                    "fine-tuned": (tuned, None), "fine-tuned at one strength": (tuned, LowNoiseGain())}
        for k, scene in enumerate(SCENES):
            prompt = synthfaces.caption(scene, "sks")
            for kind, (adapter, low_noise) in adapters.items():
                made[kind].append(hdb.generate(prompt, adapter, seed=1000 * i + k, low_noise=low_noise)[0])
    return refs, made


@pytest.fixture(scope="module", params=["shipped", "judge"])
def sims(request, images):
    """{kind: similarity matrix (identity generated, reference)}, each a mean over scenes, under the shipped identity
    encoder (the hypernet and the fine-tune train against it) and under the judge (which neither saw)."""
    enc = default_encoder() if request.param == "shipped" else IdentityEncoder.from_pretrained(JUDGE_ENCODER_DIR)
    refs, made = images
    n, scenes = len(refs), len(SCENES)
    return {kind: enc.similarity(generated, refs, matrix=True).view(n, scenes, n).mean(1) for kind, generated in made.items()}


def test_personalized_images_are_closer_to_their_reference_than_the_base_models(sims):
    own, base = sims["zero-shot"].diagonal(), sims["base"].diagonal()
    assert (own - base).mean() >= 0.25, (own, base)
    assert int((own > base).sum()) >= 3, (own, base)  # not one identity carrying the mean


def test_the_prediction_is_specific_to_the_identity(sims):
    """An adapter brings its own reference closer than the other identities' references: the hypernet does not just
    learn one delta for every face."""
    personalized = sims["zero-shot"]
    own = personalized.diagonal()
    others = (personalized.sum(1) - own) / (len(SEEDS) - 1)
    assert (own - others).mean() >= 0.15, personalized


def test_the_fast_fine_tune_brings_the_identity_closer_than_zero_shot(sims):
    """The embedded base's fast fine-tune (with the identity encoder's term) adds identity to the prediction it
    starts from (both at one strength), for most identities and also as the judge reads it; sampled as each samples
    by default (with their own schedules) it adds identity over zero-shot too; and it keeps the images specific to
    their own reference."""
    tuned, one = sims["fine-tuned"], sims["fine-tuned at one strength"]
    gain = one.diagonal() - sims["one-strength"].diagonal()  # both sampled at one strength
    assert gain.mean() >= 0.06, (one, sims["one-strength"])
    assert int((gain > 0).sum()) >= 3, (one, sims["one-strength"])
    assert (tuned.diagonal() - sims["zero-shot"].diagonal()).mean() >= 0.05, (tuned, sims["zero-shot"])
    others = (tuned.sum(1) - tuned.diagonal()) / (len(SEEDS) - 1)
    assert (tuned.diagonal() - others).mean() >= 0.25, tuned


def test_the_cli_fine_tunes_on_the_embedded_base_with_the_identity_term(hdb, tmp_path):
    """`hyperdiff personalize --finetune-steps` on the embedded default writes the adapter of the engine's
    `finetune` with `SYNTHFACES_FAST_FINETUNE` on the hypernet's prediction, bit for bit, and the file says so."""
    ref = synthfaces.render(synthfaces.Identity.from_seed(SEEDS[0]), REFERENCE, 64)
    ref.save(tmp_path / "ref.png")
    out = tmp_path / "me.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread, like this process (conftest.py)
    res = subprocess.run([sys.executable, "-m", "hyperdiff.cli", "personalize", "--image", str(tmp_path / "ref.png"),
                          "--out", str(out), "--finetune-steps", "3", "--seed", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    loaded = Adapter.load(out)
    cfg = replace(SYNTHFACES_FAST_FINETUNE, steps=3, token="sks", seed=2)
    read = [[reference_caption(ref).format(token="sks")]]  # no --caption: the embedded base reads the reference's
    want = finetune(hdb.pipe, [[ref]], cfg, start=[hdb.hypernet.predict([ref])], prompts=read, progress=False)[0]
    assert f"caption (read from the references)={read[0][0]!r}" in loaded.info.source, loaded.info.source
    assert "identity_weight=1" in loaded.info.source and "lr=0.003" in loaded.info.source, loaded.info.source
    assert loaded.info.low_noise == SYNTHFACES_FAST_FINETUNE.low_noise, loaded.info  # the file says how it samples:
    assert loaded.info.rank_schedules == ((want.rank - SYNTHFACES_FAST_FINETUNE.rank, hdb.hypernet.config.low_noise),)
    assert loaded.info.rank_schedules == want.info.rank_schedules  # the start's rank keeps the hypernet's schedule
    for name in hdb.table.names:
        assert torch.equal(loaded.delta_weight(name), want.delta_weight(name)), name
    plain = finetune(hdb.pipe, [[ref]], replace(cfg, identity_weight=0.0), start=[hdb.hypernet.predict([ref])],
                     prompts=read, progress=False)[0]
    assert any(not torch.equal(plain.delta_weight(n), want.delta_weight(n)) for n in hdb.table.names)
