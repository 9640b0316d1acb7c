"""Train the embedded SynthFaces base model (VAE, then text encoder + UNet) and export it as a diffusers folder.

    python scripts/train_base.py --config configs/synthfaces_base.yaml
    accelerate launch scripts/train_base.py --config configs/synthfaces_base.yaml --resume_from_checkpoint latest

Every flag overrides the config file; a killed run resumes from its latest checkpoint in `--output_dir`.
The training loop lives in `hyperdiff.synthfaces.base_model`.
"""

from __future__ import annotations

import argparse
import sys

from hyperdiff.config import load_config, parse_assignments
from hyperdiff.errors import HyperdiffError
from hyperdiff.inputs import check_outside_assets
from hyperdiff.synthfaces.base_model.config import BaseTrainConfig
from hyperdiff.synthfaces.base_model.train import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file filling BaseTrainConfig")
    p.add_argument("--output_dir", help="checkpoints, caches and logs")
    p.add_argument("--export_dir", help="where the final diffusers folder goes")
    p.add_argument("--max_train_steps", type=int, help="UNet stage steps")
    p.add_argument("--vae_steps", type=int, help="VAE stage steps")
    p.add_argument("--train_batch_size", type=int, help="UNet stage batch size")
    p.add_argument("--learning_rate", type=float, help="UNet stage learning rate")
    p.add_argument("--images", type=int, help="number of cached training renders")
    p.add_argument("--checkpointing_steps", type=int)
    p.add_argument("--resume_from_checkpoint", choices=["latest", "none"], default="latest",
                   help="'latest' (default) continues from the newest checkpoint in --output_dir")
    p.add_argument("--export_only", action="store_true", help="export the latest checkpoint's EMA weights and stop")
    p.add_argument("--seed", type=int)
    p.add_argument("--report_to", choices=["tensorboard", "none"])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="assignments",
                   help="override any config field by its dotted name, e.g. --set decoder.steps=3000 (repeatable)")
    args = p.parse_args(argv)
    overrides = {
        "output_dir": args.output_dir, "export_dir": args.export_dir, "unet.steps": args.max_train_steps,
        "vae.steps": args.vae_steps, "unet.batch_size": args.train_batch_size, "unet.learning_rate": args.learning_rate,
        "data.images": args.images, "checkpointing_steps": args.checkpointing_steps, "seed": args.seed,
        "report_to": args.report_to,
    }
    try:
        overrides.update(parse_assignments(args.assignments))
        cfg = load_config(BaseTrainConfig, args.config, overrides)
        for flag in ("output_dir", "export_dir"):
            check_outside_assets(getattr(cfg, flag), f"--{flag}", named=getattr(args, flag) == getattr(cfg, flag))
        path = train(cfg, resume=args.resume_from_checkpoint == "latest", export_only=args.export_only)
    except HyperdiffError as e:
        print(f"train_base: error: {e}", file=sys.stderr)
        return 2
    print(f"exported the base model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
