"""The web UI's event handlers: each reads its own session, calls the pipeline under one lock, returns UI values.

Contract:
- References are validated by `hyperdiff.inputs.load_images`, the crop preview is `pipeline.encoder_view`, adapters
  come from `pipeline.personalize`/`mix`, images from `generate`/`sample_adapters`, files from `Adapter.save_as` (and
  a fine-tune's LoRA files part by part from `Adapter.export_parts`) — the calls the CLI makes.
- Sessions: every browser tab (every API client) has its own `Session` in `gr.State` (references, adapter, last seed,
  outputs, download folder). A request reads only its own session: one user's identity is never used for another's
  images.
- Bad input (not an image, corrupt, over `MAX_SIDE` px or `MAX_MB` MB, a number out of range, no reference or adapter
  yet) is a visible `gr.Error` carrying hyperdiff's one-line message; the app keeps serving.
- The fast fine-tune shows a live progress bar and is cancellable: Cancel stops it at its next step and the session
  keeps its previous adapter.
"""

from __future__ import annotations

import functools
import random
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gradio as gr

from hyperdiff import inputs
from hyperdiff.core.adapter import Adapter
from hyperdiff.errors import HyperdiffError, check_int_in, check_number_in
from hyperdiff.inputs import MAX_IMAGES, load_images
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline, caption_record

MAX_SIDE, MAX_MB = 4096, 20  # uploads larger than this are refused (pixels on either side, megabytes)
MAX_SEED = inputs.MAX_SEED
MAX_FINETUNE_STEPS = 500


@dataclass
class Session:
    """One browser session's own data (kept in `gr.State`, so each session gets a fresh copy)."""

    references: list = field(default_factory=list)  # validated RGB PIL images
    adapter: Adapter | None = None
    last_seed: int | None = None
    outputs: list = field(default_factory=list)  # the last generated images
    folder: str | None = None  # where this session's downloads are written


class _Cancelled(Exception):
    def __init__(self, step: int):
        super().__init__(f"cancelled at step {step}")
        self.step = step


class _Runs:
    """Cancel flags of the fine-tunes now running, one per session (Gradio's session hash)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, threading.Event] = {}

    def start(self, key: str) -> threading.Event:
        with self._lock:
            flag = self._flags[key] = threading.Event()
        return flag

    def finish(self, key: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(key) is flag:
                del self._flags[key]

    def cancel(self, key: str) -> bool:
        with self._lock:
            flag = self._flags.get(key)
        if flag is not None:
            flag.set()
        return flag is not None


def _int(name: str, value, lo: int | None = None, hi: int | None = None):
    """Gradio numbers arrive as floats: an integral float becomes an int; with bounds it is checked here, without
    them the pipeline checks it (its own ranges)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if lo is None else check_int_in(name, value, lo, hi)


# Uploads arrive as <gradio cache>/<64 hex>/<the user's file name>: messages name the user's file only.
_UPLOAD_DIR = re.compile(r"[^\s'\"]*/[0-9a-f]{64}/")


