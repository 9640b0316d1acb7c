"""The `hyperdiff` command line.

Contract (DESIGN.md, "CLI"): subcommands map one-to-one onto library calls; the CLI holds no model logic.
Exit code 0 on success; 2 on bad input, with one line `hyperdiff: error: <what input, what was wrong, what was
expected>` on stderr, the last line, alone, and no traceback (argparse's own usage errors also exit 2); a soft problem
(a warning) is one line `hyperdiff: warning: <what>` on stderr. Every argument and input file is checked before any
model loads (`hyperdiff.inputs`, which imports no torch: bad numbers, words, paths and images are answered at once).
The libraries' progress bars, logs and warnings stay off stderr unless `--verbose`; long work (fine-tune steps,
denoising) shows the CLI's own progress bar on a line of its own, erased when it ends, also on an error. Outputs are
written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from hyperdiff import inputs
from hyperdiff.errors import HyperdiffError


def _safetensors_out(out: Path) -> Path:
    inputs.check_writable(out, "`--out`")
    if out.suffix != ".safetensors":
        raise HyperdiffError(f"`--out` '{out}' must end with .safetensors")
    return out


def _quiet_libraries(verbose: bool) -> None:
    """Before models load: the libraries' loading bars and logs off the user's terminal unless `--verbose`."""
    if not verbose:
        from hyperdiff.models.sources import quiet_loading

        quiet_loading()


def _progress(total: int, desc: str):
    """The CLI's own bar on stderr: a line of its own, erased when it closes (`with` closes it on an error too)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not total, leave=False, file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> None:
    _safetensors_out(Path(args.out))  # --split writes beside it, under its name
    inputs.read_header(args.adapter, "adapter file")
    from hyperdiff.core.adapter import Adapter

    adapter = Adapter.load(args.adapter)
    if not args.split:
        path = adapter.export(args.out, format=args.format)
        print(f"wrote {args.format} LoRA ({adapter.kind} adapter, rank {adapter.rank}, alpha {adapter.alpha:g}) to {path}")
        return
    from hyperdiff.core.formats import file_schedule

    paths = adapter.export_parts(args.out, format=args.format)
    for i, path in enumerate(paths, 1):  # each file's schedule as the file says it
        print(f"wrote {args.format} LoRA part {i} of {len(paths)} (samples with {file_schedule(path).describe()}) to {path}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    inputs.read_header(args.adapter, "adapter file")
    from hyperdiff.core.adapter import Adapter

    ad = Adapter.load(args.adapter)
    size = Path(args.adapter).stat().st_size
    rows = [
        ("kind", ad.kind),
        ("layers", str(len(ad.factors))),
        ("rank", str(ad.rank)),
        ("alpha", f"{ad.alpha:g} (scale {ad.scale:g})"),
        ("values", f"{ad.num_values:,}"),
        ("file size", f"{size:,} bytes"),
        ("base fingerprint", ad.fingerprint),
        ("base model", ad.info.base_model or "-"),
        ("architecture", ad.info.architecture),
        ("token", ad.info.token or "-"),
        ("source", ad.info.source or "-"),
        ("low-noise schedule", ad.info.describe_schedule()),
    ]
    if ad.lidb:
        rows.insert(3, ("lidb", f"a={ad.lidb.a} b={ad.lidb.b} aux_seed={ad.lidb.aux_seed}"))
    for key, value in rows:
        print(f"{key:>17}: {value}")


def _check_models(args: argparse.Namespace) -> None:
    inputs.check_device_name(args.device)
    inputs.check_dtype_name(args.dtype)
    hypernet = getattr(args, "hypernet", None)
    if hypernet is not None and not (Path(hypernet) / "config.json").is_file():  # read whole when the models load
        raise HyperdiffError(f"`--hypernet` '{hypernet}' has no config.json: expected a folder written by save_pretrained")


def _cmd_personalize(args: argparse.Namespace) -> None:
    out = _safetensors_out(Path(args.out))
    inputs.check_personalize(args.finetune_steps, args.token, args.seed)
    _check_models(args)
    images = inputs.load_images(args.image)
    caption = args.caption
    if caption is not None and len(caption) not in (1, len(images)):
        raise HyperdiffError(f"`--caption` must be given once (for every image) or once per --image ({len(images)}), "
                             f"got {len(caption)}")
    if caption is not None and len(caption) == 1:
        caption = caption[0]
    inputs.check_captions(caption, len(images), args.token)
    _quiet_libraries(args.verbose)
    from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline, caption_record

    start = time.perf_counter()
    hdb = HyperDreamBoothPipeline.from_pretrained(args.base, args.hypernet, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()
    with _progress(args.finetune_steps, "fine-tune") as bar:
        adapter = hdb.personalize(images, token=args.token, finetune_steps=args.finetune_steps, seed=args.seed,
                                  callback=lambda step, loss: bar.update(1), caption=caption)
    done = time.perf_counter()
    adapter.save(out)
    print(f"personalized {len(images)} reference image(s) in {done - loaded:.2f} s (models loaded in {loaded - start:.1f} s): "
          f"{adapter.kind} adapter, rank {adapter.rank}, {adapter.num_values:,} values -> {out}")
    if caption_record(adapter):  # what the fine-tune was told, read from the references or typed
        print(f"fine-tuned on {caption_record(adapter)}")
    print(f'use it: hyperdiff generate --adapter {out} --prompt "a {args.token} face ..." --out DIR')


def _cmd_generate(args: argparse.Namespace) -> None:
    inputs.check_generate(args.prompt, args.num_images, args.steps, args.guidance, args.strength, args.seed,
                          args.negative_prompt)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HyperdiffError(f"`--out` '{out}' is a file, expected a folder for the PNG images")
    inputs.check_writable(out / "image.png", "`--out`")
    _check_models(args)
    inputs.read_header(args.adapter, "adapter file")
    from hyperdiff.core.adapter import Adapter
    from hyperdiff.core.schedule import LowNoiseGain

    adapter = Adapter.load(args.adapter)
    low = adapter.info.low_noise
    given = {k: v for k, v in (("gain", args.low_noise_gain), ("below", args.low_noise_below),
                                ("off_from", args.low_noise_off_from)) if v is not None}
    if given:
        low = LowNoiseGain(**{**low.to_dict(), **given})
    _quiet_libraries(args.verbose)
    from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline
    from hyperdiff.synthfaces.sheet import save_png

    hdb = HyperDreamBoothPipeline.from_pretrained(args.base, load_hypernet=False, device=args.device, dtype=args.dtype)
    adapter.check_table(hdb.table)
    start = time.perf_counter()
    with _progress(args.steps, "generate") as bar:  # one tick per denoising step, through diffusers' step callback
        images = hdb.generate(args.prompt, adapter, negative_prompt=args.negative_prompt, num_images=args.num_images,
                              steps=args.steps, guidance=args.guidance, seed=args.seed, strength=args.strength,
                              low_noise=low, on_step=lambda step: bar.update(1))
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_png(im, out / f"{Path(args.adapter).stem}_seed{args.seed + i}.png") for i, im in enumerate(images)]
    print(f"generated {len(paths)} image(s) in {seconds:.2f} s:")
    for p in paths:
        print(f"  {p}")


def _cmd_demo(args: argparse.Namespace) -> None:
    inputs.check_writable(Path(args.out) / "sheet.png", "`--out`")
    _check_models(args)
    _quiet_libraries(args.verbose)
    from hyperdiff.synthfaces.demo import run_demo

    run_demo(Path(args.out), base=args.base, hypernet=args.hypernet, device=args.device, dtype=args.dtype)


def _cmd_ui(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise HyperdiffError(f"`--port` must be an integer in [1, 65535], got {args.port}")
    _check_models(args)
    from ui.app import serve

    serve(args.host, args.port, base=args.base, hypernet=args.hypernet, device=args.device, dtype=args.dtype,
          verbose=args.verbose)


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="also show the libraries' progress bars, logs and warnings")
    p.add_argument("--device", help="where the models run: cpu, cuda, cuda:N or mps (default: cuda, else mps, else cpu)")
    p.add_argument("--dtype", help="weights' precision: float32, float16 or bfloat16 (default: float16 on a GPU, "
                   "float32 on cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperdiff",
        description="Personalize Stable Diffusion from one photo: hypernetwork-predicted LiDB adapters, exact "
        "injection, and LoRA files that diffusers, A1111 and ComfyUI load.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("personalize", help="predict an adapter from reference image(s), optionally fast fine-tune it")
    p.add_argument("--image", action="append", required=True, metavar="REF.png",
                   help="reference image of the identity (repeat for several; their features are averaged)")
    p.add_argument("--out", required=True, help="native adapter file to write (.safetensors, written atomically)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="rank-relaxed fast fine-tune steps on top of the prediction (0 = zero-shot; paper: 40; on "
                   "the embedded SynthFaces base it also trains against the identity encoder, and its adapter samples "
                   "with a low-noise gain that `inspect` shows); without a hypernet, DreamBooth-LiDB steps from "
                   "scratch (300-600 on SynthFaces)")
    p.add_argument("--token", default="sks", help="identifier word to use in prompts (default: %(default)s)")
    p.add_argument("--caption", action="append", metavar="TEXT",
                   help="what the reference shows, for the fine-tune, the subject named by the token or {token} (e.g. "
                   "\"a {token} face, neutral, on a gray background\"): the words keep the photo's background, hat "
                   "and expression out of the token. Once for every image, or once per --image in order. Default: on "
                   "the embedded SynthFaces base, read from each reference by its detectors; on another base \"a "
                   "{token} face\" (pass \"a {token} face\" to fine-tune without a caption)")
    p.add_argument("--base", help="base model: diffusers folder, .safetensors file or hub id (default: embedded SynthFaces)")
    p.add_argument("--hypernet", help="hypernet folder made by save_pretrained (default: the embedded SynthFaces one "
                   "when shipped; none for another --base)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tune (default: %(default)s)")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_personalize)

    p = sub.add_parser("generate", help="generate PNG images with an adapter")
    p.add_argument("--adapter", required=True, help="native hyperdiff adapter (.safetensors)")
    p.add_argument("--prompt", required=True, help='prompt naming the token, e.g. "a sks face, smiling, on a blue background"')
    p.add_argument("--out", required=True, help="folder for the PNG files (created if missing)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate; image i uses seed S+i (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--strength", type=float, default=1.0, help="multiplier of the adapter's weight delta, in [-10, 10] (default: %(default)s)")
    p.add_argument("--low-noise-gain", type=float, default=None,
                   help="extra multiplier of the weight delta at the low-noise timesteps below --low-noise-below, where "
                        "sampling draws a face's detail (default: the adapter's own, which a calibrated hypernet sets; "
                        "1 = one strength throughout, as an exported LoRA file samples)")
    p.add_argument("--low-noise-below", type=int, default=None,
                   help="timestep in [0, 1000] below which --low-noise-gain applies (default: the adapter's own)")
    p.add_argument("--low-noise-off-from", type=int, default=None,
                   help="timestep in [--low-noise-below, 1000] from which the weight delta is off, keeping it out of the "
                        "high-noise steps that lay out the scene (default: the adapter's own; 1000 = never off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    p.add_argument("--base", help="base model the adapter was made for (default: embedded SynthFaces)")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="convert a native adapter into a LoRA file other tools load")
    p.add_argument("adapter", help="native hyperdiff adapter (.safetensors)")
    p.add_argument("--format", required=True, choices=["diffusers", "kohya"],
                   help="diffusers: for pipe.load_lora_weights (PEFT keys + LoraConfig metadata); "
                   "kohya: lora_unet_* keys with per-module alpha, for A1111 and ComfyUI")
    p.add_argument("--out", required=True, help="output .safetensors path (written atomically)")
    p.add_argument("--split", action="store_true",
                   help="one file per schedule part, OUT's name + -part1, -part2, ...: a fine-tuned adapter's start and "
                        "learned part sample with their own low-noise schedules, which one LoRA weight per step cannot "
                        "give; load each under its own adapter name and sample them with "
                        "hyperdiff.schedule.diffusers_schedule (an adapter with one schedule gives one part)")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' warnings")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect", help="print what a native adapter file holds")
    p.add_argument("adapter", help="native hyperdiff adapter (.safetensors)")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' warnings")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("ui", help="serve the web UI (Gradio): personalize, generate, uncertainty, mix, download",
                       description="Serve the hyperdiff web UI until interrupted (Ctrl-C). Offline; each browser "
                       "session keeps its own references, adapters and images; model calls run one at a time.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 serves your network, not only this machine (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--base", help="base model: diffusers folder, .safetensors file or hub id (default: embedded SynthFaces)")
    p.add_argument("--hypernet", help="hypernet folder made by save_pretrained, for --base (default: the embedded "
                   "SynthFaces hypernet with the embedded base, none with --base alone; without one, Personalize "
                   "fine-tunes from scratch: DreamBooth-LiDB)")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("demo", help="run the main job on the embedded default, offline")
    p.add_argument("--out", default="outputs/demo", help="folder for the images, sheet and adapters (default: %(default)s)")
    p.add_argument("--base", help="run the demo on another base (default: the embedded SynthFaces base)")
    p.add_argument("--hypernet", help="hypernet for --base (default: the embedded one; none = fine-tuning)")
    _add_device_flags(p)
    p.set_defaults(func=_cmd_demo)
    return parser


HYPERDIFF_DIR = str(Path(__file__).resolve().parent)


def _warning_printer(verbose: bool):
    """`warnings.showwarning` for the CLI: a warning hyperdiff raises is one line on stderr; the libraries' only
    with `--verbose`."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if verbose or str(Path(filename).resolve()).startswith(HYPERDIFF_DIR):
            print(f"hyperdiff: warning: {message}", file=sys.stderr)
    return show


def main(argv: list[str] | None = None) -> int:
    # An application, not a library: keep the libraries' import-time chatter (optional torchvision backends,
    # "no LoRA keys for the text encoder") off the user's terminal unless they ask for it.
    args = build_parser().parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        with warnings.catch_warnings():  # a soft problem is one line on stderr, like an error (restored on exit)
            warnings.simplefilter("default")
            warnings.showwarning = _warning_printer(args.verbose)
            args.func(args)
    except HyperdiffError as e:
        print(f"hyperdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hyperdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
