"""The SynthFaces identity metric: the shipped IdentityEncoder, scene fidelity, files, bad input, determinism."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperdiff.config import load_config
from hyperdiff.errors import HyperdiffError
from hyperdiff.synthfaces import (
    EVAL_SEED_START,
    TRAIN_SEEDS,
    Identity,
    Scene,
    all_scenes,
    eval_seeds,
    render,
)
from hyperdiff.synthfaces.detectors import detect_scene, scene_fidelity
from hyperdiff.synthfaces.encoder import DEFAULT_ENCODER_DIR, IdentityEncoder, IdentityEncoderConfig
from hyperdiff.synthfaces.encoder_training import AugmentConfig, IdentityEncoderTrainingConfig, augment, roc_auc

ROOT = Path(__file__).resolve().parents[1]
N_IDENTITIES = 150  # held-out identities, 2 random scenes each: 150 same pairs vs 22,350 different pairs


@pytest.fixture(scope="module")
def encoder() -> IdentityEncoder:
    return IdentityEncoder.from_pretrained()


@pytest.fixture(scope="module")
def held_out():
    """(identity, scene) x 2 per eval identity (seeds >= 1,000,000), random scenes, and the renders."""
    rng = random.Random(123)
    pairs = []
    for seed in eval_seeds(N_IDENTITIES):
        identity = Identity.from_seed(seed)
        pairs += [(identity, Scene.random(rng)), (identity, Scene.random(rng))]
    assert all(identity.seed >= EVAL_SEED_START for identity, _ in pairs)
    return pairs, [render(identity, scene) for identity, scene in pairs]


def _auc(encoder, images) -> tuple[float, torch.Tensor, torch.Tensor]:
    z = encoder.embed(images)
    sim = encoder.similarity(z[0::2], z[1::2], matrix=True)
    off = ~torch.eye(sim.shape[0], dtype=torch.bool)
    return roc_auc(sim.diagonal(), sim[off]), sim.diagonal(), sim[off]


def test_roc_auc_plain():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1.0], [1.0]) == 0.5
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 200), rng.normal(0, 1, 300)
    brute = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert roc_auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(HyperdiffError):
        roc_auc([], [1.0])


def test_identity_auc_on_held_out_renders(encoder, held_out):
    _, images = held_out
    auc, same, different = _auc(encoder, images)
    assert auc >= 0.98, auc
    assert same.mean() - different.mean() > 0.4
    # the calibrated threshold separates most pairs (the analogue of a face-recognition match)
    assert encoder.same_identity(images[0::2], images[1::2]).float().mean() >= 0.9


def test_identity_auc_against_coarse_twins(encoder):
    """Hard negatives: a different identity with the same skin, hair style and hair colour (fine traits differ)."""
    traits = ("skin", "hair_style", "hair_color")
    pool: dict[tuple, int] = {}
    for seed in eval_seeds(10_000)[200:]:
        identity = Identity.from_seed(seed)
        pool.setdefault(tuple(getattr(identity, t) for t in traits), seed)
    rng = random.Random(5)
    a, b, twin = [], [], []
    for seed in eval_seeds(100):
        identity = Identity.from_seed(seed)
        key = tuple(getattr(identity, t) for t in traits)
        if key in pool:
            a.append(render(identity, Scene.random(rng)))
            b.append(render(identity, Scene.random(rng)))
            twin.append(render(Identity.from_seed(pool[key]), Scene.random(rng)))
    assert len(a) >= 80
    same, hard = encoder.similarity(a, b), encoder.similarity(a, twin)
    assert roc_auc(same, hard) >= 0.97, roc_auc(same, hard)
    assert same.mean() - hard.mean() > 0.4


def test_identity_auc_survives_generation_like_noise(encoder, held_out):
    pairs, images = held_out
    batch = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 for im in images])
    noisy = augment(batch, torch.Generator().manual_seed(7), AugmentConfig(p_clean=0.0, p_background=0.0))
    auc, _, _ = _auc(encoder, noisy)
    assert auc >= 0.95, auc


def test_hat_expression_background_detection(encoder, held_out):
    pairs, images = held_out
    found = encoder.detect(images)
    hat = np.mean([f["hat"] == s.hat for f, (_, s) in zip(found, pairs)])
    expression = np.mean([f["expression"] == s.expression for f, (_, s) in zip(found, pairs)])
    assert hat >= 0.97, hat
    assert expression >= 0.97, expression
    assert all(f["background"] == s.background for f, (_, s) in zip(found, pairs))


def test_scene_fidelity_flags_wrong_words(encoder):
    identity = Identity.from_seed(EVAL_SEED_START + 7)
    image = render(identity, Scene("blue", True, "smiling"))
    ok = scene_fidelity(image, Scene("blue", True, "smiling"))
    assert ok["background"] and ok["hat"] and ok["expression"] and ok["all"]
    assert (ok["detected_background"], ok["detected_hat"], ok["detected_expression"]) == ("blue", True, "smiling")
    wrong = scene_fidelity(image, Scene("red", False, "sad"), encoder=encoder)
    assert not wrong["background"] and not wrong["hat"] and not wrong["expression"] and not wrong["all"]
    no_hat = scene_fidelity(image, "a sks face, smiling, on a blue background")  # a prompt works too
    assert no_hat["background"] and not no_hat["hat"] and no_hat["expression"]
    assert detect_scene(image) == Scene("blue", True, "smiling")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    assert scene_fidelity(tensor, Scene("blue", True, "smiling"))["all"]
    assert detect_scene(Image.new("RGB", (64, 64), (255, 255, 255))) is None  # no palette background


def test_background_invariance(encoder):
    """Same identity, hat and expression on two backgrounds vs. different identities."""
    identities = [Identity.from_seed(s) for s in eval_seeds(40)]
    a = [render(i, Scene("red", False, "neutral")) for i in identities]
    b = [render(i, Scene("blue", False, "neutral")) for i in identities]
    c = [render(i, Scene("gray", True, "smiling")) for i in identities]
    za, zb, zc = encoder.embed(a), encoder.embed(b), encoder.embed(c)
    same_bg_swap = encoder.similarity(za, zb)  # row-wise
    different = (za @ zc.T)[~torch.eye(len(identities), dtype=torch.bool)]
    margin = same_bg_swap.mean() - different.mean()
    assert same_bg_swap.min() > different.mean() + 0.3
    assert margin > 0.5, float(margin)


def test_embed_contract(encoder):
    identity = Identity.from_seed(EVAL_SEED_START)
    images = [render(identity, s) for s in list(all_scenes())[:4]]
    z = encoder.embed(images)
    assert z.shape == (4, encoder.config.embed_dim) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(encoder.embed(images), z)  # deterministic
    assert not z.requires_grad and not encoder.training
    tensor = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 for im in images])
    assert torch.allclose(encoder.embed(tensor), z, atol=1e-5)  # PIL and tensor paths agree
    big = [render(identity, s, size=128) for s in list(all_scenes())[:4]]
    assert encoder.embed(big).shape == (4, 128)  # resized
    assert encoder.similarity(images, z).shape == (4,)  # images vs embeddings, row-wise
    assert torch.allclose(encoder.similarity(images[:1], z), z @ z[0], atol=1e-5)  # length 1 broadcasts
    assert encoder.similarity(z[:2], z, matrix=True).shape == (2, 4)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("face.png", "must be a PIL image"),
        ([], "must not be empty"),
        ([Image.new("RGB", (64, 64)), "x"], "PIL images only"),
        (torch.zeros(2, 1, 64, 64), r"shape \(N, 3, H, W\)"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "floating point"),
        (torch.full((1, 3, 64, 64), -1.0), r"in \[0, 1\]"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    ],
)
def test_bad_images_raise_one_line(encoder, bad, match):
    with pytest.raises(HyperdiffError, match=match) as info:
        encoder.embed(bad)
    assert "\n" not in str(info.value)


def test_bad_calls_raise_one_line(encoder, tmp_path):
    z = torch.nn.functional.normalize(torch.ones(3, 128), dim=1)
    for call, match in [
        (lambda: encoder.similarity(z, z[:2]), "same number"),
        (lambda: encoder.similarity(torch.ones(3, 7), z), r"embeddings must be a float tensor \(N, 128\)"),
        (lambda: scene_fidelity(Image.new("RGB", (64, 64)), 3), "must be a Scene"),
        (lambda: scene_fidelity([Image.new("RGB", (64, 64))], Scene()), "one PIL image"),
        (lambda: IdentityEncoder.from_pretrained(tmp_path / "nope"), "does not exist"),
        (lambda: IdentityEncoder.from_pretrained(tmp_path), "has no config.json"),
        (lambda: IdentityEncoder.from_pretrained(3), "folder path"),
        (lambda: IdentityEncoderConfig(channels=(30, 64), blocks=(1, 1)), "multiples of `groups`"),
    ]:
        with pytest.raises(HyperdiffError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_save_load_round_trip(encoder, tmp_path):
    images = [render(Identity.from_seed(EVAL_SEED_START + i), Scene()) for i in range(3)]
    encoder.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]
    again = IdentityEncoder.from_pretrained(tmp_path / "enc")
    assert torch.equal(again.embed(images), encoder.embed(images))
    assert again.threshold == encoder.threshold and again.config == encoder.config
    # a truncated weights file is a clear error, not a traceback
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(HyperdiffError, match="safetensors"):
        IdentityEncoder.from_pretrained(tmp_path / "enc")


def test_shipped_files():
    config = json.loads((DEFAULT_ENCODER_DIR / "config.json").read_text())
    assert config["model_type"] == "hyperdiff.IdentityEncoder"
    assert config["evaluation"]["clean_auc"] >= 0.98
    weights = DEFAULT_ENCODER_DIR / "model.safetensors"
    assert weights.stat().st_size <= 1_000_000
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    # the shipped config is the committed YAML
    cfg = load_config(IdentityEncoderTrainingConfig, ROOT / "configs" / "identity_encoder.yaml")
    assert config["config"] == config["training"]["model"]
    assert IdentityEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["config"].items()}) == cfg.model


def _training_script():
    spec = importlib.util.spec_from_file_location("train_identity_encoder", ROOT / "scripts" / "train_identity_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_training_batches_use_train_seeds_only():
    script = _training_script()
    cfg = IdentityEncoderTrainingConfig(identities_per_batch=16, hard_fraction=0.5, hard_pool=5000)
    index = script.coarse_index(TRAIN_SEEDS[: cfg.hard_pool])
    rng = random.Random(0)
    batches = [script.sample_batch(cfg, rng, index) for _ in range(50)]
    assert all(len(set(b)) == 16 and all(s in TRAIN_SEEDS for s in b) for b in batches)
    twins = sum(  # the second half are coarse twins of the first half (when the pool has one)
        script.coarse_index([a]).keys() == script.coarse_index([t]).keys() for b in batches for a, t in zip(b[:8], b[8:])
    )
    assert twins >= 0.9 * 50 * 8


def test_training_is_bit_for_bit_reproducible():
    script = _training_script()
    cfg = IdentityEncoderTrainingConfig(
        steps=3, identities_per_batch=4, scenes_per_identity=2, val_every=0, val_identities=4, eval_identities=4,
        hard_pool=2000, eval_twin_pool=500,
        model=IdentityEncoderConfig(channels=(8, 16), blocks=(1, 1), hidden_dim=16, embed_dim=8,
                                    expression_channels=(8, 8), expression_strides=(2, 2)),
    )
    threads = torch.get_num_threads()
    try:
        a, report = script.train(cfg, progress=False)
        b, _ = script.train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(report["evaluation"]) >= {"clean_auc", "clean_hat_acc", "clean_expression_acc"}
