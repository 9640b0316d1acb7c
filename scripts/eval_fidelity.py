"""Fidelity benchmark on held-out SynthFaces identities (seeds >= 1,000,000), paper-style, JSON + Markdown.

    python scripts/eval_fidelity.py --hypernet shipped=PATH [--ablation mlp=PATH --ablation k1=PATH] \
        [--base PATH] [--identities 16] [--curve 100,200,400] [--dreambooth-plain | --no-dreambooth] \
        [--reference random|CAPTION] [--no-one-strength] [--seed 0] [--out outputs/fidelity]

Identity is scored against the true render of each identity in each prompted scene (similarity to the reference is
the copy column beside it); references are drawn in random scenes unless --reference names one. Rows: base model,
DreamBooth-LiDB from scratch told the caption read from the reference, as the fine-tunes are by default (with its
convergence curve, from one run; with --dreambooth-plain also trained on "a sks face"; none with --no-dreambooth),
each --hypernet zero-shot (and, when its adapters carry a low-noise gain, at one strength) and with the 40-step
rank-relaxed fine-tune (as a user gets it, and on "a sks face"), each --ablation zero-shot. Logic: hyperdiff.synthfaces.fidelity.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hyperdiff import synthfaces
from hyperdiff.core.layers import LayerTable
from hyperdiff.errors import HyperdiffError
from hyperdiff.hypernet import HyperNetwork
from hyperdiff.models import load_base
from hyperdiff.synthfaces.encoder import JUDGE_ENCODER_DIR
from hyperdiff.synthfaces.fidelity import FidelityConfig, run_fidelity, write_fidelity


def _named(items: list[str], flag: str, table: LayerTable) -> dict[str, HyperNetwork]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise HyperdiffError(f"`{flag}` must be NAME=PATH, got {item!r}")
        out[name] = HyperNetwork.from_pretrained(path, table)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base model (default: the embedded SynthFaces base)")
    p.add_argument("--hypernet", action="append", default=[], metavar="NAME=PATH",
                   help="a hypernet: zero-shot and fast fine-tune rows (repeatable)")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=PATH",
                   help="a hypernet with a zero-shot row only (repeatable)")
    p.add_argument("--curve", default="50,100,200,400", help="DreamBooth-LiDB steps, comma-separated: one run to the"
                   " longest, scored at each; the last listed is its row")
    p.add_argument("--dreambooth-plain", action="store_true", help="also a DreamBooth-LiDB row (and curve) trained on"
                   " 'a sks face' instead of the caption read from the reference")
    p.add_argument("--reference", default="random", help="the references' scene: 'random' (one per identity, drawn from"
                   " its seed) or a caption naming one, e.g. 'a face, neutral, on a green background'")
    p.add_argument("--no-one-strength", action="store_true", help="leave out the @one-strength rows (the same adapters"
                   " sampled without their schedules)")
    p.add_argument("--no-dreambooth", action="store_true", help="leave out the DreamBooth-LiDB rows, the slow part (a"
                   " seed gives the same rows every time: re-score hypernets against an earlier run's)")
    p.add_argument("--identities", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--judge", default=str(JUDGE_ENCODER_DIR), help="a second identity encoder's folder: every row also"
                   " gets its ID similarity (default: the shipped judge, which no hypernet trains against; '' = none)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every fine-tune's draws and every generation's"
                   " noise: another seed replicates the whole table (the identities stay the same)")
    p.add_argument("--out", default="outputs/fidelity")
    args = p.parse_args(argv)
    try:
        pipe = load_base(args.base)
        table = LayerTable.from_unet(pipe.unet)
        hypernets = _named(args.hypernet, "--hypernet", table)
        ablations = _named(args.ablation, "--ablation", table)
        try:
            curve = tuple(int(v) for v in args.curve.split(","))
        except ValueError:
            raise HyperdiffError(f"`--curve` must be comma-separated step counts, got {args.curve!r}") from None
        reference = ("random" if args.reference == "random"
                     else tuple(synthfaces.scene_from_caption(args.reference).to_dict().values()))
        config = FidelityConfig(identities=args.identities, steps=args.steps, finetune_steps=args.finetune_steps,
                                dreambooth_curve=curve, dreambooth_plain=args.dreambooth_plain, judge=args.judge,
                                dreambooth_rows=not args.no_dreambooth, seed=args.seed, reference_scene=reference,
                                one_strength_rows=not args.no_one_strength)
        result = run_fidelity(pipe, hypernets, config, ablations)
    except HyperdiffError as e:
        print(f"eval_fidelity: error: {e}", file=sys.stderr)
        return 2
    command = "python " + shlex.join(["scripts/eval_fidelity.py", *(argv if argv is not None else sys.argv[1:])])
    paths = write_fidelity(result, Path(args.out), command)
    print(Path(paths["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
