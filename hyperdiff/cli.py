"""The `hyperdiff` command line.

Contract (DESIGN.md, "CLI"): subcommands map one-to-one onto library calls; the CLI holds no model logic.
Exit code 0 on success; 2 on bad input, with one line `hyperdiff: error: <what input, what was wrong, what was
expected>` on stderr and no traceback (argparse's own usage errors also exit 2). Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hyperdiff.errors import HyperdiffError


def _cmd_export(args: argparse.Namespace) -> None:
    from hyperdiff.adapter import Adapter

    adapter = Adapter.load(args.adapter)
    path = adapter.export(args.out, format=args.format)
    print(f"wrote {args.format} LoRA ({adapter.kind} adapter, rank {adapter.rank}, alpha {adapter.alpha:g}) to {path}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from hyperdiff.adapter import Adapter

    ad = Adapter.load(args.adapter)
    size = Path(args.adapter).stat().st_size
    rows = [
        ("kind", ad.kind),
        ("layers", str(len(ad.factors))),
        ("rank", str(ad.rank)),
        ("alpha", f"{ad.alpha:g} (scale {ad.scale:g})"),
        ("values", f"{ad.num_values:,}"),
        ("file size", f"{size:,} bytes"),
        ("base fingerprint", ad.fingerprint),
        ("base model", ad.info.base_model or "-"),
        ("architecture", ad.info.architecture),
        ("token", ad.info.token or "-"),
        ("source", ad.info.source or "-"),
    ]
    if ad.lidb:
        rows.insert(3, ("lidb", f"a={ad.lidb.a} b={ad.lidb.b} aux_seed={ad.lidb.aux_seed}"))
    for key, value in rows:
        print(f"{key:>17}: {value}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from hyperdiff.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperdiff",
        description="Personalize Stable Diffusion from one photo: hypernetwork-predicted LiDB adapters, exact "
        "injection, and LoRA files that diffusers, A1111 and ComfyUI load.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="convert a native adapter into a LoRA file other tools load")
    p.add_argument("adapter", help="native hyperdiff adapter (.safetensors)")
    p.add_argument("--format", required=True, choices=["diffusers", "kohya"],
                   help="diffusers: for pipe.load_lora_weights (PEFT keys + LoraConfig metadata); "
                   "kohya: lora_unet_* keys with per-module alpha, for A1111 and ComfyUI")
    p.add_argument("--out", required=True, help="output .safetensors path (written atomically)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect", help="print what a native adapter file holds")
    p.add_argument("adapter", help="native hyperdiff adapter (.safetensors)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo", help="run the main job on the embedded default, offline")
    p.add_argument("--out", default="outputs/demo", help="folder for the images, sheet and adapters (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # An application, not a library: keep the libraries' import-time chatter (optional torchvision backends,
    # "no LoRA keys for the text encoder") off the user's terminal unless they ask for it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HyperdiffError as e:
        print(f"hyperdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hyperdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
