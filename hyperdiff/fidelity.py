"""Fidelity benchmark on held-out SynthFaces identities, paper-style (HyperDreamBooth's table).

Contract: `run_fidelity(pipe, hypernets, config)` personalizes `config.identities` evaluation identities (seeds
≥ 1,000,000, never trained on) from one reference render each, generates every `config.scenes` prompt with the
identifier token, and reports per method:
- `id_similarity`: mean identity-encoder cosine between each generation and its reference (the FaceRec column);
  with `config.judge` (another identity encoder's folder) also `id_similarity_judge`, the same mean under that
  encoder: a hypernet trained against the shipped encoder (`HypernetTrainConfig.identity_weight`) has to be judged
  by one it never saw, as face-recognition losses in training are judged by another face model;
- `scene_fidelity`: fraction of scene words obeyed (background, hat, expression) — editability; `scene_words`: the
  same fraction per word, which tells where editability is lost;
- `per_identity`: those scores per identity (the row's means are their means), and `standard_error`: the standard
  error of each mean over identities (sample standard deviation / √n; none for one identity), since with a few
  identities a point or two of scene fidelity is within noise;
- `seconds`: wall time to personalize one identity alone (model loading excluded; DreamBooth-LiDB also reports
  `seconds_batched`, its batch's time per identity, which flatters it on a CPU), and `adapter_values`/`adapter_bytes`.
Methods: `base` (no personalization), `dreambooth_lidb` (LiDB fine-tuned from scratch; every row's scores are also
reported along `config.dreambooth_curve`, so convergence is visible: one run to the longest, its adapters and times
taken at each point, the last point listed being the row; with `config.dreambooth_caption` also
`dreambooth_lidb+caption`, trained on the reference's caption like the captioned fine-tune below), and for every
hypernet given (name → model):
`<name>` (zero-shot), `<name>+ft` (the rank-relaxed fast fine-tune, `config.finetune_steps` steps of
`config.finetune`) and `<name>+ft+caption` (the same fine-tune told what the reference shows: its caption instead of
"a <token> face"); hypernets given as `ablations` get the zero-shot row only (decoder and K comparisons). A row
whose adapters carry a low-noise gain (`hyperdiff.schedule`: a calibrated hypernet's zero-shot prediction, or a
fine-tune recipe's `low_noise`) is followed by `<label>@one-strength`: the same adapters sampled without it.
`config.seed` seeds every fine-tune's draws and every generation's noise (identity i, scene k: seed + 1000 i + k),
so another seed replicates the whole table on the same identities. `write_fidelity(result, out)` writes JSON and a
Markdown table.

`calibrate_gain(pipe, hypernet, gains, config, tolerance)` picks a hypernet's output gain on *validation* identities
(`VAL_SEEDS`, never the evaluation range): the base model and the zero-shot adapters times each gain are scored like
table rows, and the gain with the highest ID similarity wins among those that keep the base model's editability:
scene fidelity within `tolerance` of the base model's (or of gain 1's, where that is lower). A
distilled hypernet regresses to its teachers' conditional mean, which shrinks the identity-specific part of ΔW; the
gain undoes part of that shrinkage (`HyperNetwork.set_gain` stores it in `alpha`). With `low_noise` candidates
(`hyperdiff.schedule`) every gain is also scored with each, and the winner's goes into the hypernet's config.
`calibrate_finetune(pipe, hypernet, low_noise, config, tolerance)` applies the same rule to the fast fine-tune's
sampling schedule (`FinetuneConfig.low_noise`), on its adapters told the reference's caption and not: a candidate
must keep both within the tolerance. Each candidate is scored as the recipe's schedule would sample: on the learned
rank components, the start's keeping the hypernet's unless `config.finetune.start_keeps_schedule` is False; the
reference is the same adapters at one strength throughout.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from hyperdiff.adapter import Adapter
from hyperdiff.config import to_dict
from hyperdiff.data import synthfaces
from hyperdiff.errors import HyperdiffError, check_int_in, check_number_in, check_positive_int, check_positive_number
from hyperdiff.files import atomic_path
from hyperdiff.finetune import FinetuneConfig, finetune
from hyperdiff.metrics import SCENE_CHECKS as WORDS, IdentityEncoder, default_encoder, scene_fidelity
from hyperdiff.pipeline import DREAMBOOTH_LIDB, SYNTHFACES_FAST_FINETUNE, HyperDreamBoothPipeline
from hyperdiff.schedule import LowNoiseGain

DEFAULT_SCENES = (
    ("red", False, "smiling"), ("blue", True, "neutral"), ("green", False, "surprised"), ("yellow", True, "sad"),
    ("purple", True, "smiling"), ("gray", False, "surprised"),
)


@dataclass
class FidelityConfig:
    identities: int = 16
    reference_scene: tuple = ("gray", False, "neutral")
    scenes: tuple = DEFAULT_SCENES
    steps: int = 25
    guidance: float = 4.0
    token: str = "sks"
    finetune_steps: int = 40
    finetune: FinetuneConfig = field(default_factory=lambda: replace(SYNTHFACES_FAST_FINETUNE))  # the embedded base's
    dreambooth_curve: tuple[int, ...] = (50, 100, 200, 400)
    dreambooth: FinetuneConfig = field(default_factory=lambda: replace(DREAMBOOTH_LIDB))  # the pipeline's recipe
    dreambooth_caption: bool = False  # also DreamBooth-LiDB told the reference's caption, like the captioned fine-tune
    dreambooth_rows: bool = True  # False: no DreamBooth-LiDB rows (they are deterministic: re-scoring hypernets only)
    seed: int = 0
    judge: str = ""  # an identity encoder folder that scores ID similarity a second time ("" = none)

    def __post_init__(self) -> None:
        check_int_in("seed", self.seed, 0, 2**32 - 1)
        self.dreambooth_curve = tuple(self.dreambooth_curve)
        if not self.dreambooth_curve or any(not isinstance(k, int) or k < 1 for k in self.dreambooth_curve):
            raise HyperdiffError(f"`dreambooth_curve` must be positive step counts, got {list(self.dreambooth_curve)}")

    def to_dict(self) -> dict:
        return to_dict(self)


def _scene(t) -> synthfaces.Scene:
    return synthfaces.Scene(*t)


def _references(pipe, seeds: list[int], config: FidelityConfig) -> list:
    """One render per identity seed in `config.reference_scene`, at the base model's image size."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return [synthfaces.render(synthfaces.Identity.from_seed(s), _scene(config.reference_scene), size) for s in seeds]