def _shown(fn: Callable) -> Callable:
    """hyperdiff's one-line input errors become a `gr.Error` the page shows (the signature stays for Gradio)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HyperdiffError as e:
            raise gr.Error(_UPLOAD_DIR.sub("", str(e)), print_exception=False) from None

    return wrapper


def _adapter_summary(adapter: Adapter | None) -> str:
    if adapter is None:
        return "No adapter yet."
    return (f"**Adapter** `{adapter.digest}` · {adapter.kind}, rank {adapter.rank}, {adapter.num_values:,} values, "
            f"token `{adapter.info.token}`")


class _Handlers:
    """The event handlers: each reads its own session, calls the pipeline under the lock, returns UI values."""

    def __init__(self, pipeline: HyperDreamBoothPipeline):
        self.pipeline = pipeline
        self.lock = threading.Lock()
        self.runs = _Runs()
        self.root = Path(tempfile.mkdtemp(prefix="hyperdiff-ui-"))

    # -- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def _references(session: Session) -> list:
        if not session.references:
            raise HyperdiffError("no reference image yet: drop one or more photos of the face first")
        return session.references

    @staticmethod
    def _adapter(session: Session) -> Adapter:
        if session.adapter is None:
            raise HyperdiffError("no adapter yet: upload a reference and press Personalize first")
        return session.adapter

    @staticmethod
    def _load(images) -> list:
        return load_images(images, max_side=MAX_SIDE, max_bytes=MAX_MB * 2**20)

    # -- events --------------------------------------------------------------------------------------------------
    @_shown
    def references(self, files, webcam, session: Session):
        paths = list(files or []) + ([webcam] if webcam else [])
        session.references = []  # a bad upload leaves no stale reference behind
        if not paths:
            return [], "Drop one or more photos of the face to start.", session
        images = self._load(paths)
        session.references = images
        if self.pipeline.hypernet is None:
            return [(im, "reference") for im in images], "References ready (no hypernet loaded: no encoder crop).", session
        views = self.pipeline.encoder_view(images)
        w, h = views[0].size
        gallery = [(view, f"{i + 1} · {w}×{h}") for i, view in enumerate(views)]
        note = f"{len(images)} reference image(s) ready ({w}×{h}, as the encoder sees them): press **Personalize**."
        return gallery, note, session

    @_shown
    def personalize(self, token, finetune_steps, seed, session: Session, caption=None, request: gr.Request = None,
                    progress=gr.Progress()):
        references = self._references(session)
        steps = _int("finetune_steps", finetune_steps, 0, MAX_FINETUNE_STEPS)
        seed = _int("seed", seed, 0, MAX_SEED)
        token = (token or "").strip()
        caption = (caption or "").strip() or None  # empty: read from each reference (embedded base), else "a {token} face"
        key = request.session_hash if request is not None else ""
        flag = self.runs.start(key)

        def step_done(step: int, loss: float) -> None:
            if flag.is_set():
                raise _Cancelled(step)
            progress((step + 1) / steps, desc=f"fast fine-tune: step {step + 1}/{steps}, loss {loss:.4f}")

        try:
            progress(0, desc="zero-shot prediction" if steps == 0 else "zero-shot prediction, then fast fine-tune")
            with self.lock:
                start = time.perf_counter()
                adapter = self.pipeline.personalize(references, token=token, finetune_steps=steps, seed=seed,
                                                    caption=caption, callback=step_done)
                seconds = time.perf_counter() - start
        except _Cancelled as stop:
            return (f"Cancelled after {stop.step} of {steps} fine-tune steps; the previous adapter is kept.",
                    _adapter_summary(session.adapter), session)
        finally:
            self.runs.finish(key, flag)
        session.adapter = adapter
        if self.pipeline.hypernet is None:
            how = f"{steps}-step DreamBooth-LiDB fine-tune from scratch: no hypernet loaded"
        else:
            how = "zero-shot hypernet prediction" if steps == 0 else f"zero-shot prediction + {steps}-step fast fine-tune"
        told = f" Fine-tuned on {caption_record(adapter)}." if caption_record(adapter) else ""
        return (f"Personalized from {len(references)} reference(s) in **{seconds:.2f} s** ({how}).{told} "
                f"Put **{token}** in your prompt.", _adapter_summary(adapter), session)

    def cancel(self, request: gr.Request):
        if self.runs.cancel(request.session_hash if request is not None else ""):
            return "Cancelling: the fine-tune stops at its next step; the previous adapter is kept."
        return "Nothing to cancel."

    @_shown
    def generate(self, prompt, negative_prompt, steps, guidance, seed, randomize, num_images, session: Session):
        adapter = self._adapter(session)
        seed = random.randint(0, MAX_SEED - MAX_IMAGES) if randomize else _int("seed", seed, 0, MAX_SEED)
        with self.lock:
            start = time.perf_counter()
            images = self.pipeline.generate(
                prompt, adapter, negative_prompt=negative_prompt or None, num_images=_int("num_images", num_images),
                steps=_int("steps", steps), guidance=guidance, seed=seed,
            )
            seconds = time.perf_counter() - start
        session.last_seed, session.outputs = seed, images
        gallery = [(im, f"seed {seed + i}") for i, im in enumerate(images)]
        return gallery, f"{len(images)} image(s) in {seconds:.2f} s · first seed **{seed}** (image i uses seed + i)", session

    @_shown
    def reuse_seed(self, session: Session):
        if session.last_seed is None:
            raise HyperdiffError("no image generated yet: there is no last seed to reuse")
        return session.last_seed, False

    @_shown
    def sample(self, prompt, n, steps, seed, session: Session):
        references = self._references(session)
        with self.lock:
            start = time.perf_counter()
            images, spread = self.pipeline.sample_adapters(
                references, n=_int("n", n), prompt=prompt, seed=_int("seed", seed, 0, MAX_SEED), steps=_int("steps", steps))
            seconds = time.perf_counter() - start
        gallery = [(im, f"sampled adapter {i + 1}") for i, im in enumerate(images)]
        return gallery, spread, f"{len(images)} sampled adapters in {seconds:.2f} s; bright = where they disagree"

    @_shown
    def mix(self, image_a, image_b, weight, prompt, steps, seed, token, keep, session: Session):
        refs_a = self._load(image_a) if image_a else self._references(session)
        if not image_b:
            raise HyperdiffError("identity B has no image: drop a photo of the second face")
        refs_b, w = self._load(image_b), check_number_in("weight", weight, 0, 1)
        token, steps, seed = (token or "").strip(), _int("steps", steps), _int("seed", seed, 0, MAX_SEED)
        with self.lock:
            start = time.perf_counter()
            a = self.pipeline.personalize(refs_a, token=token)
            b = self.pipeline.personalize(refs_b, token=token)
            mixed = self.pipeline.mix([a, b], [1 - w, w])
            images = [self.pipeline.generate(prompt, ad, steps=steps, seed=seed)[0] for ad in (a, mixed, b)]
            seconds = time.perf_counter() - start
        if keep:
            session.adapter = mixed
        captions = ["identity A", f"{1 - w:.2f}·A + {w:.2f}·B", "identity B"]
        note = " The mix is now your adapter." if keep else ""
        return list(zip(images, captions)), f"Mixed in {seconds:.2f} s (same seed {seed} for all three).{note}", session

    @_shown
    def download(self, format, session: Session):
        """The adapter as one file; a LoRA file of an adapter whose rank parts have their own schedules (a fine-tune's
        start and learned part) also as one file per part (`Adapter.export_parts`, = `hyperdiff export --split`)."""
        adapter = self._adapter(session)
        if session.folder is None:
            session.folder = tempfile.mkdtemp(prefix="session-", dir=self.root)
        split = format != "native" and len(adapter.schedule_parts) > 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said in the note instead
            path = adapter.save_as(session.folder, format)
            parts = adapter.export_parts(path, format) if split else []
        note = f"`{path.name}` · {path.stat().st_size:,} bytes"
        if format != "native" and adapter.info.scheduled:
            how = ("the part files above carry one schedule each: load them under their own adapter names and pass "
                   "their schedules to" if split else "in diffusers:")
            note += (f" · a LoRA file applies ΔW at one strength, where hyperdiff applies it "
                     f"{adapter.info.describe_schedule()} ({how} `hyperdiff.schedule.diffusers_schedule`)")
        return str(path), [str(p) for p in parts] or None, note, session

    def describe(self) -> dict:
        return self.pipeline.describe()
