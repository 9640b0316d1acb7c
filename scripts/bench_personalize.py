"""Personalization benchmark: seconds to personalize and to generate on an SD1.5-shaped model (random weights), 512 px.

Builds the base (`build_pipeline("sd15")`: UNet, VAE, text encoder of SD1.5) and a hypernet with the architecture of
configs/sd15.yaml (CLIP ViT-H/14 image tower from `build_clip_vision`, 2-layer attention decoder, K = 2, LiDB a = 100
b = 50 r = 1 over the 128 attention Linears), saves them as a diffusers folder and a hypernet folder, and loads them
the way users do: `HyperDreamBoothPipeline.from_pretrained(folder, hypernet_folder, device, dtype)` (timed both
deferring the base, as zero-shot does, and loading it). Random weights
change no time (same shapes, same kernels). Then, side by side in one run (median of `--repeats`, the device
synchronised around each):
- zero-shot personalize: the hypernet's prediction from one reference;
- personalize + the fast fine-tune (`--finetune_steps`, LoRA rank 4 on top of the prediction);
- DreamBooth-LiDB from scratch (`--dreambooth_steps`; configs/sd15.yaml's stage 1 runs 400): timed once;
- one image of `--generate_steps` CFG steps: the base model, an adapter fused, the same adapter fused with a
  low-noise gain (the embedded hypernet's calibrated one: one re-fuse per image), an adapter through the processors.
Prints the table with ratios to DreamBooth-LiDB and writes JSON.
Usage: python scripts/bench_personalize.py --device cuda --out bench/personalize_cuda.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # before diffusers is imported
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from hyperdiff import HyperNetwork, LayerTable  # noqa: E402
from hyperdiff import synthfaces  # noqa: E402
from hyperdiff.config import load_config  # noqa: E402
from hyperdiff.hypernet.training import HypernetTrainConfig  # noqa: E402
from hyperdiff.models.configs import VISION_NAMES, build_clip_vision, build_pipeline  # noqa: E402
from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET, HyperDreamBoothPipeline  # noqa: E402

from _bench import checked_out, describe_device, device_and_dtype, positive_int, time_calls, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks person, smiling, on a red background"


def build_folders(tmp: Path, device: torch.device, dtype: torch.dtype, vision: str) -> tuple[Path, Path]:
    """Random-weight SD1.5 pipeline folder and a configs/sd15.yaml hypernet folder, written like real ones (the
    weights are initialised on `device`: a GPU does it in seconds)."""
    base = tmp / "sd15"
    build_pipeline("sd15", device=device, seed=0, dtype=dtype).save_pretrained(base, safe_serialization=True)
    tower, processor = build_clip_vision(vision, device=device, seed=1)
    tower.save_pretrained(tmp / "clip")
    processor.save_pretrained(tmp / "clip")
    config = load_config(HypernetTrainConfig, ROOT / "configs" / "sd15.yaml").hypernet
    config = replace(config, encoder=replace(config.encoder, pretrained=str(tmp / "clip")))
    table = LayerTable.from_unet(build_pipeline("sd15").unet)  # meta device: the layer table needs shapes only
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        hypernet = HyperNetwork(config, table, info={"name": "random sd15 hypernet (benchmark)"})
    hypernet.save_pretrained(tmp / "hypernet")
    return base, tmp / "hypernet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/personalize.json", help="JSON output path")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on a GPU, float32 on cpu)")
    parser.add_argument("--finetune_steps", type=positive_int, default=40, help="fast fine-tune steps (default: %(default)s)")
    parser.add_argument("--dreambooth_steps", type=positive_int, default=400, help="DreamBooth-LiDB steps (default: %(default)s)")
    parser.add_argument("--generate_steps", type=positive_int, default=25, help="denoising steps per image (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="repeats of each timed call but DreamBooth (default: %(default)s)")
    parser.add_argument("--vision", default="clip-vit-h-14", choices=VISION_NAMES,
                        help="hypernet image tower (default: %(default)s)")
    args = parser.parse_args()
    device, dtype = device_and_dtype(parser, args.device, args.dtype)
    out = checked_out(parser, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        base, hypernet = build_folders(Path(tmp), device, dtype, args.vision)
        built = time.perf_counter() - start
        print(f"built and saved the random SD1.5 base and hypernet in {built:.1f} s", flush=True)
        start = time.perf_counter()  # what zero-shot loads: the hypernet and the base's header, not the base
        deferred = HyperDreamBoothPipeline.from_pretrained(str(base), hypernet, device=device, dtype=dtype)
        loaded_deferred = time.perf_counter() - start
        start = time.perf_counter()
        hdb = HyperDreamBoothPipeline.from_pretrained(str(base), hypernet, device=device, dtype=dtype, defer_base=False)
        loaded = time.perf_counter() - start
        del deferred
    bare = HyperDreamBoothPipeline(hdb.pipe, None, base_name=hdb.base_name)  # the same base, no hypernet
    print(f"loaded in {loaded:.1f} s (for zero-shot only, the base deferred: {loaded_deferred:.1f} s): {hdb.describe()}",
          flush=True)
    size = hdb.pipe.unet.config.sample_size * hdb.pipe.vae_scale_factor  # 512: SD1.5 trains and samples there
    reference = synthfaces.render(synthfaces.Identity.from_seed(1_000_000), synthfaces.Scene("gray", False, "neutral"), size)

    def zero_shot():
        return hdb.personalize([reference])

    def fast_finetune():
        return hdb.personalize([reference], finetune_steps=args.finetune_steps)

    adapter = zero_shot()  # warm-up: kernels, cuDNN plans, the aux bases' cache
    hdb.personalize([reference], finetune_steps=2)
    bare.personalize([reference], finetune_steps=2)
    seconds = {
        "zero_shot": time_calls(zero_shot, args.repeats, device),
        "zero_shot_plus_finetune": time_calls(fast_finetune, args.repeats, device),
        "dreambooth_lidb": time_calls(lambda: bare.personalize([reference], finetune_steps=args.dreambooth_steps), 1, device),
    }
    tuned = fast_finetune()
    shipped_gain = HyperNetwork.read_config(EMBEDDED_HYPERNET).low_noise  # follows its calibration
    hdb.generate(PROMPT, adapter, steps=2)  # warm-up of the sampling loop
    seconds |= {
        "generate_base": time_calls(lambda: hdb.generate(PROMPT, None, steps=args.generate_steps), args.repeats, device),
        "generate_fused": time_calls(lambda: hdb.generate(PROMPT, tuned, steps=args.generate_steps), args.repeats, device),
        "generate_fused_low_noise": time_calls(lambda: hdb.generate(PROMPT, tuned, steps=args.generate_steps,
                                                                     low_noise=shipped_gain), args.repeats, device),
        "generate_processors": time_calls(lambda: hdb.generate(PROMPT, [tuned], steps=args.generate_steps), args.repeats, device),
    }
    median = {k: statistics.median(v) for k, v in seconds.items()}
    db = median["dreambooth_lidb"]
    result = {
        **describe_device(device),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "base": "sd15 (random weights)",
        "hypernet": f"configs/sd15.yaml, {args.vision} (random weights)",
        "size": size,
        "finetune_steps": args.finetune_steps,
        "dreambooth_steps": args.dreambooth_steps,
        "generate_steps": args.generate_steps,
        "low_noise": {"gain": shipped_gain.gain, "below": shipped_gain.below},  # the generate_fused_low_noise row's
        "load_s": loaded,
        "load_deferred_s": loaded_deferred,
        "seconds": seconds,
        "median_s": median,
        "over_dreambooth": {k: median[k] / db for k in ("zero_shot", "zero_shot_plus_finetune")},
        "dreambooth_s_per_step": db / args.dreambooth_steps,
        "finetune_s_per_step": (median["zero_shot_plus_finetune"] - median["zero_shot"]) / args.finetune_steps,
    }
    write_json(out, result)

    where = result.get("gpu") or f"{result['threads']} CPU threads"
    print(f"\nSD1.5-shaped personalization, {size} px, {result['dtype']}, {where} (median of {args.repeats}; DreamBooth once):")
    rows = [("hypernet zero-shot", "zero_shot"), (f"hypernet + {args.finetune_steps}-step fast fine-tune", "zero_shot_plus_finetune"),
            (f"DreamBooth-LiDB, {args.dreambooth_steps} steps", "dreambooth_lidb")]
    for label, key in rows:
        print(f"  {label:<40} {median[key]:9.3f} s   {median[key] / db:.4f}x DreamBooth-LiDB")
    print(f"one image, {args.generate_steps} steps with guidance:")
    for key in ("generate_base", "generate_fused", "generate_fused_low_noise", "generate_processors"):
        print(f"  {key[9:]:<40} {median[key]:9.3f} s   {median[key] / median['generate_base']:.3f}x base")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
