"""Timing shared by the benchmark scripts: wall-clock seconds of work that has finished on its device."""

from __future__ import annotations

import platform
import time

import torch


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
