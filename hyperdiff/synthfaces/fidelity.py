"""Fidelity benchmark on held-out SynthFaces identities, scored against the truth.

Contract: `run_fidelity(pipe, hypernets, config)` personalizes `config.identities` evaluation identities (seeds
≥ 1,000,000, never trained on) from one reference render each, generates every `config.scenes` prompt with the
identifier token, and reports per method:
- `truth_similarity` (the headline): mean identity-encoder cosine between each generation and the *true render* of
  that identity in the prompted scene (SynthFaces can draw it), so a method is paid for keeping who the face is, not
  for copying the photo; `reference_similarity`: the same cosine to the reference image (what copying it raises);
  `copy_index`: their difference, reference − truth (how much closer a generation is to the photo than to the truth;
  a method that learns the photo and not the person raises it). With `config.judge` (another identity encoder's
  folder) all three also under that encoder, suffixed `_judge`: a hypernet trained against the shipped encoder has to
  be judged by one it never saw;
- `scene_fidelity`: fraction of scene words obeyed (background, hat, expression) — editability; `scene_words`: the
  same fraction per word;
- `per_identity`: those scores per identity (the row's means are their means), `standard_error`: the standard error
  of each mean over identities (none for one), and `by_reference`: truth similarity, copy index and scene fidelity
  per reference condition (`REFERENCE_CONDITIONS`: the reference's background gray or coloured, hat or not, neutral
  or another expression), since a user's photo can show any scene;
- `seconds`: wall time to personalize one identity alone (model loading excluded; DreamBooth-LiDB also reports
  `seconds_batched`, its batch's time per identity, which flatters it on a CPU), and `adapter_values`/`adapter_bytes`.
References: `config.reference_scene` "random" (the default) draws each identity's reference scene from its seed
(`reference_scene`), the same for every `config.seed`; a (background, hat, expression) tuple renders all in one scene.
Methods, each as a user gets it by default — the fine-tunes told what the reference shows by the caption the
pipeline reads from it when none is typed (`detectors.reference_caption`, as `hyperdiff personalize` does on the
embedded base): `base` (no personalization), `dreambooth_lidb` (LiDB fine-tuned from scratch; its scores are also
reported along `config.dreambooth_curve`, so convergence is visible: one run to the longest, its adapters and times
taken at each point, the last point listed being the row; with `config.dreambooth_plain` also
`dreambooth_lidb+plain`, trained on "a <token> face"), and for every hypernet given (name → model): `<name>`
(zero-shot), `<name>+ft` (the rank-relaxed fast fine-tune, `config.finetune_steps` steps of `config.finetune`) and
`<name>+ft+plain` (the same fine-tune on "a <token> face", no caption: what the read caption adds); hypernets given
as `ablations` get the zero-shot row only. A row whose adapters carry a low-noise gain (`hyperdiff.core.schedule`) is
followed by `<label>@one-strength`: the same adapters sampled without it (`config.one_strength_rows`).
`config.seed` seeds every fine-tune's draws and every generation's noise (identity i, scene k: seed + 1000 i + k),
so another seed replicates the whole table on the same identities and references. `write_fidelity(result, out)`
writes JSON and a Markdown table. The calibrations that choose gains, recipes and schedules on validation identities
by the same scores are `hyperdiff.synthfaces.calibrate`.
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from hyperdiff import synthfaces
from hyperdiff.config import to_dict
from hyperdiff.core.adapter import Adapter
from hyperdiff.core.files import atomic_path
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError, check_int_in
from hyperdiff.personalize.finetune import FinetuneConfig, finetune
from hyperdiff.personalize.pipeline import DREAMBOOTH_LIDB, SYNTHFACES_FAST_FINETUNE, HyperDreamBoothPipeline
from hyperdiff.synthfaces.detectors import SCENE_CHECKS as WORDS, default_encoder, reference_caption, scene_fidelity
from hyperdiff.synthfaces.encoder import IdentityEncoder

DEFAULT_SCENES = (
    ("red", False, "smiling"), ("blue", True, "neutral"), ("green", False, "surprised"), ("yellow", True, "sad"),
    ("purple", True, "smiling"), ("gray", False, "surprised"),
)
PLAIN = "a {token} face"  # the fine-tune's instance prompt without a caption: what the "+plain" rows train on
# reference condition -> whether a reference scene meets it (`by_reference`)
REFERENCE_CONDITIONS = {
    "gray background": lambda s: s.background == "gray",
    "coloured background": lambda s: s.background != "gray",
    "hat": lambda s: s.hat,
    "no hat": lambda s: not s.hat,
    "neutral": lambda s: s.expression == "neutral",
    "expressive": lambda s: s.expression != "neutral",
}
SIMILARITIES = ("truth_similarity", "reference_similarity", "copy_index")


@dataclass
class FidelityConfig:
    identities: int = 16
    reference_scene: tuple | str = "random"  # "random": one scene per identity, drawn from its seed; or one scene
    scenes: tuple = DEFAULT_SCENES
    steps: int = 25
    guidance: float = 4.0
    token: str = "sks"
    finetune_steps: int = 40
    finetune: FinetuneConfig = field(default_factory=lambda: replace(SYNTHFACES_FAST_FINETUNE))  # the embedded base's
    dreambooth_curve: tuple[int, ...] = (50, 100, 200, 400)
    dreambooth: FinetuneConfig = field(default_factory=lambda: replace(DREAMBOOTH_LIDB))  # the pipeline's recipe
    dreambooth_plain: bool = False  # also DreamBooth-LiDB trained on "a <token> face" without the read caption
    dreambooth_rows: bool = True  # False: no DreamBooth-LiDB rows (they are deterministic: re-scoring hypernets only)
    one_strength_rows: bool = True  # a scheduled row is followed by the same adapters at one strength
    seed: int = 0
    judge: str = ""  # an identity encoder folder that scores every similarity a second time ("" = none)

    def __post_init__(self) -> None:
        check_int_in("seed", self.seed, 0, 2**32 - 1)
        if self.reference_scene != "random":
            try:
                self.reference_scene = tuple(_scene(self.reference_scene).to_dict().values())
            except (TypeError, HyperdiffError):
                raise HyperdiffError("`reference_scene` must be 'random' or (background, hat, expression), got "
                                     f"{self.reference_scene!r}") from None
        self.dreambooth_curve = tuple(self.dreambooth_curve)
        if not self.dreambooth_curve or any(not isinstance(k, int) or k < 1 for k in self.dreambooth_curve):
            raise HyperdiffError(f"`dreambooth_curve` must be positive step counts, got {list(self.dreambooth_curve)}")

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass(frozen=True)
class Reference:
    """One identity's reference: its seed, the scene it is rendered in, and the render."""

    seed: int
    scene: synthfaces.Scene
    image: Image.Image


