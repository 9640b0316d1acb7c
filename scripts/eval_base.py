"""Base-model report on evaluation seeds: scene-word accuracy, identity diversity, sample grid (JSON + Markdown).

    python scripts/eval_base.py [--base PATH] [--out outputs/base_report] [--per-scene 4] [--steps 25] [--judge DIR]

Logic: hyperdiff.synthfaces.evaluation.evaluate_base.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hyperdiff.errors import HyperdiffError
from hyperdiff.models import load_base
from hyperdiff.synthfaces.encoder import JUDGE_ENCODER_DIR, IdentityEncoder
from hyperdiff.synthfaces.evaluation import evaluate_base, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base model (default: the embedded SynthFaces base)")
    p.add_argument("--out", default="outputs/base_report")
    p.add_argument("--per-scene", type=int, default=4, help="images per scene (48 scenes)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--judge", default=str(JUDGE_ENCODER_DIR), help="a second identity encoder's folder whose heads read"
                   " the hat and expression words again (default: the shipped judge; '' = none)")
    args = p.parse_args(argv)
    try:
        judge = IdentityEncoder.from_pretrained(args.judge) if args.judge else None
        pipe = load_base(args.base)
        result, grid = evaluate_base(pipe, per_scene=args.per_scene, steps=args.steps, guidance=args.guidance, judge=judge)
    except HyperdiffError as e:
        print(f"eval_base: error: {e}", file=sys.stderr)
        return 2
    paths = write_report(result, grid, Path(args.out), "python " + shlex.join(["scripts/eval_base.py", *(argv or sys.argv[1:])]))
    print(Path(paths["markdown"]).read_text())
    print("wrote", ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
