"""The hyperdiff web UI: personalize from reference photos, generate, see the uncertainty, mix identities, download.

Contract:
- `build_app(pipeline) -> gr.Blocks` builds the whole UI, with its bounded queue, around one loaded
  `HyperDreamBoothPipeline`. The UI holds no model logic: its event handlers (`ui.handlers`) make the calls the CLI
  makes, so the two cannot disagree.
- One model call at a time: `generate` fuses the adapter into the one shared UNet, so every pipeline call runs under
  one lock, and the queue runs model events one at a time (`concurrency_id="model"`), at most `MAX_QUEUE` waiting.
- Endpoints (`api_name`): /references, /personalize, /cancel, /generate, /reuse_seed, /sample, /mix, /download,
  /describe. Generated images are PNG (lossless), captioned with their seed (image i uses seed + i).
- `launch(demo, host, port, **kw)` adds the theme and the upload limit and starts the server; `serve(...)` loads the
  pipeline and launches: the `hyperdiff ui` command, which parses the flags, is how the UI starts.
"""

from __future__ import annotations

import gradio as gr

from hyperdiff import synthfaces
from hyperdiff.core.formats import FILE_FORMATS
from hyperdiff.errors import HyperdiffError
from hyperdiff.models.sources import quiet_loading
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline
from ui.handlers import MAX_FINETUNE_STEPS, MAX_MB, MAX_SEED, Session, _adapter_summary, _Handlers

MAX_QUEUE = 16  # model requests waiting at most; more get "queue full"
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


def _describe_markdown(info: dict) -> str:
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in info.items())
    return f"| loaded | |\n|---|---|\n{rows}"


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
          device: str | None = None, dtype: str | None = None, verbose: bool = False) -> None:
    """Load the pipeline (default: the embedded SynthFaces pair) and serve the UI until interrupted; a server's
    terminal shows its own lines only, the libraries' loading bars too with `verbose`."""
    if not verbose:
        quiet_loading()
    pipeline = HyperDreamBoothPipeline.from_pretrained(base, hypernet, device=device, dtype=dtype, defer_base=False)
    if pipeline.hypernet is None:
        print("hyperdiff ui: no hypernet for this base (pass --hypernet PATH): Personalize fine-tunes "
              "from scratch (DreamBooth-LiDB, fine-tune steps > 0)")
    print(f"hyperdiff ui: {pipeline.describe()}")
    launch(build_app(pipeline), host, port)