def _scene(t) -> synthfaces.Scene:
    return synthfaces.Scene(*t)


def reference_scene(seed: int, config: FidelityConfig) -> synthfaces.Scene:
    """The scene identity `seed`'s reference is rendered in: `config.reference_scene`, or with "random" one drawn
    from a generator seeded by the identity seed alone (the same in every run and for every `config.seed`)."""
    if config.reference_scene == "random":
        return synthfaces.Scene.random(random.Random(f"hyperdiff-reference-{seed}"))
    return _scene(config.reference_scene)


def _references(pipe, seeds: list[int], config: FidelityConfig) -> list[Reference]:
    """One reference per identity seed, rendered at the base model's image size."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for s in seeds:
        scene = reference_scene(s, config)
        out.append(Reference(s, scene, synthfaces.render(synthfaces.Identity.from_seed(s), scene, size)))
    return out


def _score(pipe, adapters: list[Adapter | None], refs: list[Reference], cfg: FidelityConfig,
           low_noise: LowNoiseGain | None = None) -> dict:
    """Generate every scene for every identity; identity similarity to the true render of that identity in that
    scene and to the reference, and scene-word accuracy, overall, per word and per reference condition.
    `low_noise` overrides the adapters' own (`HyperDreamBoothPipeline.generate`)."""
    hdb = HyperDreamBoothPipeline(pipe, None)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    encoders = {"": default_encoder(), **({"_judge": _judge(cfg.judge)} if cfg.judge else {})}
    sims = {f"{key}{suffix}": [] for suffix in encoders for key in SIMILARITIES}
    obeyed = {w: [] for w in WORDS}
    for i, (ad, ref) in enumerate(zip(adapters, refs)):
        identity = synthfaces.Identity.from_seed(ref.seed)
        for k, t in enumerate(cfg.scenes):
            scene = _scene(t)
            prompt = synthfaces.caption(scene, cfg.token)
            image = hdb.generate(prompt, ad, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed + 1000 * i + k,
                                 low_noise=low_noise)[0]
            truth = synthfaces.render(identity, scene, size)
            for suffix, enc in encoders.items():
                to_truth, to_ref = (float(v) for v in enc.similarity([image, image], [truth, ref.image]))
                sims[f"truth_similarity{suffix}"].append(to_truth)
                sims[f"reference_similarity{suffix}"].append(to_ref)
                sims[f"copy_index{suffix}"].append(to_ref - to_truth)
            fid = scene_fidelity(image, scene)
            for w in WORDS:
                obeyed[w].append(float(fid[w]))
    n = len(cfg.scenes)  # images per identity, identity-major

    def means(values: list[float]) -> list[float]:
        return [statistics.fmean(values[i:i + n]) for i in range(0, len(values), n)]

    per_identity = {**{k: means(v) for k, v in sims.items()},
                    "scene_fidelity": [statistics.fmean(s) for s in zip(*(means(obeyed[w]) for w in WORDS))]}
    per_word = {w: statistics.fmean(v) for w, v in obeyed.items()}  # every image counts once per word
    by_reference = {}
    for condition, meets in REFERENCE_CONDITIONS.items():
        chosen = [i for i, ref in enumerate(refs) if meets(ref.scene)]
        if chosen:
            by_reference[condition] = {"identities": len(chosen), **{
                k: statistics.fmean(per_identity[k][i] for i in chosen)
                for k in ("truth_similarity", "copy_index", "scene_fidelity")}}
    return {**{k: statistics.fmean(v) for k, v in per_identity.items()}, "scene_words": per_word,
            "standard_error": {k: _standard_error(v) for k, v in per_identity.items()},
            "per_identity": [dict(zip(per_identity, values)) for values in zip(*per_identity.values())],
            "by_reference": by_reference}


