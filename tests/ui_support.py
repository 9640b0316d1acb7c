"""Shared set-up of the web UI tests (test_ui.py, test_ui_browser.py): a hypernet for the embedded SynthFaces base,
reference renders of evaluation identities, and an in-process server on a free 127.0.0.1 port. The fixtures
`hypernet_dir` (one per session) and `server` (one per test module) are imported by both modules."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket
from pathlib import Path

import numpy as np
import pytest

from hyperdiff import synthfaces as sf
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

from test_hypernet import make_hypernet, randomise_b_head

# Generation kept tiny: the embedded base makes 64x64 images; 3 steps.
STEPS, PROMPT = 3, "a sks face, smiling, on a blue background"


def make_hypernet_dir(folder: Path) -> Path:
    """An untrained hypernet for the embedded base with a random B head (std 1e-2: different references give visibly
    different adapters, so a mixed-up identity cannot go unnoticed) and a low-noise gain, as a calibrated one has."""
    table = HyperDreamBoothPipeline.from_pretrained(load_hypernet=False, device="cpu").table
    hypernet = randomise_b_head(make_hypernet(table, seed=0), std=1e-2)
    hypernet.set_gain(1.0, low_noise=LowNoiseGain(1.5, 500))
    hypernet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hypernet_dir(tmp_path_factory):
    return make_hypernet_dir(tmp_path_factory.mktemp("ui_hypernet"))


@pytest.fixture(scope="module")
def server(hypernet_dir):
    demo, url = start_server(HyperDreamBoothPipeline.from_pretrained(hypernet=hypernet_dir, device="cpu"))
    yield url
    demo.close()


def face(seed: int, background: str = "gray", size: int = 64):
    """A reference render of an evaluation identity (seeds >= 1_000_000 are never trained on)."""
    assert seed >= sf.EVAL_SEED_START
    return sf.render(sf.Identity.from_seed(seed), sf.Scene(background, False, "neutral"), size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pipeline: HyperDreamBoothPipeline):
    """(demo, url): the app built and launched in this process, not blocking."""
    from ui.app import build_app, launch

    demo = build_app(pipeline)
    _, url, _ = launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    return demo, url


def pixels(images) -> np.ndarray:
    """PIL images or PNG paths → int16 array (n, H, W, 3), so differences do not wrap."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im, dtype=np.int16)
                     for im in images])