def _score(pipe, adapters: list[Adapter | None], refs, cfg: FidelityConfig,
           low_noise: LowNoiseGain | None = None) -> dict[str, float]:
    """Generate every scene for every identity; identity similarity to the reference and scene-word accuracy, overall
    and per word. `low_noise` overrides the adapters' own (`HyperDreamBoothPipeline.generate`)."""
    hdb = HyperDreamBoothPipeline(pipe, None)
    enc = default_encoder()
    judge = _judge(cfg.judge) if cfg.judge else None
    sims, judged, obeyed = [], [], {w: [] for w in WORDS}
    for i, (ad, ref) in enumerate(zip(adapters, refs)):
        for k, t in enumerate(cfg.scenes):
            scene = _scene(t)
            prompt = synthfaces.caption(scene, cfg.token)
            image = hdb.generate(prompt, ad, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed + 1000 * i + k,
                                 low_noise=low_noise)[0]
            sims.append(float(enc.similarity([image], [ref])[0]))
            if judge is not None:
                judged.append(float(judge.similarity([image], [ref])[0]))
            fid = scene_fidelity(image, scene)
            for w in WORDS:
                obeyed[w].append(float(fid[w]))
    n = len(cfg.scenes)  # images per identity, identity-major

    def means(values: list[float]) -> list[float]:
        return [statistics.fmean(values[i:i + n]) for i in range(0, len(values), n)]

    per_identity = {"id_similarity": means(sims),
                    "scene_fidelity": [statistics.fmean(s) for s in zip(*(means(obeyed[w]) for w in WORDS))]}
    if judge is not None:
        per_identity["id_similarity_judge"] = means(judged)
    per_word = {w: statistics.fmean(v) for w, v in obeyed.items()}  # every image counts once per word
    return {**{k: statistics.fmean(v) for k, v in per_identity.items()}, "scene_words": per_word,
            "standard_error": {k: _standard_error(v) for k, v in per_identity.items()},
            "per_identity": [dict(zip(per_identity, values)) for values in zip(*per_identity.values())]}


