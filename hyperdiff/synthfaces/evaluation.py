"""Evaluation on the SynthFaces world: the base-model report.

Contract: `evaluate_base(pipe, per_scene, seed, steps, guidance)` generates `per_scene` images for every one of the
48 scenes from its caption (no identifier token), checks each with `detectors.scene_fidelity`, and measures identity
diversity with the shipped identity encoder: the mean pairwise similarity of generations of one prompt across seeds,
beside the same-identity and different-identity levels of real renders of evaluation identities (seeds ≥ 1,000,000).
With `judge` (another identity encoder, e.g. the shipped judge) the hat and expression words are read a second time by
its heads (`accuracy_judge`, `accuracy_per_value_judge`): a base model trained against the shipped encoder's
expression head (`UNetStageConfig.classifier_weight`) has to be judged by one it never saw.
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

from hyperdiff import synthfaces
from hyperdiff.core.files import atomic_path
from hyperdiff.synthfaces.detectors import SCENE_CHECKS as WORDS, default_encoder, scene_fidelity
from hyperdiff.synthfaces.encoder import IdentityEncoder
from hyperdiff.synthfaces.sheet import contact_sheet, save_png


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


def _tally(counts: dict[str, list[int]], per_value: dict[str, list[int]], fid: dict, scene: synthfaces.Scene,
           words=WORDS) -> None:
    """Add one image's `scene_fidelity` to the per-word and per-value [obeyed, seen] counts."""
    for word in words:
        counts[word][0] += int(fid[word])
        counts[word][1] += 1
        key = f"{word}={getattr(scene, word)}"
        per_value[key][0] += int(fid[word])
        per_value[key][1] += 1


@torch.no_grad()
def evaluate_base(pipe, per_scene: int = 4, seed: int = 1_000_000, steps: int = 25, guidance: float = 4.0,
                  diversity_images: int = 24, judge: IdentityEncoder | None = None) -> tuple[dict, Image.Image]:
    pipe.set_progress_bar_config(disable=True)
    counts: dict[str, list[int]] = {w: [0, 0] for w in WORDS}
    per_value: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    judged = ("hat", "expression")  # the encoder's heads; the background is read from the corners either way
    judge_counts: dict[str, list[int]] = {w: [0, 0] for w in judged}
    judge_per_value: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    grid: dict[tuple[str, bool, str], Image.Image] = {}
    start = time.perf_counter()
    n_images = 0
    for k, scene in enumerate(synthfaces.all_scenes()):
        prompt = synthfaces.caption(scene)
        images = _generate(pipe, [prompt] * per_scene, [seed + k * per_scene + i for i in range(per_scene)], steps, guidance)
        n_images += len(images)
        grid[(scene.background, scene.hat, scene.expression)] = images[0]
        for image in images:
            _tally(counts, per_value, scene_fidelity(image, scene), scene)
            if judge is not None:
                _tally(judge_counts, judge_per_value, scene_fidelity(image, scene, judge), scene, judged)
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
    if judge is not None:
        result["accuracy_judge"] = {w: c[0] / c[1] for w, c in judge_counts.items()}
        result["accuracy_per_value_judge"] = {k: v[0] / v[1] for k, v in sorted(judge_per_value.items())}
    rows = [[grid[(bg, hat, ex)] for hat in (False, True) for ex in synthfaces.EXPRESSIONS] for bg in synthfaces.BACKGROUNDS]
    titles = [f"{'hat ' if hat else ''}{ex}" for hat in (False, True) for ex in synthfaces.EXPRESSIONS]
    return result, contact_sheet(rows, titles, cell=96)


def write_report(result: dict, grid: Image.Image, out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "base_report.json", "markdown": out / "base_report.md", "grid": out / "base_grid.png"}
    with atomic_path(paths["json"], "report") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    acc, div = result["accuracy"], result["diversity"]
    judged = result.get("accuracy_judge")
    goals = {"background": "≥ 95 %", "hat": "≥ 95 %", "expression": "≥ 90 %"}

    def judge_cell(key: str, table: str = "accuracy_judge") -> str:
        return "" if judged is None else (f" {result[table][key]:.1%} |" if key in result[table] else " – |")

    lines = [
        "# SynthFaces base model report", "",
        f"{result['images']} images ({result['steps']} steps, guidance {result['guidance']}), "
        f"{result['seconds_per_image'] * 1000:.0f} ms per image." + (f" Command: `{command}`" if command else ""), "",
        "| scene word | obeyed |" + (" judge |" if judged else "") + " goal |", "|---|---|" + ("---|" if judged else "") + "---|",
        *[f"| {w} | {acc[w]:.1%} |{judge_cell(w)} {goal} |" for w, goal in goals.items()], "",
        "| identity similarity (identity encoder) | mean |", "|---|---|",
        f"| generations of one prompt, pairwise | {div['generated_pairwise']:.3f} |",
        f"| real renders, same identity (other scene) | {div['same_identity']:.3f} |",
        f"| real renders, different identities | {div['different_identity']:.3f} |", "",
        "| value | obeyed |" + (" judge |" if judged else ""), "|---|---|" + ("---|" if judged else ""),
        *[f"| {k} | {v:.1%} |{judge_cell(k, 'accuracy_per_value_judge')}" for k, v in result["accuracy_per_value"].items()], "",
    ]
    with atomic_path(paths["markdown"], "report") as tmp:
        tmp.write_text("\n".join(lines))
    save_png(grid, paths["grid"])
    return paths
