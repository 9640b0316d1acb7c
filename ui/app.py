"""The hyperdiff web UI: personalize from reference photos, generate, see the uncertainty, mix identities, download.

Contract:
- `build_app(pipeline) -> gr.Blocks` builds the whole UI, with its bounded queue, around one loaded
  `HyperDreamBoothPipeline`. The UI holds no model logic: references are validated by
  `hyperdiff.inputs.load_images`, the crop preview is `pipeline.encoder_view`, adapters come from
  `pipeline.personalize`/`mix`, images from `generate`/`sample_adapters`, files from `Adapter.save_as` (and a
  fine-tune's LoRA files part by part from `Adapter.export_parts`) — the calls the CLI makes, so the two cannot
  disagree.
- Sessions: every browser tab (every API client) has its own `Session` in `gr.State` (references, adapter, last seed,
  outputs, download folder). A request reads only its own session: one user's identity is never used for another's
  images.
- One model call at a time: `generate` fuses the adapter into the one shared UNet, so every pipeline call runs under
  one lock, and the queue runs model events one at a time (`concurrency_id="model"`), at most `MAX_QUEUE` waiting.
- Bad input (not an image, corrupt, over `MAX_SIDE` px or `MAX_MB` MB, a number out of range, no reference or adapter
  yet) is a visible `gr.Error` carrying hyperdiff's one-line message; the app keeps serving.
- The fast fine-tune shows a live progress bar and is cancellable: Cancel stops it at its next step and the session
  keeps its previous adapter.
- Endpoints (`api_name`): /references, /personalize, /cancel, /generate, /reuse_seed, /sample, /mix, /download,
  /describe. Generated images are PNG (lossless), captioned with their seed (image i uses seed + i).
- `launch(demo, host, port, **kw)` adds the theme and the upload limit and starts the server; `serve(...)` loads the
  pipeline and launches (the `hyperdiff ui` command, which parses the flags); `main(argv)` = `hyperdiff ui ARGV`.
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
from hyperdiff import synthfaces
from hyperdiff.core.adapter import Adapter
from hyperdiff.core.formats import FILE_FORMATS
from hyperdiff.errors import HyperdiffError, check_int_in, check_number_in
from hyperdiff.inputs import MAX_IMAGES, load_images
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline, caption_record

MAX_SIDE, MAX_MB = 4096, 20  # uploads larger than this are refused (pixels on either side, megabytes)
MAX_QUEUE = 16  # model requests waiting at most; more get "queue full"
MAX_SEED = inputs.MAX_SEED
MAX_FINETUNE_STEPS = 500
NO_HYPERNET_STEPS = 300  # DreamBooth-LiDB from scratch: a CPU-friendly default (≈ 15 s here; gains grow to 600, docs/fidelity.md)
TOKEN = "sks"
MODEL = "model"  # concurrency id shared by every event that calls the pipeline

HOW_TO = """\
1. **Drop** one or more photos of the face (or take a webcam snapshot): the preview shows exactly what the encoder sees.
2. **Personalize**: the zero-shot prediction takes a fraction of a second; add fast fine-tune steps for more fidelity.
3. **Generate** with the token (`sks`) in the prompt; explore the **Uncertainty** of the prediction, **Mix** two
   identities, and **Download** the adapter as a LoRA for diffusers, A1111 or ComfyUI."""

CSS = """
.hd-header {text-align: center; margin: 0.4em 0 0.2em}
.hd-header h1 {font-size: 2.2em; font-weight: 800; margin: 0}
.hd-header p {opacity: 0.75; margin: 0.2em 0 0}
.hd-howto {font-size: 0.95em}
#status, #generate-info, #sample-info, #mix-info, #download-info {min-height: 1.6em}
#preview img, #gallery img, #samples img, #spread img, #mix-gallery img {image-rendering: pixelated}
#preview .grid-container {grid-template-columns: repeat(auto-fill, minmax(96px, 128px)) !important}
"""

THEME = gr.themes.Soft(
    primary_hue="indigo", secondary_hue="violet", neutral_hue="slate",
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"],
)


def example_prompts(token: str = TOKEN) -> list[str]:
    """One SynthFaces caption per background, a hat on every other one, the expressions in turn: scene control."""
    expressions = synthfaces.EXPRESSIONS
    return [
        synthfaces.caption(synthfaces.Scene(background, i % 2 == 1, expressions[i % len(expressions)]), token)
        for i, background in enumerate(synthfaces.BACKGROUNDS)
    ]


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


def _describe_markdown(info: dict) -> str:
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in info.items())
    return f"| loaded | |\n|---|---|\n{rows}"


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


def build_app(pipeline: HyperDreamBoothPipeline) -> gr.Blocks:
    """The whole UI around `pipeline` (not launched; see `launch`)."""
    h = _Handlers(pipeline)
    info = pipeline.describe()
    examples = example_prompts()
    model = {"concurrency_id": MODEL, "concurrency_limit": 1}
    with gr.Blocks(title="hyperdiff · personalize Stable Diffusion from one photo") as demo:
        session = gr.State(Session())
        gr.HTML('<div class="hd-header"><h1>hyperdiff</h1><p>Personalize Stable Diffusion from one photo in seconds: a '
                "HyperDreamBooth-style hypernetwork predicts the LoRA, a short fine-tune refines it.</p></div>")
        gr.Markdown(HOW_TO, elem_classes="hd-howto")
        with gr.Accordion("Loaded models", open=False):
            gr.Markdown(_describe_markdown(info), elem_id="model-info")
            info_json = gr.JSON(info, visible=False)

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### 1 · Personalize")
                files = gr.File(label="Reference photo(s) — drag & drop", file_count="multiple", file_types=["image"],
                                type="filepath", height=140, elem_id="references")
                with gr.Accordion("Webcam or clipboard", open=False):
                    webcam = gr.Image(label="Snapshot (added to the references)", sources=["webcam", "clipboard"],
                                      type="filepath", format="png", elem_id="webcam")
                preview = gr.Gallery(label="What the encoder sees", format="png", object_fit="contain", height=180,
                                     allow_preview=False, elem_id="preview")
                with gr.Row():
                    token = gr.Textbox(TOKEN, label="Identifier token", max_lines=1, scale=1)
                    if pipeline.hypernet is not None:
                        ft_steps = gr.Slider(0, MAX_FINETUNE_STEPS, value=0, step=1, label="Fast fine-tune steps",
                                             info="0 = zero-shot (instant); 40 = the paper's fast fine-tune", scale=2,
                                             elem_id="ft-steps")
                    else:  # no hypernet: DreamBooth-LiDB from scratch, which needs steps
                        ft_steps = gr.Slider(0, MAX_FINETUNE_STEPS, value=NO_HYPERNET_STEPS, step=1, label="Fine-tune steps",
                                             info="no hypernet loaded: DreamBooth-LiDB from scratch (0 = error)", scale=2)
                with gr.Accordion("Advanced", open=False):
                    ft_seed = gr.Number(0, label="Fine-tune seed", precision=0, minimum=0, maximum=MAX_SEED)
                    ft_caption = gr.Textbox("", label="Reference caption (fine-tune only)", max_lines=1, elem_id="caption",
                                            placeholder="a {token} face, neutral, on a gray background",
                                            info="What the photos show besides the face: those words then stay with "
                                                 "their meaning instead of being learned into the token. Empty: "
                                                 + ("read from each photo (background, hat, expression)."
                                                    if pipeline.captioner is not None else "'a {token} face'."))
                with gr.Row():
                    personalize_btn = gr.Button("Personalize", variant="primary", elem_id="personalize-btn", scale=3)
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", scale=1)
                status = gr.Markdown("Drop one or more photos of the face to start.", elem_id="status")
                adapter_md = gr.Markdown(_adapter_summary(None), elem_id="adapter-info")

            with gr.Column(scale=3, min_width=420):
                with gr.Tabs():
                    with gr.Tab("2 · Generate", id="generate"):
                        prompt = gr.Textbox(examples[2], label="Prompt (use the token)", lines=2, elem_id="prompt")
                        negative = gr.Textbox("", label="Negative prompt", max_lines=1)
                        with gr.Row():
                            steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="gen-steps")
                            guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance")
                            num_images = gr.Slider(1, 8, value=2, step=1, label="Images")
                        with gr.Row(equal_height=True):
                            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=2)
                            randomize = gr.Checkbox(False, label="Random seed", scale=1)
                            reuse_btn = gr.Button("Reuse last seed", size="sm", scale=1)
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                        gallery = gr.Gallery(label="Images (PNG; caption = seed)", columns=4, format="png",
                                             object_fit="contain", elem_id="gallery")
                        gen_info = gr.Markdown("", elem_id="generate-info")
                        gr.Examples([[p] for p in examples], inputs=[prompt], label="Scene control: backgrounds, hat, expressions")

                    with gr.Tab("Uncertainty", id="uncertainty"):
                        gr.Markdown("N adapters sampled around the prediction for your references, one seed: where "
                                    "their images disagree is what the hypernet is unsure about.")
                        u_prompt = gr.Textbox(examples[0], label="Prompt", lines=1)
                        with gr.Row():
                            u_n = gr.Slider(2, 8, value=4, step=1, label="Samples N")
                            u_steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                            u_seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                        sample_btn = gr.Button("Sample adapters", variant="primary")
                        with gr.Row():
                            u_gallery = gr.Gallery(label="Sampled adapters", columns=4, height=240, format="png", scale=3,
                                                   elem_id="samples")
                            u_spread = gr.Image(label="Spread map", format="png", type="pil", height=240, scale=2,
                                                elem_id="spread")
                        u_info = gr.Markdown("", elem_id="sample-info")

                    with gr.Tab("Mix", id="mix"):
                        gr.Markdown("Two identities, one slider: the mix is the weighted sum of their weight deltas.")
                        with gr.Row():
                            mix_a = gr.Image(label="Identity A (empty: your references)", type="filepath", height=180)
                            mix_b = gr.Image(label="Identity B", type="filepath", height=180)
                        mix_w = gr.Slider(0, 1, value=0.5, step=0.05, label="Weight of B")
                        mix_prompt = gr.Textbox(examples[0], label="Prompt", lines=1)
                        with gr.Row():
                            mix_steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                            mix_seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                            mix_keep = gr.Checkbox(False, label="Make the mix my adapter")
                        mix_btn = gr.Button("Mix", variant="primary")
                        mix_gallery = gr.Gallery(label="A · mix · B", columns=3, height=240, format="png", elem_id="mix-gallery")
                        mix_info = gr.Markdown("", elem_id="mix-info")

                    with gr.Tab("Download", id="download"):
                        gr.Markdown("native = hyperdiff's compact file (`Adapter.load`); diffusers = "
                                    "`pipe.load_lora_weights`; kohya = A1111 / ComfyUI.")
                        fmt = gr.Radio(list(FILE_FORMATS), value="diffusers", label="Format", elem_id="format")
                        download_btn = gr.Button("Prepare file", variant="primary", elem_id="download-btn")
                        download_file = gr.File(label="Adapter file", interactive=False, elem_id="download-file")
                        download_parts = gr.File(label="A fine-tune's LoRA file, one file per schedule part",
                                                 interactive=False, file_count="multiple", elem_id="download-parts")
                        download_info = gr.Markdown("", elem_id="download-info")

        gr.on([files.change, webcam.change], h.references, [files, webcam, session], [preview, status, session],
              api_name="references")
        run = personalize_btn.click(h.personalize, [token, ft_steps, ft_seed, session, ft_caption], [status, adapter_md, session],
                                    api_name="personalize", **model)
        cancel_btn.click(h.cancel, None, status, cancels=[run], queue=False, api_name="cancel")
        gen_inputs = [prompt, negative, steps, guidance, seed, randomize, num_images, session]
        gr.on([generate_btn.click, prompt.submit], h.generate, gen_inputs, [gallery, gen_info, session],
              api_name="generate", **model)
        reuse_btn.click(h.reuse_seed, session, [seed, randomize], api_name="reuse_seed")
        sample_btn.click(h.sample, [u_prompt, u_n, u_steps, u_seed, session], [u_gallery, u_spread, u_info],
                         api_name="sample", **model)
        mix_btn.click(h.mix, [mix_a, mix_b, mix_w, mix_prompt, mix_steps, mix_seed, token, mix_keep, session],
                      [mix_gallery, mix_info, session], api_name="mix", **model)
        download_btn.click(h.download, [fmt, session], [download_file, download_parts, download_info, session],
                           api_name="download")
        demo.load(h.describe, None, info_json, api_name="describe")
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Start the server (blocking unless `prevent_thread_lock=True`); a busy port is a one-line error."""
    try:
        return demo.launch(server_name=host, server_port=port, theme=THEME, css=CSS, max_file_size=f"{MAX_MB}mb",
                           show_error=True, ssr_mode=False, mcp_server=False, **kwargs)
    except OSError as e:
        raise HyperdiffError(f"`--port` {port} on {host} cannot be used ({str(e).splitlines()[0]})") from None


def serve(host: str = "127.0.0.1", port: int = 7860, base: str | None = None, hypernet: str | None = None,
          device: str | None = None, dtype: str | None = None) -> None:
    """Load the pipeline (default: the embedded SynthFaces pair) and serve the UI until interrupted."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # a server's terminal: its own lines only, errors in one line
    transformers_logging.disable_progress_bar()
    pipeline = HyperDreamBoothPipeline.from_pretrained(base, hypernet, device=device, dtype=dtype)
    if pipeline.hypernet is None:
        print("hyperdiff ui: no hypernet for this base (pass --hypernet PATH): Personalize fine-tunes "
              "from scratch (DreamBooth-LiDB, fine-tune steps > 0)")
    print(f"hyperdiff ui: {pipeline.describe()}")
    launch(build_app(pipeline), host, port)


def main(argv: list[str] | None = None) -> int:
    """`python -m ui.app [flags]` = `hyperdiff ui [flags]` (one parser: hyperdiff.cli)."""
    import sys

    from hyperdiff.cli import main as cli_main

    return cli_main(["ui", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
