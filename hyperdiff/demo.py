"""`hyperdiff demo`: the main job on the embedded default, offline, with what it did and how long each step took.

Contract: writes into `out` a contact sheet PNG, the generated PNGs and the adapter files, prints where they are
and each step's time, and returns a summary dict. Deterministic for a given `seed`.

Until the embedded SynthFaces base model and hypernet ship (issues 3-5), the best main job available is the core
machinery end to end on the offline tiny pipeline (untrained, so its images are texture, not faces): two seeded
LiDB adapters stand in for hypernet predictions; each is injected through the processors, fused, saved natively,
exported to diffusers and kohya LoRA files, and those files are loaded by vanilla diffusers' `load_lora_weights`
to show that every path gives the same image.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from hyperdiff.adapter import Adapter
from hyperdiff.layers import LayerTable
from hyperdiff.random_adapters import random_lidb
from hyperdiff.sheet import contact_sheet, save_png

PROMPT = "a sks face, smiling, on a blue background"


@contextmanager
def _step(timings: dict, name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _generate(pipe, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=8, guidance_scale=4.0, generator=gen, output_type="pt").images[0]


def _to_pil(image: torch.Tensor):
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(image.permute(1, 2, 0)[None].numpy())[0]


def run_demo(out: Path, seed: int = 0) -> dict:
    from hyperdiff.models import tiny_pipeline

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    print("hyperdiff demo: the embedded SynthFaces base and hypernet are not shipped yet, so this runs the core")
    print("machinery end to end on the offline tiny pipeline (untrained: its images are texture, not faces).")
    with _step(timings, "build tiny pipeline"):
        pipe = tiny_pipeline(seed=seed)
        table = LayerTable.from_unet(pipe.unet)
    with _step(timings, "make 2 LiDB adapters"):
        adapters = [random_lidb(table, seed=seed + i, token="sks") for i in (1, 2)]
    rows, diffs = [], {}
    for i, ad in enumerate(adapters):
        name = f"identity{i + 1}"
        with _step(timings, f"{name}: base image"):
            base = _generate(pipe, seed)
        with _step(timings, f"{name}: injected (processors)"), ad.applied(pipe.unet):
            injected = _generate(pipe, seed)
        with _step(timings, f"{name}: fuse + generate + unfuse"):
            ad.fuse(pipe.unet)
            fused = _generate(pipe, seed)
            ad.unfuse(pipe.unet)
        with _step(timings, f"{name}: save native + export diffusers, kohya"):
            native = ad.save(out / f"{name}.safetensors")
            exports = {fmt: ad.export(out / f"{name}.{fmt}.safetensors", fmt) for fmt in ("diffusers", "kohya")}
        loaded = {}
        with _step(timings, f"{name}: vanilla diffusers load_lora_weights x2"):
            for fmt, path in exports.items():
                vanilla = tiny_pipeline(seed=seed)
                vanilla.load_lora_weights(str(path))
                loaded[fmt] = _generate(vanilla, seed)
        assert Adapter.load(native, table).num_values == ad.num_values
        diffs[name] = {
            "fused_vs_injected": float((fused - injected).abs().max()),
            "diffusers_file_vs_injected": float((loaded["diffusers"] - injected).abs().max()),
            "kohya_file_vs_injected": float((loaded["kohya"] - injected).abs().max()),
            "adapter_vs_base": float((injected - base).abs().max()),
        }
        rows.append([_to_pil(x) for x in (base, injected, fused, loaded["diffusers"], loaded["kohya"])])
        for label, img in zip(("base", "injected", "fused"), rows[-1]):
            save_png(img, out / f"{name}_{label}.png")
    sheet = save_png(contact_sheet(rows, ["base", "injected", "fused", "diffusers file", "kohya file"]), out / "sheet.png")

    print(f"\nwrote {sheet} (rows: 2 identities; columns: base | injected | fused | diffusers file | kohya file)")
    print(f"adapters: {out}/identity*.safetensors (native LiDB, {adapters[0].num_values:,} values) + .diffusers/.kohya exports")
    for name, d in diffs.items():
        print(f"{name}: max |Δ| fused vs injected {d['fused_vs_injected']:.1e}, diffusers file {d['diffusers_file_vs_injected']:.1e}, "
              f"kohya file {d['kohya_file_vs_injected']:.1e}; adapter vs base {d['adapter_vs_base']:.2f}")
    print("\nstep times:")
    for step, seconds in timings.items():
        print(f"  {seconds:7.2f} s  {step}")
    return {"out": str(out), "diffs": diffs, "timings": timings}
