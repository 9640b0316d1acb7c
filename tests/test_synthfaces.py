"""SynthFaces: determinism, seed ranges, the corner guarantee, captions, diversity, no global RNG."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from hyperdiff import synthfaces as sf
from hyperdiff.errors import HyperdiffError
from hyperdiff.synthfaces import (
    BACKGROUNDS,
    EVAL_SEED_START,
    EXPRESSIONS,
    PALETTE,
    TRAIN_SEEDS,
    VAL_SEEDS,
    Identity,
    Scene,
    all_scenes,
    background_of,
    caption,
    eval_seeds,
    render,
    sample,
    scene_from_caption,
)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def seed_per_hair_style() -> dict[str, int]:
    found: dict[str, int] = {}
    for seed in range(1000):
        found.setdefault(Identity.from_seed(seed).hair_style, seed)
    assert set(found) == set(sf.HAIR_STYLES)
    return found


# --- determinism and variation -----------------------------------------------------------------------------------


def test_identity_is_fixed_by_seed():
    assert Identity.from_seed(123) == Identity.from_seed(123)
    assert Identity.from_seed(123) != Identity.from_seed(124)
    d = Identity.from_seed(7).to_dict()
    assert d["seed"] == 7 and Identity(**d) == Identity.from_seed(7)


def test_render_is_deterministic_and_varies():
    a, b = Identity.from_seed(3), Identity.from_seed(4)
    scene = Scene("blue", True, "smiling")
    image = render(a, scene)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.tobytes() == render(Identity.from_seed(3), Scene("blue", True, "smiling")).tobytes()
    assert image.tobytes() != render(b, scene).tobytes()
    renders = {render(a, s).tobytes() for s in all_scenes()}
    assert len(renders) == len(list(all_scenes())) == 6 * 2 * len(EXPRESSIONS)
    assert render(a, scene, size=128).size == (128, 128)


# --- seed ranges ------------------------------------------------------------------------------------------------


def test_seed_ranges():
    assert isinstance(TRAIN_SEEDS, range) and isinstance(VAL_SEEDS, range)
    assert len(TRAIN_SEEDS) > 0 and len(VAL_SEEDS) > 0
    assert not set(range(TRAIN_SEEDS.start, TRAIN_SEEDS.stop)) & set(range(VAL_SEEDS.start, VAL_SEEDS.stop))
    assert max(TRAIN_SEEDS) < 1_000_000 and max(VAL_SEEDS) < 1_000_000
    assert min(TRAIN_SEEDS) >= 0 and min(VAL_SEEDS) >= 0
    assert EVAL_SEED_START == 1_000_000
    ev = eval_seeds(50)
    assert len(ev) == 50 and min(ev) >= EVAL_SEED_START
    assert not set(ev) & set(TRAIN_SEEDS) and not set(ev) & set(VAL_SEEDS)
    pairs = sample(VAL_SEEDS, 40, rng_seed=1)
    assert pairs == sample(VAL_SEEDS, 40, rng_seed=1) != sample(VAL_SEEDS, 40, rng_seed=2)
    assert all(identity.seed in VAL_SEEDS for identity, _ in pairs)


# --- corners and background detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 32, 128])
def test_corners_are_pure_background(size):
    hair_seeds = list(seed_per_hair_style().values())
    seeds = hair_seeds + list(range(2000, 2000 + (150 if size == 64 else 20))) + list(eval_seeds(10))
    rng = random.Random(size)
    k = size // 8
    checked = 0
    for i, seed in enumerate(seeds):
        identity = Identity.from_seed(seed)
        scenes = [Scene(b, True, "surprised") for b in BACKGROUNDS] if seed in hair_seeds else []
        scenes += [Scene(BACKGROUNDS[i % 6], bool(i % 2), EXPRESSIONS[i % len(EXPRESSIONS)]), Scene.random(rng)]
        for scene in scenes:
            image = render(identity, scene, size=size)
            a = np.asarray(image).astype(np.int64)
            for patch in (a[:k, :k], a[:k, -k:], a[-k:, :k], a[-k:, -k:]):
                assert np.abs(patch - np.array(PALETTE[scene.background])).max() <= 1, (seed, scene)
            assert background_of(image) == scene.background
            checked += 1
    assert checked >= (300 if size == 64 else 60)


def test_background_of_threshold_and_inputs():
    plain = np.zeros((64, 64, 3), np.uint8)
    plain[:] = (255, 255, 255)  # white is far from every palette colour
    assert background_of(plain) is None
    plain[:] = (150, 60, 180)  # near purple
    assert background_of(plain) == "purple"
    with pytest.raises(HyperdiffError, match="`image` must be"):
        background_of(np.zeros((64, 64), np.uint8))


# --- captions ---------------------------------------------------------------------------------------------------


def test_caption_format():
    assert caption(Scene("blue", True, "smiling"), "sks") == "a sks face, smiling, wearing a hat, on a blue background"
    assert caption(Scene("blue", False, "smiling")) == "a face, smiling, on a blue background"
    assert caption(Scene("gray", False, "sad"), token="sks") == "a sks face, sad, on a gray background"
    with pytest.raises(HyperdiffError, match="`token`"):
        caption(Scene(), token="two words")


def test_caption_round_trip_and_single_tokens():
    from hyperdiff.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    words: set[str] = set()
    for scene in all_scenes():
        for token in (None, "sks"):
            text = caption(scene, token)
            assert scene_from_caption(text) == scene
            words.update(text.replace(",", " ").split())
    for word in sorted(words):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert scene_from_caption("a photo of sks face with no hat, surprised, on a red background") == Scene(
        "red", False, "surprised"
    )
    with pytest.raises(HyperdiffError, match="background"):
        scene_from_caption("a sks face, smiling")


def test_scene_validation():
    with pytest.raises(HyperdiffError, match=r"`background` must be one of \['red'.*got 'pink'"):
        Scene(background="pink")
    with pytest.raises(HyperdiffError, match="`expression`"):
        Scene(expression="angry")
    with pytest.raises(HyperdiffError, match="`hat`"):
        Scene(hat="yes")
    with pytest.raises(HyperdiffError, match="`seed`"):
        Identity.from_seed(-1)
    scenes = {Scene.random(random.Random(i)) for i in range(300)}
    assert len(scenes) == 48  # every combination is drawn
    assert Scene.random(np.random.default_rng(0)) == Scene.random(np.random.default_rng(0))


# --- diversity --------------------------------------------------------------------------------------------------


def test_identities_are_diverse():
    identities = [Identity.from_seed(s) for s in range(500)]
    assert len({i.traits() for i in identities}) >= 480
    for name, options in [("hair_style", sf.HAIR_STYLES), ("skin", sf.SKIN_TONES), ("hair_color", sf.HAIR_COLORS),
                          ("face_shape", sf.FACE_SHAPES), ("glasses", sf.GLASSES)]:
        assert {getattr(i, name) for i in identities} == set(options), name
    forbidden = set(PALETTE.values())
    assert not forbidden & set(sf.SKIN_TONES.values()) and not forbidden & set(sf.HAIR_COLORS.values())


def test_identity_differences_dominate_expression_differences():
    # Margin: different identities in one scene are on average >= 3x farther apart (pixel L2) than one identity's
    # renders that differ only in expression (measured ~4x).
    identities = [Identity.from_seed(s) for s in range(5000, 5030)]
    base = Scene("gray", False, "neutral")
    renders = [pixels(render(i, base)) for i in identities]
    between = np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(renders, 2)])
    for expression in ("smiling", "surprised", "sad"):
        other = Scene("gray", False, expression)
        within = np.mean([np.linalg.norm(r - pixels(render(i, other))) for i, r in zip(identities, renders)])
        assert within > 0 and between > 3 * within, (expression, between, within)


# --- no global RNG ----------------------------------------------------------------------------------------------


def test_no_global_rng_is_touched():
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    identity = Identity.from_seed(99)
    render(identity, Scene.random(random.Random(0)))
    sample(TRAIN_SEEDS, 5, rng_seed=0)
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == npy[0] and np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]
    assert torch.equal(torch.get_rng_state(), th)
    random.seed(12345)  # and the global state does not leak in
    assert Identity.from_seed(99) == identity
