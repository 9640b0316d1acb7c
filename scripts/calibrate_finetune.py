"""Choose the fast fine-tune's recipe and low-noise gain (how its adapters sample) on validation identities.

    python scripts/calibrate_finetune.py --low-noise-gains 1.25,1.5,2 --low-noise-below 100,200 --identities 16 \
        --out runs/finetune_schedule.json [--recipe "learning_rate=1e-2 identity_weight=2" ...] [--no-plain] \
        [--hypernet FOLDER] [--finetune-steps 40] [--tolerance 0.02] [--base PATH]

Fine-tunes each of `--identities` validation identities (never the evaluation seeds) from the hypernet's prediction
with the pipeline's fast fine-tune recipe for the base (`SYNTHFACES_FAST_FINETUNE` on the embedded one) and with each
`--recipe` (space-separated FinetuneConfig fields changed from it; every --recipe is one candidate), told the caption
read from the reference (the default) and, unless --no-plain, on "a sks face"; each is scored at one strength and with
ΔW × each `--low-noise-gains` below each `--low-noise-below` timestep (hyperdiff.core.schedule) in the fidelity
benchmark's scenes. The calibration's rule picks the recipe and schedule: every fine-tune keeps scene fidelity within
`--tolerance` of the lower of the base model's and the unchanged recipe's at one strength, and of those the most
identity similarity to the true renders wins (references in random scenes). Writes every score and the choice as JSON; the
choice is the recipe (`SYNTHFACES_FAST_FINETUNE`, hyperdiff/personalize/pipeline.py) and its `FinetuneConfig.low_noise`.
Logic: hyperdiff.synthfaces.calibrate.calibrate_finetune.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bench import write_json  # scripts/ is on the path
from calibrate_hypernet import describe_low, low_noise_candidates, print_scores

from hyperdiff.config import from_dict, parse_assignments, to_dict
from hyperdiff.core.files import check_writable
from hyperdiff.errors import HyperdiffError
from hyperdiff.personalize.finetune import FinetuneConfig
from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline
from hyperdiff.synthfaces.calibrate import calibrate_finetune
from hyperdiff.synthfaces.encoder import JUDGE_ENCODER_DIR
from hyperdiff.synthfaces.fidelity import FidelityConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write: every score and the chosen schedule")
    p.add_argument("--hypernet", help="hypernet folder (default: the embedded SynthFaces one)")
    p.add_argument("--low-noise-gains", default="", help="comma-separated gains at low-noise timesteps to try"
                   " ('' = one strength only)")
    p.add_argument("--low-noise-below", default="200", help="comma-separated timesteps below which they apply")
    p.add_argument("--low-noise-off-from", default="1000",
                   help="comma-separated timesteps from which ΔW is off, each tried with every gain and --low-noise-below "
                        "(default: 1000, never off)")
    p.add_argument("--recipe", action="append", default=[], metavar="'FIELD=VALUE ...'",
                   help="a candidate recipe: FinetuneConfig fields changed from the base's fast fine-tune, e.g."
                        " 'learning_rate=1e-2 anchor_weight=3' (repeatable; the unchanged recipe is always tried)")
    p.add_argument("--no-plain", action="store_true", help="score only the fine-tunes told the read caption (what a"
                   " user gets), not also those on 'a sks face'")
    p.add_argument("--identities", type=int, default=8, help="validation identities (6 scenes each)")
    p.add_argument("--finetune-steps", type=int, default=40, help="fast fine-tune steps per identity")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest scene-fidelity loss accepted against the base model (or the fine-tune at one "
                        "strength, where that is lower), for both fine-tunes")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per image")
    p.add_argument("--judge", default=str(JUDGE_ENCODER_DIR), help="a second identity encoder's folder: also report its"
                   " ID similarity (default: the shipped judge; '' = none); the choice is made on the shipped encoder's")
    p.add_argument("--base", help="base model (default: the embedded SynthFaces base)")
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        check_writable(out, "--out")
        candidates = low_noise_candidates(args.low_noise_gains, args.low_noise_below, args.low_noise_off_from)
        hdb = HyperDreamBoothPipeline.from_pretrained(args.base, args.hypernet)
        if hdb.hypernet is None:
            raise HyperdiffError("`--hypernet` is required with another `--base`: the fine-tune starts from its prediction")
        config = FidelityConfig(identities=args.identities, steps=args.steps, judge=args.judge,
                                finetune_steps=args.finetune_steps, finetune=hdb.fast_finetune)
        recipes = [config.finetune] + [recipe(config.finetune, text) for text in args.recipe]
        result = calibrate_finetune(hdb.pipe, hdb.hypernet, candidates, config, args.tolerance, recipes,
                                    plain=not args.no_plain)
        write_json(out, {**result, "config": config.to_dict()})
    except HyperdiffError as e:
        print(f"calibrate_finetune: error: {e}", file=sys.stderr)
        return 2
    print_scores("base model", result["base"])
    for r in result["rows"]:
        how = "told the caption read from the reference" if r["caption"] else "without a caption"
        print_scores(f"fine-tune {describe_recipe(result['recipes'][r['recipe']])} {how}"
                     f"{describe_low(r['low_noise']) or ', one strength'}", r)
    print(f"chose {describe_recipe(result['recipe'])}, "
          f"{describe_low(result['low_noise']).removeprefix(', ') or 'one strength'}; wrote {out}")
    return 0


def recipe(start: FinetuneConfig, text: str) -> FinetuneConfig:
    """`start` with the space-separated FIELD=VALUE changes of one `--recipe`."""
    changes = parse_assignments(text.split())
    if not changes:
        raise HyperdiffError(f"`--recipe` must name FinetuneConfig fields as 'FIELD=VALUE ...', got {text!r}")
    data = to_dict(start)
    for key, value in changes.items():
        node, *rest = key.split(".")
        if rest:
            data[node] = {**data[node], rest[0]: value}
        else:
            data[key] = value
    return from_dict(FinetuneConfig, data, where="--recipe")


def describe_recipe(changes: dict) -> str:
    return "(" + (" ".join(f"{k}={v}" for k, v in changes.items()) or "the recipe as it is") + ")"


if __name__ == "__main__":
    sys.exit(main())