def _standard_error(values: list[float]) -> float | None:
    """Of the mean, over identities: sample standard deviation / √n (None for one value)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


@functools.lru_cache(maxsize=2)
def _judge(path: str) -> IdentityEncoder:
    return IdentityEncoder.from_pretrained(path)


def _size(adapter: Adapter) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return adapter.save(Path(tmp) / "a.safetensors").stat().st_size


def _dreambooth(pipe, refs, config: FidelityConfig, prompt: str) -> dict:
    """DreamBooth-LiDB from scratch on `prompt` (the instance prompt or the reference's caption): one run to the
    curve's longest, its adapters taken at every point of the curve (the state after k steps of a constant-rate run is
    that of a k-step run), all identities in one batch; then one identity alone, for the time a user waits."""
    points = set(config.dreambooth_curve)
    ft = replace(config.dreambooth, steps=max(points), token=config.token, seed=config.seed, instance_prompt=prompt)

    def curve_run(identities: list) -> dict[int, tuple[float, list[Adapter]]]:
        """Step count → (seconds since the run began, the adapters then)."""
        taken, start = {}, time.perf_counter()
        finetune(pipe, [[r] for r in identities], ft, progress=False, snapshot_steps=points,
                 snapshot=lambda k, adapters: taken.__setitem__(k, (time.perf_counter() - start, adapters)))
        return taken

    batched = curve_run(refs)
    alone = curve_run(refs[:1])
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

    caption = synthfaces.caption(_scene(config.reference_scene), config.token)  # what the reference shows, for the captioned rows
    if config.dreambooth_rows:
        rows["dreambooth_lidb"] = _dreambooth(pipe, refs, config, config.dreambooth.instance_prompt)
    if config.dreambooth_rows and config.dreambooth_caption:
        rows["dreambooth_lidb+caption"] = _dreambooth(pipe, refs, config, caption)

    steps = config.finetune_steps
    runs = [(name, hp, ((name, 0, None), (f"{name}+ft", steps, None), (f"{name}+ft+caption", steps, caption)))
            for name, hp in hypernets.items()]
    runs += [(name, hp, ((name, 0, None),)) for name, hp in (ablations or {}).items()]
    for name, hp, labels in runs:
        hdb = HyperDreamBoothPipeline(pipe, hp)
        for label, ft_steps, text in labels:
            start = time.perf_counter()
            adapters = [hdb.personalize([r], token=config.token, finetune_steps=ft_steps, seed=config.seed, caption=text,
                                        finetune_config=config.finetune) for r in refs]
            seconds = (time.perf_counter() - start) / len(refs)
            rows[label] = {**_score(pipe, adapters, refs, config), "seconds": seconds,
                           "adapter_values": adapters[0].num_values, "adapter_bytes": _size(adapters[0])}
            if adapters[0].info.scheduled:  # what the low-noise gain adds: the same adapters at one strength
                same = {k: rows[label][k] for k in ("seconds", "adapter_values", "adapter_bytes")}
                rows[f"{label}@one-strength"] = {**_score(pipe, adapters, refs, config, LowNoiseGain()), **same}
    return {"config": config.to_dict(), "identities": seeds, "rows": rows}


def _validation(pipe, config: FidelityConfig, tolerance: float) -> tuple[list[int], list, dict]:
    """The calibrations' common start: checks, the validation seeds (never evaluation ones), their references and the
    base model's scores."""
    check_number_in("tolerance", tolerance, 0.0, 1.0)
    check_positive_int("identities", config.identities)
    if config.judge:
        _judge(config.judge)
    seeds = list(synthfaces.VAL_SEEDS[: config.identities])
    refs = _references(pipe, seeds, config)
    return seeds, refs, _score(pipe, [None] * len(refs), refs, config)


def _floor(base: dict, unit: dict, tolerance: float) -> float:
    """The calibrations' rule: scene fidelity may fall `tolerance` below the lower of the base model's and the
    uncalibrated adapters' own."""
    return min(base["scene_fidelity"], unit["scene_fidelity"]) - tolerance


def _schedules(low_noise: Sequence[LowNoiseGain]) -> list[LowNoiseGain]:
    """One strength first (the reference of the rule), then each active candidate once."""
    return [LowNoiseGain(), *(lo for lo in dict.fromkeys(low_noise) if lo.active)]


def calibrate_gain(
    pipe, hypernet, gains: Sequence[float], config: FidelityConfig | None = None, tolerance: float = 0.02,
    low_noise: Sequence[LowNoiseGain] = (),
) -> dict:
    """{"gain": chosen, "low_noise": chosen as a dict, "base": {"id_similarity", "scene_fidelity"}, "rows": [{"gain",
    "low_noise", "id_similarity", "scene_fidelity"}, ...], "identities": seeds}. Every gain is tried at one strength
    and with each `low_noise` candidate (on top of the gain); the rule is the same for all rows."""
    config = config or FidelityConfig()
    for g in gains:
        check_positive_number("gains", g)
    gains = sorted({1.0, *(float(g) for g in gains)})
    seeds, refs, base = _validation(pipe, config, tolerance)
    adapters = [hypernet.predict([r], token=config.token) for r in refs]
    schedules = _schedules(low_noise)
    rows = [{"gain": g, "low_noise": lo.to_dict(), **_score(pipe, [g * ad for ad in adapters], refs, config, lo)}
            for g in gains for lo in schedules]
    floor = _floor(base, rows[gains.index(1.0) * len(schedules)], tolerance)  # gain 1 at one strength
    best = max((r for r in rows if r["scene_fidelity"] >= floor), key=lambda r: r["id_similarity"])
    return {"gain": best["gain"], "low_noise": best["low_noise"], "tolerance": tolerance, "identities": seeds,
            "base": base, "rows": rows}


