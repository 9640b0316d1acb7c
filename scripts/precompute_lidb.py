"""Stage 1: per-identity DreamBooth-LiDB targets for hypernet training, sharded across processes, restartable.

    python scripts/precompute_lidb.py --config configs/synthfaces.yaml --identities 256 --targets_dir runs/targets
    accelerate launch --multi_gpu --num_processes 2 scripts/precompute_lidb.py --config ...   # CPU: gloo

Identities whose target file exists are skipped; many identities are fine-tuned together in one batch (per-sample
processors). Logic: hyperdiff.hypernet.targets.precompute_targets.
"""

from __future__ import annotations

import sys

from _flags import overrides, parser

from hyperdiff.config import load_config
from hyperdiff.errors import HyperdiffError
from hyperdiff.hypernet.targets import precompute_targets
from hyperdiff.hypernet.training import HypernetTrainConfig


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        folder = precompute_targets(load_config(HypernetTrainConfig, args.config, overrides(args)))
    except HyperdiffError as e:
        print(f"precompute_lidb: error: {e}", file=sys.stderr)
        return 2
    print(f"stage-1 targets in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
