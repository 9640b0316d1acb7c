"""Shared by the benchmark and calibration scripts: flag checks that fail before any model is built (a one-line usage error, exit 2),
wall-clock seconds of work that has finished on its device, and the JSON result written atomically."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hyperdiff.core.files import atomic_path, check_writable
from hyperdiff.errors import HyperdiffError
from hyperdiff.personalize.pipeline import resolve_device, resolve_dtype


def positive_int(text: str) -> int:
    """argparse `type`: a positive integer (a step or repeat count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def device_and_dtype(parser: argparse.ArgumentParser, device: str | None, dtype: str | None
                     ) -> tuple[torch.device, torch.dtype]:
    """`--device` and `--dtype` resolved like the pipeline does, or the parser's usage error (exit 2)."""
    try:
        dev = resolve_device(device)
        return dev, resolve_dtype(dtype, dev)
    except HyperdiffError as e:
        parser.error(str(e))


def checked_out(parser: argparse.ArgumentParser, path: str) -> Path:
    """`--out` checked before any work: a folder, or a parent that cannot be made or written, is a usage error."""
    try:
        check_writable(Path(path), "`--out`")
    except HyperdiffError as e:
        parser.error(str(e))
    return Path(path)


def write_json(path: Path, result: dict) -> None:
    """`result` as JSON at `path`, through a temporary file beside it (never half a file)."""
    with atomic_path(path, "`--out`") as tmp:
        tmp.write_text(json.dumps(result, indent=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, repeats: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Seconds per call of `fn`, each measured from an idle device until its work is done."""
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def describe_device(device: torch.device) -> dict:
    """What ran the numbers: the GPU's name, or the processor and its thread count."""
    if device.type == "cuda":
        return {"device": str(device), "gpu": torch.cuda.get_device_name(device)}
    return {"device": device.type, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