def calibrate_finetune(
    pipe, hypernet, low_noise: Sequence[LowNoiseGain], config: FidelityConfig | None = None, tolerance: float = 0.02,
) -> dict:
    """{"low_noise": chosen as a dict, "base", "rows": [{"caption": bool, "low_noise", "id_similarity",
    "scene_fidelity", ...}, ...], "identities": seeds, "tolerance"}: the fast fine-tune's sampling schedule
    (`FinetuneConfig.low_noise`) by `calibrate_gain`'s rule. Each validation reference gets `config.finetune_steps`
    of `config.finetune` on `hypernet`'s prediction twice, told its caption and not (the two ways it is used); both
    sets are scored at one strength and with each candidate. A candidate passes when both keep scene fidelity within
    `tolerance` of the lower of the base model's and their own at one strength; of those (one strength always passes)
    the one with the most ID similarity, averaged over both, wins."""
    config = config or FidelityConfig()
    check_positive_int("finetune_steps", config.finetune_steps)
    seeds, refs, base = _validation(pipe, config, tolerance)
    hdb = HyperDreamBoothPipeline(pipe, hypernet)
    caption = synthfaces.caption(_scene(config.reference_scene), config.token)
    schedules = _schedules(low_noise)
    rows = []
    for text in (caption, None):
        adapters = [hdb.personalize([r], token=config.token, finetune_steps=config.finetune_steps, seed=config.seed,
                                    caption=text, finetune_config=config.finetune) for r in refs]
        rows += [{"caption": text is not None, "low_noise": lo.to_dict(),
                  **(_score(pipe, [ad.with_schedule(lo) for ad in adapters], refs, config) if lo.active
                     else _score(pipe, adapters, refs, config, lo))}  # as the recipe samples / one strength throughout
                 for lo in schedules]
    uses = [rows[:len(schedules)], rows[len(schedules):]]  # captioned, plain: one row per schedule, one strength first
    passing = [k for k in range(len(schedules))
               if all(u[k]["scene_fidelity"] >= _floor(base, u[0], tolerance) for u in uses)]
    best = max(passing, key=lambda k: statistics.fmean(u[k]["id_similarity"] for u in uses))
    return {"low_noise": schedules[best].to_dict(), "tolerance": tolerance, "identities": seeds, "base": base,
            "rows": rows}


def _pm(row: dict, key: str, fmt: str) -> str:
    """The row's mean, ± its standard error over identities where there is one."""
    se = row.get("standard_error", {}).get(key)
    return format(row[key], fmt) + (f" ± {format(se, fmt)}" if se is not None else "")


def write_fidelity(result: dict, out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fidelity.json", "markdown": out / "fidelity.md"}
    with atomic_path(paths["json"], "report") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    judged = all("id_similarity_judge" in row for row in result["rows"].values())
    lines = ["| method | ID similarity " + ("| ID similarity (judge) " if judged else "")
             + "| scene fidelity | background / hat / expression | time to personalize | adapter |",
             "|---|---|---|---|---|---|" + ("---|" if judged else "")]
    for name, row in result["rows"].items():
        size = f"{row['adapter_values']:,} values, {row['adapter_bytes'] / 1000:.0f} KB" if row["adapter_values"] else "-"
        words = " / ".join(f"{row['scene_words'][w]:.0%}" for w in WORDS)
        judge = f" {_pm(row, 'id_similarity_judge', '.3f')} |" if judged else ""
        lines.append(f"| {name} | {_pm(row, 'id_similarity', '.3f')} |{judge} {_pm(row, 'scene_fidelity', '.1%')} |"
                     f" {words} | {row['seconds']:.2f} s | {size} |")
    for name, row in result["rows"].items():
        if "curve" not in row:
            continue
        curve = row["curve"]
        lines += ["", f"{name} convergence, one run taken at each point (ID similarity"
                  + (" / judge" if judged else "") + " / scene fidelity; seconds for one identity alone; per identity in"
                  " one batch of all): " + ", ".join(
                      f"{c['steps']} steps → {c['id_similarity']:.3f}" + (f" / {c['id_similarity_judge']:.3f}" if judged else "")
                      + f" / {c['scene_fidelity']:.1%} ({c['seconds']:.1f} s; {c['seconds_batched']:.1f} s)" for c in curve)]
    if any(v is not None for row in result["rows"].values() for v in row.get("standard_error", {}).values()):
        lines += ["", f"± is the standard error of the mean over the {len(result['identities'])} identities."]
    if command:
        lines += ["", f"Command: `{command}`"]
    with atomic_path(paths["markdown"], "report") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return paths