def _standard_error(values: list[float]) -> float | None:
    """Of the mean, over identities: sample standard deviation / √n (None for one value)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


@functools.lru_cache(maxsize=2)
def _judge(path: str) -> IdentityEncoder:
    return IdentityEncoder.from_pretrained(path)


def _size(adapter: Adapter) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return adapter.save(Path(tmp) / "a.safetensors").stat().st_size


def _read_captions(refs: list[Reference], token: str) -> list[str]:
    """The caption the pipeline reads from each reference when none is typed, with the token filled in."""
    return [reference_caption(ref.image).format(token=token) for ref in refs]


def _dreambooth(pipe, refs: list[Reference], config: FidelityConfig, captions: list[str]) -> dict:
    """DreamBooth-LiDB from scratch, identity i trained on `captions[i]`: one run to the curve's longest, its adapters
    taken at every point of the curve (the state after k steps of a constant-rate run is that of a k-step run), all
    identities in one batch; then one identity alone, for the time a user waits."""
    points = set(config.dreambooth_curve)
    ft = replace(config.dreambooth, steps=max(points), token=config.token, seed=config.seed)

    def curve_run(chosen: list[Reference], texts: list[str]) -> dict[int, tuple[float, list[Adapter]]]:
        """Step count → (seconds since the run began, the adapters then)."""
        taken, start = {}, time.perf_counter()
        finetune(pipe, [[r.image] for r in chosen], ft, prompts=[[t] for t in texts], progress=False,
                 snapshot_steps=points,
                 snapshot=lambda k, adapters: taken.__setitem__(k, (time.perf_counter() - start, adapters)))
        return taken

    batched = curve_run(refs, captions)
    alone = curve_run(refs[:1], captions[:1])
    curve = [{"steps": k, **_score(pipe, batched[k][1], refs, config), "seconds": alone[k][0],
              "seconds_batched": batched[k][0] / len(refs)} for k in config.dreambooth_curve]
    last = curve[-1]
    adapter = batched[last["steps"]][1][0]
    return {**{k: v for k, v in last.items() if k != "steps"}, "adapter_values": adapter.num_values,
            "adapter_bytes": _size(adapter), "curve": curve}


def run_fidelity(pipe, hypernets: dict, config: FidelityConfig = FidelityConfig(), ablations: dict | None = None) -> dict:
    if config.judge:
        _judge(config.judge)  # a bad folder fails before any work
    seeds = list(synthfaces.eval_seeds(config.identities))
    refs = _references(pipe, seeds, config)
    rows: dict[str, dict] = {}
    rows["base"] = {**_score(pipe, [None] * len(refs), refs, config), "seconds": 0.0, "adapter_values": 0, "adapter_bytes": 0}

    plain = PLAIN.format(token=config.token)
    if config.dreambooth_rows:
        rows["dreambooth_lidb"] = _dreambooth(pipe, refs, config, _read_captions(refs, config.token))
    if config.dreambooth_rows and config.dreambooth_plain:
        rows["dreambooth_lidb+plain"] = _dreambooth(pipe, refs, config, [plain] * len(refs))

    steps = config.finetune_steps
    runs = [(name, hp, ((name, 0, None), (f"{name}+ft", steps, None), (f"{name}+ft+plain", steps, PLAIN)))
            for name, hp in hypernets.items()]
    runs += [(name, hp, ((name, 0, None),)) for name, hp in (ablations or {}).items()]
    for name, hp, labels in runs:
        hdb = HyperDreamBoothPipeline(pipe, hp, captioner=reference_caption)  # as on the embedded base
        for label, ft_steps, text in labels:
            start = time.perf_counter()  # the caption is read inside `personalize`: its time counts
            adapters = [hdb.personalize([r.image], token=config.token, finetune_steps=ft_steps, seed=config.seed,
                                        caption=text, finetune_config=config.finetune) for r in refs]
            seconds = (time.perf_counter() - start) / len(refs)
            rows[label] = {**_score(pipe, adapters, refs, config), "seconds": seconds,
                           "adapter_values": adapters[0].num_values, "adapter_bytes": _size(adapters[0])}
            if config.one_strength_rows and adapters[0].info.scheduled:  # what the schedule adds
                same = {k: rows[label][k] for k in ("seconds", "adapter_values", "adapter_bytes")}
                rows[f"{label}@one-strength"] = {**_score(pipe, adapters, refs, config, LowNoiseGain()), **same}
    return {"config": config.to_dict(), "identities": seeds,
            "references": [synthfaces.caption(r.scene) for r in refs], "rows": rows}


def _pm(row: dict, key: str, fmt: str) -> str:
    """The row's mean, ± its standard error over identities where there is one."""
    se = row.get("standard_error", {}).get(key)
    return format(row[key], fmt) + (f" ± {format(se, fmt)}" if se is not None else "")


