"""Flags shared by the hypernet scripts: diffusers' training-script names, each overriding the --config file."""

from __future__ import annotations

import argparse

from hyperdiff.config import parse_assignments

OVERRIDES = {  # flag → dotted field of HypernetTrainConfig
    "output_dir": "output_dir",
    "base": "base",
    "max_train_steps": "max_train_steps",
    "train_batch_size": "train_batch_size",
    "learning_rate": "learning_rate",
    "max_grad_norm": "max_grad_norm",
    "checkpointing_steps": "checkpointing_steps",
    "seed": "seed",
    "report_to": "report_to",
    "targets_dir": "targets_dir",
    "identities": "precompute_identities",
    "cpu": "cpu",
    "validation_steps": "validation_steps",
    "export_dir": "export_dir",
    "init_from": "init_from",
}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file filling HypernetTrainConfig (every flag below overrides it)")
    p.add_argument("--output_dir", help="checkpoints (checkpoint-N) and the final hypernet folder")
    p.add_argument("--export_dir", help="also save the final hypernet here in fp16 ('' = no export)")
    p.add_argument("--init_from", help="start from this trained hypernet folder's weights (same architecture; fresh"
                   " optimizer and LR schedule; a checkpoint in --output_dir wins)")
    p.add_argument("--base", help="base model: folder, .safetensors, hub id, 'hyperdiff:tiny' (default: embedded)")
    p.add_argument("--max_train_steps", type=int)
    p.add_argument("--train_batch_size", type=int, help="identities per process per step")
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--max_grad_norm", type=float, help="clip the gradient norm to this (0 = no clipping)")
    p.add_argument("--checkpointing_steps", type=int)
    p.add_argument("--resume_from_checkpoint", choices=["latest", "none"], default="latest")
    p.add_argument("--seed", type=int)
    p.add_argument("--report_to", choices=["tensorboard", "none"])
    p.add_argument("--targets_dir", help="stage-1 LiDB targets (precompute_lidb.py output)")
    p.add_argument("--identities", type=int, help="stage 1: number of identities to precompute")
    p.add_argument("--validation_steps", type=int, help="write validation images every N steps (0 = never)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="assignments",
                   help="override any config field by its dotted name, e.g. --set hypernet.decoder=mlp (repeatable)")
    p.add_argument("--cpu", action="store_true", default=None,
                   help="train on CPU processes (automatic without CUDA when accelerate launches several)")
    return p


def overrides(args: argparse.Namespace) -> dict:
    """The named flags, then every --set KEY=VALUE (later wins)."""
    return {**{field: getattr(args, flag) for flag, field in OVERRIDES.items()}, **parse_assignments(args.assignments)}
