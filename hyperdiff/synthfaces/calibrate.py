"""Calibrations on validation SynthFaces identities, by the fidelity benchmark's scores (`fidelity`).

`calibrate_gain(pipe, hypernet, gains, config, tolerance)` picks a hypernet's output gain on *validation* identities
(`VAL_SEEDS`, never the evaluation range): the base model and the zero-shot adapters times each gain are scored like
table rows, and the gain with the highest truth similarity wins among those that keep the base model's editability:
scene fidelity within `tolerance` of the base model's (or of gain 1's, where that is lower). With `low_noise`
candidates (`hyperdiff.core.schedule`) every gain is also scored with each, and the winner's goes into the hypernet's
config. `calibrate_finetune(pipe, hypernet, low_noise, config, tolerance, recipes)` applies the same rule to the
fast fine-tune's recipes (`FinetuneConfig`s: learning rate, rank, loss weights, ...) and sampling schedule
(`FinetuneConfig.low_noise`), on its adapters told the caption read from the reference (the default) and on
"a <token> face": a candidate must keep both within the tolerance. Each candidate is
scored as the recipe's schedule would sample: on the learned rank components, the start's keeping the hypernet's
unless `config.finetune.start_keeps_schedule` is False; the reference is the same adapters at one strength throughout.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from hyperdiff import synthfaces
from hyperdiff.config import to_dict
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import check_number_in, check_positive_int, check_positive_number
from hyperdiff.personalize.finetune import FinetuneConfig
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline
from hyperdiff.synthfaces.detectors import reference_caption
from hyperdiff.synthfaces.fidelity import PLAIN, FidelityConfig, _judge, _references, _score


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
    """{"gain": chosen, "low_noise": chosen as a dict, "base": {"truth_similarity", "scene_fidelity", ...}, "rows":
    [{"gain", "low_noise", "truth_similarity", "scene_fidelity", ...}, ...], "identities": seeds}. Every gain is
    tried at one strength and with each `low_noise` candidate (on top of the gain); the rule is the same for all rows."""
    config = config or FidelityConfig()
    for g in gains:
        check_positive_number("gains", g)
    gains = sorted({1.0, *(float(g) for g in gains)})
    seeds, refs, base = _validation(pipe, config, tolerance)
    adapters = [hypernet.predict([r.image], token=config.token) for r in refs]
    schedules = _schedules(low_noise)
    rows = [{"gain": g, "low_noise": lo.to_dict(), **_score(pipe, [g * ad for ad in adapters], refs, config, lo)}
            for g in gains for lo in schedules]
    floor = _floor(base, rows[gains.index(1.0) * len(schedules)], tolerance)  # gain 1 at one strength
    best = max((r for r in rows if r["scene_fidelity"] >= floor), key=lambda r: r["truth_similarity"])
    return {"gain": best["gain"], "low_noise": best["low_noise"], "tolerance": tolerance, "identities": seeds,
            "base": base, "rows": rows}


def calibrate_finetune(
    pipe, hypernet, low_noise: Sequence[LowNoiseGain], config: FidelityConfig | None = None, tolerance: float = 0.02,
    recipes: Sequence[FinetuneConfig] = (), plain: bool = True,
) -> dict:
    """{"recipe": the chosen recipe's changes to `config.finetune`, "low_noise": its chosen schedule as a dict,
    "base", "recipes": [changes, ...], "rows": [{"recipe": index, "caption": bool, "low_noise", "truth_similarity",
    "scene_fidelity", ...}, ...], "identities": seeds, "tolerance"}: the fast fine-tune's recipe and sampling schedule
    (`FinetuneConfig.low_noise`) by `calibrate_gain`'s rule. Each recipe (`recipes`, default `config.finetune`
    alone) gets `config.finetune_steps` steps on `hypernet`'s prediction of every validation reference, told the
    caption read from it (the default) and, with `plain`, on "a <token> face" (`caption` False); each set is scored
    at one strength and with each candidate schedule. A (recipe, schedule) passes when every set keeps scene fidelity
    within `tolerance` of the lower of the base model's and the first recipe's at one strength (the recipe as it is:
    a candidate may not buy identity with editability the recipe had); of those (the first recipe at one strength
    always passes) the one with the most truth similarity, averaged over the sets, wins."""
    config = config or FidelityConfig()
    check_positive_int("finetune_steps", config.finetune_steps)
    recipes = list(recipes) or [config.finetune]
    seeds, refs, base = _validation(pipe, config, tolerance)
    hdb = HyperDreamBoothPipeline(pipe, hypernet, captioner=reference_caption)
    schedules = _schedules(low_noise)
    texts = (None, PLAIN) if plain else (None,)  # the caption read from the reference, then none
    rows, choices, floors = [], [], []  # choices: (recipe index, schedule index, [row per caption set])
    for j, recipe in enumerate(recipes):
        uses = []
        for text in texts:
            adapters = [hdb.personalize([r.image], token=config.token, finetune_steps=config.finetune_steps,
                                        seed=config.seed, caption=text, finetune_config=recipe) for r in refs]
            uses.append([{"recipe": j, "caption": text is None, "low_noise": lo.to_dict(),
                          **(_score(pipe, [ad.with_schedule(lo) for ad in adapters], refs, config) if lo.active
                             else _score(pipe, adapters, refs, config, lo))}  # as the recipe samples / one strength
                         for lo in schedules])
            rows += uses[-1]
        floors = floors or [_floor(base, u[0], tolerance) for u in uses]  # the first recipe's, at one strength
        choices += [(j, k, [u[k] for u in uses]) for k in range(len(schedules))
                    if all(u[k]["scene_fidelity"] >= floor for u, floor in zip(uses, floors))]
    j, k, _ = max(choices, key=lambda c: statistics.fmean(row["truth_similarity"] for row in c[2]))
    changes = [_changes(config.finetune, recipe) for recipe in recipes]
    return {"recipe": changes[j], "low_noise": schedules[k].to_dict(), "tolerance": tolerance, "identities": seeds,
            "base": base, "recipes": changes, "rows": rows}


def _changes(start: FinetuneConfig, recipe: FinetuneConfig) -> dict:
    """The fields of `recipe` that differ from `start`, as plain data."""
    before, after = to_dict(start), to_dict(recipe)
    return {key: value for key, value in after.items() if before[key] != value}


