"""Train the hypernetwork (stage 2); `accelerate launch`-able on 1 CPU process up to many GPUs.

    python scripts/train_hypernet.py --config configs/synthfaces.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_hypernet.py --config configs/synthfaces.yaml  # CPU: gloo

The final hypernet is written with save_pretrained into --output_dir; checkpoints go to --output_dir/checkpoint-N
and a killed run continues with --resume_from_checkpoint latest (the default). Nothing is written into the shipped
models (hyperdiff/assets/) unless --export_dir (or --output_dir) names that folder on the command line: a config
pointing there is refused. Logic: hyperdiff.hypernet.training.
"""

from __future__ import annotations

import sys

from _flags import overrides, parser

from hyperdiff.config import load_config
from hyperdiff.errors import HyperdiffError
from hyperdiff.hypernet.training import HypernetTrainConfig, train_hypernet
from hyperdiff.inputs import check_outside_assets


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        cfg = load_config(HypernetTrainConfig, args.config, overrides(args))
        for flag in ("output_dir", "export_dir"):
            check_outside_assets(getattr(cfg, flag), f"--{flag}", named=getattr(args, flag) == getattr(cfg, flag))
        path = train_hypernet(cfg, resume=args.resume_from_checkpoint == "latest")
    except HyperdiffError as e:
        print(f"train_hypernet: error: {e}", file=sys.stderr)
        return 2
    print(f"hypernet saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
