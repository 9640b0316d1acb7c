"""Data: the identity datasets of hypernet training (`identities`). The SynthFaces world they draw on is
`hyperdiff.synthfaces`; its main names stay importable from here."""

from hyperdiff.synthfaces import (
    BACKGROUND_THRESHOLD,
    BACKGROUNDS,
    EVAL_SEED_START,
    EXPRESSIONS,
    PALETTE,
    SCENE_WORDS,
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

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_THRESHOLD",
    "EVAL_SEED_START",
    "EXPRESSIONS",
    "PALETTE",
    "SCENE_WORDS",
    "TRAIN_SEEDS",
    "VAL_SEEDS",
    "Identity",
    "Scene",
    "all_scenes",
    "background_of",
    "caption",
    "eval_seeds",
    "render",
    "sample",
    "scene_from_caption",
]
