"""Choose a trained hypernet's output gain on validation identities and write the calibrated hypernet.

    python scripts/calibrate_hypernet.py --hypernet runs/hypernet_d2 --out hyperdiff/assets/synthfaces/hypernet \
        [--gains 1,1.5,2,2.5,3] [--low-noise-gains 1.5,2 --low-noise-below 200,300] [--identities 8]
        [--tolerance 0.02] [--base PATH] [--dtype float16]

Scores the base model and the zero-shot adapters × each gain on `--identities` validation identities (never the
evaluation seeds, references in random scenes) in the fidelity benchmark's scenes, keeps the gain with the best
identity similarity to the true renders whose scene fidelity is within `--tolerance` of the base model's (of gain 1's where that is lower), and saves the hypernet with that gain
in its `alpha` (the choice and every score go into its config.json). With `--low-noise-gains`, every gain is also
scored with ΔW × each of them at the timesteps below each `--low-noise-below` (hyperdiff.core.schedule), and the
winner's low-noise gain goes into the hypernet's config, so the adapters it predicts carry it.
Logic: hyperdiff.synthfaces.calibrate.calibrate_gain, HyperNetwork.set_gain.
"""

from __future__ import annotations

import argparse
import sys

from hyperdiff.core.layers import LayerTable
from hyperdiff.core.schedule import LowNoiseGain
from hyperdiff.errors import HyperdiffError
from hyperdiff.hypernet import HyperNetwork
from hyperdiff.models import load_base
from hyperdiff.personalize.pipeline import DTYPES
from hyperdiff.synthfaces.calibrate import calibrate_gain
from hyperdiff.synthfaces.encoder import JUDGE_ENCODER_DIR
from hyperdiff.synthfaces.fidelity import FidelityConfig


def numbers(flag: str, text: str, kind):
    """Comma-separated numbers of `kind` ('' = none)."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise HyperdiffError(f"`{flag}` must be comma-separated {what}, got {text!r}") from None


def low_noise_candidates(gains: str, below: str, off_from: str = "1000") -> list[LowNoiseGain]:
    """Every `--low-noise-gains` value with every `--low-noise-below` timestep and every `--low-noise-off-from` one."""
    return [LowNoiseGain(g, b, o) for g in numbers("--low-noise-gains", gains, float)
            for b in numbers("--low-noise-below", below, int) for o in numbers("--low-noise-off-from", off_from, int)]


def describe_low(low_noise: dict) -> str:
    low = LowNoiseGain(**low_noise)
    return f", {low.describe()}" if low.active else ""


def print_scores(name: str, row: dict) -> None:
    judged = f" (judge {row['truth_similarity_judge']:.3f})" if "truth_similarity_judge" in row else ""
    print(f"{name}: ID to the truth {row['truth_similarity']:.3f}{judged}, copy index {row['copy_index']:+.3f}, "
          f"scene fidelity {row['scene_fidelity']:.1%}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hypernet", required=True, help="the trained hypernet folder (save_pretrained)")
    p.add_argument("--out", required=True, help="where to write the calibrated hypernet")
    p.add_argument("--gains", default="1,1.5,2,2.5,3", help="comma-separated gains to try (1 is always tried)")
    p.add_argument("--low-noise-gains", default="", help="comma-separated extra gains at low-noise timesteps to try"
                   " (with every --low-noise-below; '' = none)")
    p.add_argument("--low-noise-below", default="300", help="comma-separated timesteps below which they apply")
    p.add_argument("--low-noise-off-from", default="1000",
                   help="comma-separated timesteps from which ΔW is off, each tried with every gain and --low-noise-below "
                        "(default: 1000, never off)")
    p.add_argument("--identities", type=int, default=8, help="validation identities (6 scenes each)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest scene-fidelity loss accepted against the base model (or gain 1, where that is lower)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per image")
    p.add_argument("--judge", default=str(JUDGE_ENCODER_DIR), help="a second identity encoder's folder: also report its"
                   " ID similarity (default: the shipped judge; '' = none); the gain is chosen on the shipped encoder's")
    p.add_argument("--base", help="base model (default: the embedded SynthFaces base)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="dtype of the written weights")
    args = p.parse_args(argv)
    try:
        gains = numbers("--gains", args.gains, float)
        low_noise = low_noise_candidates(args.low_noise_gains, args.low_noise_below, args.low_noise_off_from)
        pipe = load_base(args.base)
        hypernet = HyperNetwork.from_pretrained(args.hypernet, LayerTable.from_unet(pipe.unet))
        result = calibrate_gain(pipe, hypernet, gains, FidelityConfig(identities=args.identities, steps=args.steps,
                                                                   judge=args.judge),
                                args.tolerance, low_noise)
        hypernet.set_gain(result["gain"], result, LowNoiseGain(**result["low_noise"]))
        hypernet.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    except HyperdiffError as e:
        print(f"calibrate_hypernet: error: {e}", file=sys.stderr)
        return 2
    print_scores("base model", result["base"])
    for r in result["rows"]:
        print_scores(f"gain {r['gain']:g}{describe_low(r['low_noise'])}", r)
    print(f"chose gain {result['gain']:g}{describe_low(result['low_noise'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