def write_fidelity(result: dict, out: Path, command: str = "") -> dict[str, Path]:
    """`fidelity.json` (the whole result) and `fidelity.md`: the main table (truth similarity first, the judge's
    beside it, then what copying the reference reads), each DreamBooth row's convergence, and truth similarity per
    reference condition."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fidelity.json", "markdown": out / "fidelity.md"}
    with atomic_path(paths["json"], "report") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    judged = all("truth_similarity_judge" in row for row in rows.values())
    lines = ["| method | ID to the truth " + ("| judge " if judged else "")
             + "| ID to the reference (copy) | copy index | scene fidelity | background / hat / expression "
             "| time to personalize | adapter |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if judged else "")]
    for name, row in rows.items():
        size = f"{row['adapter_values']:,} values, {row['adapter_bytes'] / 1000:.0f} KB" if row["adapter_values"] else "-"
        words = " / ".join(f"{row['scene_words'][w]:.0%}" for w in WORDS)
        judge = f" {_pm(row, 'truth_similarity_judge', '.3f')} |" if judged else ""
        lines.append(f"| {name} | {_pm(row, 'truth_similarity', '.3f')} |{judge} {row['reference_similarity']:.3f} |"
                     f" {row['copy_index']:+.3f} | {_pm(row, 'scene_fidelity', '.1%')} | {words} | {row['seconds']:.2f} s"
                     f" | {size} |")
    for name, row in rows.items():
        if "curve" not in row:
            continue
        curve = row["curve"]
        lines += ["", f"{name} convergence, one run taken at each point (ID to the truth"
                  + (" / judge" if judged else "") + " / scene fidelity; seconds for one identity alone; per identity in"
                  " one batch of all): " + ", ".join(
                      f"{c['steps']} steps → {c['truth_similarity']:.3f}"
                      + (f" / {c['truth_similarity_judge']:.3f}" if judged else "")
                      + f" / {c['scene_fidelity']:.1%} ({c['seconds']:.1f} s; {c['seconds_batched']:.1f} s)" for c in curve)]
    conditions = [c for c in REFERENCE_CONDITIONS if all(c in row.get("by_reference", {}) for row in rows.values())]
    if conditions:
        counts = next(iter(rows.values()))["by_reference"]
        lines += ["", "ID to the truth by reference condition (identities):", "",
                  "| method | " + " | ".join(f"{c} ({counts[c]['identities']})" for c in conditions) + " |",
                  "|---|" + "---|" * len(conditions)]
        lines += [f"| {name} | " + " | ".join(f"{row['by_reference'][c]['truth_similarity']:.3f}" for c in conditions)
                  + " |" for name, row in rows.items()]
    if any(v is not None for row in rows.values() for v in row.get("standard_error", {}).values()):
        lines += ["", f"± is the standard error of the mean over the {len(result['identities'])} identities."]
    if command:
        lines += ["", f"Command: `{command}`"]
    with atomic_path(paths["markdown"], "report") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return paths
