"""Fidelity benchmark on held-out SynthFaces identities (seeds >= 1,000,000), paper-style, JSON + Markdown.

    python scripts/eval_fidelity.py --hypernet attention=PATH [--hypernet mlp=PATH --hypernet k1=PATH] \
        [--base PATH] [--identities 16] [--out outputs/fidelity]

Rows: base model, DreamBooth-LiDB from scratch (with its convergence curve), each hypernet zero-shot and with the
40-step rank-relaxed fine-tune. Logic: hyperdiff.fidelity.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hyperdiff.errors import HyperdiffError
from hyperdiff.fidelity import FidelityConfig, run_fidelity, write_fidelity
from hyperdiff.hypernet import HyperNetwork
from hyperdiff.layers import LayerTable
from hyperdiff.models import load_base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base model (default: the embedded SynthFaces base)")
    p.add_argument("--hypernet", action="append", default=[], metavar="NAME=PATH", help="a hypernet row (repeatable)")
    p.add_argument("--identities", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--out", default="outputs/fidelity")
    args = p.parse_args(argv)
    try:
        pipe = load_base(args.base)
        table = LayerTable.from_unet(pipe.unet)
        hypernets = {}
        for item in args.hypernet:
            name, sep, path = item.partition("=")
            if not sep:
                raise HyperdiffError(f"`--hypernet` must be NAME=PATH, got {item!r}")
            hypernets[name] = HyperNetwork.from_pretrained(path, table)
        config = FidelityConfig(identities=args.identities, steps=args.steps, finetune_steps=args.finetune_steps)
        result = run_fidelity(pipe, hypernets, config)
    except HyperdiffError as e:
        print(f"eval_fidelity: error: {e}", file=sys.stderr)
        return 2
    command = "python " + shlex.join(["scripts/eval_fidelity.py", *(argv if argv is not None else sys.argv[1:])])
    paths = write_fidelity(result, Path(args.out), command)
    print(Path(paths["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
