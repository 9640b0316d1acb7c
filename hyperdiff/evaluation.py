"""Evaluation on the SynthFaces world: the base-model report.

Contract: `evaluate_base(pipe, per_scene, seed, steps, guidance)` generates `per_scene` images for every one of the
48 scenes from its caption (no identifier token), checks each with `metrics.scene_fidelity`, and measures identity
diversity with the shipped identity encoder: the mean pairwise similarity of generations of one prompt across seeds,
beside the same-identity and different-identity levels of real renders of evaluation identities (seeds ≥ 1,000,000).
Returns a JSON-ready dict and a sample grid (rows: backgrounds; columns: hat × expression).
`write_report(result, grid, out)` writes `base_report.json`, `base_report.md` and `base_grid.png` atomically.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from hyperdiff.data import synthfaces
from hyperdiff.files import atomic_path
from hyperdiff.metrics import SCENE_CHECKS as WORDS, default_encoder, scene_fidelity
from hyperdiff.sheet import contact_sheet, save_png


def _generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[Image.Image]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil").images


def _mean_offdiag(sim: torch.Tensor) -> float:
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def identity_levels(n_identities: int = 24, size: int = 64) -> dict[str, float]:
    """Same- and different-identity similarity of real renders of evaluation identities in random scenes."""
    enc = default_encoder()
    gen = torch.Generator().manual_seed(0)
    scenes = list(synthfaces.all_scenes())
    a, b = [], []
    for seed in synthfaces.eval_seeds(n_identities):
        identity = synthfaces.Identity.from_seed(seed)
        i, j = torch.randperm(len(scenes), generator=gen)[:2].tolist()
        a.append(synthfaces.render(identity, scenes[i], size))
        b.append(synthfaces.render(identity, scenes[j], size))
    ea, eb = enc.embed(a), enc.embed(b)
    cross = ea @ eb.T  # (n, n): diagonal = same identity, other scenes
    same = float(cross.diagonal().mean())
    different = _mean_offdiag(cross)
    return {"same_identity": same, "different_identity": different}


@torch.no_grad()
def evaluate_base(pipe, per_scene: int = 4, seed: int = 1_000_000, steps: int = 25, guidance: float = 4.0,
                  diversity_images: int = 24) -> tuple[dict, Image.Image]:
    pipe.set_progress_bar_config(disable=True)
    counts: dict[str, list[int]] = {w: [0, 0] for w in WORDS}
    per_value: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    grid: dict[tuple[str, bool, str], Image.Image] = {}
    start = time.perf_counter()
    n_images = 0
    for k, scene in enumerate(synthfaces.all_scenes()):
        prompt = synthfaces.caption(scene)
        images = _generate(pipe, [prompt] * per_scene, [seed + k * per_scene + i for i in range(per_scene)], steps, guidance)
        n_images += len(images)
        grid[(scene.background, scene.hat, scene.expression)] = images[0]
        for image in images:
            fid = scene_fidelity(image, scene)
            for word in WORDS:
                counts[word][0] += int(fid[word])
                counts[word][1] += 1
            per_value[f"background={scene.background}"][0] += int(fid["background"])
            per_value[f"background={scene.background}"][1] += 1
            per_value[f"hat={scene.hat}"][0] += int(fid["hat"])
            per_value[f"hat={scene.hat}"][1] += 1
            per_value[f"expression={scene.expression}"][0] += int(fid["expression"])
            per_value[f"expression={scene.expression}"][1] += 1
    seconds = time.perf_counter() - start
    prompt = "a face, neutral, on a gray background"
    generated = _generate(pipe, [prompt] * diversity_images, [seed + 10_000 + i for i in range(diversity_images)], steps, guidance)
    emb = default_encoder().embed(generated)
    result = {
        "images": n_images,
        "steps": steps,
        "guidance": guidance,
        "seconds_per_image": seconds / n_images,
        "accuracy": {w: c[0] / c[1] for w, c in counts.items()},
        "accuracy_per_value": {k: v[0] / v[1] for k, v in sorted(per_value.items())},
        "diversity": {"generated_pairwise": _mean_offdiag(emb @ emb.T), "prompt": prompt, **identity_levels()},
    }
    rows = [[grid[(bg, hat, ex)] for hat in (False, True) for ex in synthfaces.EXPRESSIONS] for bg in synthfaces.BACKGROUNDS]
    titles = [f"{'hat ' if hat else ''}{ex}" for hat in (False, True) for ex in synthfaces.EXPRESSIONS]
    return result, contact_sheet(rows, titles, cell=96)


def write_report(result: dict, grid: Image.Image, out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "base_report.json", "markdown": out / "base_report.md", "grid": out / "base_grid.png"}
    with atomic_path(paths["json"], "report") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    acc, div = result["accuracy"], result["diversity"]
    lines = [
        "# SynthFaces base model report", "",
        f"{result['images']} images ({result['steps']} steps, guidance {result['guidance']}), "
        f"{result['seconds_per_image'] * 1000:.0f} ms per image." + (f" Command: `{command}`" if command else ""), "",
        "| scene word | obeyed | goal |", "|---|---|---|",
        f"| background | {acc['background']:.1%} | ≥ 95 % |",
        f"| hat | {acc['hat']:.1%} | ≥ 95 % |",
        f"| expression | {acc['expression']:.1%} | ≥ 90 % |", "",
        "| identity similarity (identity encoder) | mean |", "|---|---|",
        f"| generations of one prompt, pairwise | {div['generated_pairwise']:.3f} |",
        f"| real renders, same identity (other scene) | {div['same_identity']:.3f} |",
        f"| real renders, different identities | {div['different_identity']:.3f} |", "",
        "| value | obeyed |", "|---|---|",
        *[f"| {k} | {v:.1%} |" for k, v in result["accuracy_per_value"].items()], "",
    ]
    with atomic_path(paths["markdown"], "report") as tmp:
        tmp.write_text("\n".join(lines))
    save_png(grid, paths["grid"])
    return paths
