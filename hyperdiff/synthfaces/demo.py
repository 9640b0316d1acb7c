"""`hyperdiff demo`: the main job on the embedded default, offline, saying what it did and how long each step took.

Contract: personalizes a few held-out SynthFaces identities (evaluation seeds, never trained on) from one reference
render each, generates them in new scenes, writes a contact sheet PNG (reference | zero-shot | + fast fine-tune | base model |
truth, or reference | DreamBooth-LiDB | base model | truth without a hypernet; one row per identity and scene; the
truth is the world's own render of that identity in the prompted scene, what every column should move toward), the
native adapters and their diffusers/kohya exports, checks that vanilla diffusers' `load_lora_weights` of the export
gives the image hyperdiff's own injection gives, and prints where everything is and each step's time. Returns a
summary dict. Deterministic for a given seed.

What runs depends on what is shipped (or passed), and the demo says which:
- base + hypernet (the product): zero-shot hypernet prediction, then the 40-step rank-relaxed fine-tune, with the
  defaults a user gets (no caption typed: the embedded base reads it from the reference);
- base only: DreamBooth-LiDB fine-tuning from scratch (`dreambooth_steps` of the pipeline's no-hypernet
  `personalize`; no zero-shot column).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from hyperdiff import synthfaces
from hyperdiff.core.adapter import Adapter
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.personalize.pipeline import caption_record
from hyperdiff.synthfaces.sheet import contact_sheet, save_png

SCENES = (synthfaces.Scene("red", False, "smiling"), synthfaces.Scene("blue", True, "surprised"))
# one reference per identity, in turn: coloured backgrounds and a hat, as a user's photo shows some scene
REFERENCE_SCENES = (synthfaces.Scene("green", False, "neutral"), synthfaces.Scene("yellow", True, "sad"))
TOKEN = "sks"  # the identifier every adapter is personalized with and every prompt names


@contextmanager
def _step(timings: dict, name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _load(base: str | None, hypernet: str | None, device, dtype):
    """(pipeline, what is running): the arguments, else the embedded base with its hypernet when one is shipped."""
    from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline

    hdb = HyperDreamBoothPipeline.from_pretrained(base, hypernet, device=device, dtype=dtype)
    if hdb.hypernet is None:
        return hdb, f"base {hdb.base_name}; no hypernet given for it, so identities are fine-tuned (DreamBooth-LiDB)"
    return hdb, f"base {hdb.base_name} + hypernet {hdb.hypernet_name}"


def run_demo(out: Path, seed: int = 0, identities: int = 2, base: str | None = None, hypernet: str | None = None,
             finetune_steps: int = 40, steps: int = 20, dreambooth_steps: int = 300, device=None, dtype=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _step(timings, "load models"):
        hdb, what = _load(base, hypernet, device, dtype)
    info = hdb.describe()
    print(f"hyperdiff demo: {what}, on {info['device']} in {info['dtype']}")
    size = hdb.pipe.unet.config.sample_size * hdb.pipe.vae_scale_factor
    seeds = list(synthfaces.eval_seeds(identities))
    refs = [synthfaces.render(synthfaces.Identity.from_seed(s), REFERENCE_SCENES[i % len(REFERENCE_SCENES)], size)
            for i, s in enumerate(seeds)]
    # column title -> fine-tune steps, all through `personalize` with its defaults (the call the CLI and the UI make:
    # on the embedded base the fine-tune reads the reference's caption, so its scene stays out of the token)
    if hdb.hypernet is not None:
        plan = {"zero-shot": 0, f"+{finetune_steps}-step ft": finetune_steps}
    else:
        plan = {f"DreamBooth-LiDB {dreambooth_steps} steps": dreambooth_steps}
    columns: dict[str, list[Adapter | None]] = {}
    for title, n in plan.items():
        with _step(timings, f"personalize {identities} identities: {title}"):
            columns[title] = [hdb.personalize([r], token=TOKEN, finetune_steps=n, seed=seed) for r in refs]
    columns["base model"] = [None] * identities

    rows, files = [], {}
    for i, (ref, s) in enumerate(zip(refs, seeds)):
        for k, scene in enumerate(SCENES):
            prompt = synthfaces.caption(scene, TOKEN)
            row = [ref]
            with _step(timings, "generate"):
                for adapters in columns.values():
                    row += hdb.generate(prompt, adapters[i], steps=steps, seed=seed + 100 * i + k)
            rows.append(row + [synthfaces.render(synthfaces.Identity.from_seed(s), scene, size)])  # the truth
        best = list(columns.values())[-2][i]  # the most personalized column (the last before "base model")
        with _step(timings, "save + export adapters"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once below: a LoRA file cannot carry the low-noise gain
            files[s] = {"native": best.save(out / f"identity{s}.safetensors"), "told": caption_record(best)}
            files[s].update({f: best.export(out / f"identity{s}.{f}.safetensors", f) for f in ("diffusers", "kohya")})
    titles = ["reference", *columns, "truth"]
    sheet = save_png(contact_sheet(rows, titles, cell=128), out / "sheet.png")

    with _step(timings, "vanilla diffusers load_lora_weights check"):
        diff = _vanilla_check(hdb, list(columns.values())[-2][0], files[seeds[0]]["diffusers"], steps, seed)
    print(f"\nwrote {sheet}: rows = {identities} held-out identities x {len(SCENES)} new scenes; columns = {' | '.join(titles)}")
    for s, f in files.items():
        print(f"identity {s}: {f['native']} (+ .diffusers / .kohya exports)")
        if f["told"]:
            print(f"identity {s}: fine-tuned on {f['told']}")
    for title, ads in columns.items():
        if ads[0] is not None and ads[0].info.scheduled:
            how = ("one file per part: hyperdiff export --split" if ads[0].info.rank_schedules
                   else "hyperdiff.schedule.diffusers_schedule")
            print(f"the {title} adapters apply ΔW {ads[0].info.describe_schedule()}; LoRA loaders apply one strength "
                  f"unless given the schedule ({how})")
    print(f"vanilla diffusers load_lora_weights(export) vs hyperdiff's injection: max pixel difference {diff:.1e}")
    print("\nstep times:")
    for name, seconds in timings.items():
        print(f"  {seconds:7.2f} s  {name}")
    return {"out": str(out), "what": what, "timings": timings, "vanilla_max_diff": diff, "sheet": str(sheet)}


def _vanilla_check(hdb, adapter: Adapter, export: Path, steps: int, seed: int) -> float:
    """The exported file through plain diffusers (PEFT) against hyperdiff's fused adapter, both at one strength (a
    LoRA file's ΔW; the schedules' own test is tests/test_schedule.py): same prompt, same noise."""
    import copy

    prompt = synthfaces.caption(SCENES[0], TOKEN)
    ours = hdb.generate(prompt, adapter, steps=steps, seed=seed, low_noise=LowNoiseGain())[0]
    vanilla = copy.deepcopy(hdb.pipe)
    vanilla.load_lora_weights(str(export), adapter_name="id")
    theirs = vanilla(prompt, num_inference_steps=steps, guidance_scale=4.0,
                     generator=torch.Generator().manual_seed(seed)).images[0]
    a = torch.tensor(bytearray(ours.tobytes()), dtype=torch.float32)
    b = torch.tensor(bytearray(theirs.tobytes()), dtype=torch.float32)
    return float((a - b).abs().max() / 255)
