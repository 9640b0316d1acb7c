"""Loading the base Stable Diffusion model.

Contract: `load_base(source)` returns a `diffusers.StableDiffusionPipeline` with `safety_checker=None`, its progress bar
off, on `device` (in `dtype` when given). `source` is one of:
  * None — the embedded SynthFaces base (`EMBEDDED_BASE`; until it ships, a `HyperdiffError` asks for a base);
  * "hyperdiff:tiny" — `tiny_pipeline(seed=0)`, the random-init offline test base;
  * a local diffusers pipeline folder (has `model_index.json`), loaded with `local_files_only=True`;
  * a single-file checkpoint `*.safetensors` (`StableDiffusionPipeline.from_single_file`);
  * a Hugging Face hub id such as "runwayml/stable-diffusion-v1-5" (from the cache when offline).
Only safetensors weights are ever read: `.ckpt`/`.pt`/`.bin` (pickle) files are refused, and folders load with
`use_safetensors=True`. Every failure caused by `source` is a one-line `HyperdiffError` raised without the chained
traceback; anything else is a bug and propagates.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError, safe_open

from hyperdiff.errors import HyperdiffError
from hyperdiff.models.sources import EMBEDDED_BASE, TINY_BASE, bars_quieted, resolve_source

# Keys that mark an original (LDM/CompVis) Stable Diffusion checkpoint's UNet.
_LDM_UNET_PREFIX = "model.diffusion_model."


def _offline() -> bool:
    """Offline mode as the environment says *now* (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(". ")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _hub_failure(
    label: str, exc: BaseException, what: str, hint: str = "pass a local folder or a .safetensors file"
) -> HyperdiffError:
    """Turn a hub/cache failure into one line; `what` names what was fetched ("it" or "its diffusers config")."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain = _chain(exc)
    if any(isinstance(e, (GatedRepoError, RepositoryNotFoundError)) for e in chain):
        return HyperdiffError(f"base {label} could not be loaded: {what} is not a public model on the Hugging Face hub")
    text = " ".join(str(e) for e in chain).lower()
    unreachable = (
        _offline()
        or any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError))
               for e in chain)
        or "cached locally" in text
        or "connect" in text
    )
    if unreachable:
        return HyperdiffError(
            f"base {label} could not be loaded: the Hugging Face hub is unreachable and {what} is not in the local "
            f"cache ({hint})"
        )
    return HyperdiffError(f"base {label} could not be loaded: {_first_line(exc)}")


def _finish(pipe: StableDiffusionPipeline, device: str | torch.device) -> StableDiffusionPipeline:
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.register_modules(safety_checker=None)
    pipe.register_to_config(requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.device(device))


def _dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    if dtype is None:
        return {}
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HyperdiffError(f"`dtype` must be a floating torch.dtype or None, got {dtype!r}")
    return {"dtype": dtype}


def _load_folder(path: Path, label: str, dtype: torch.dtype | None) -> StableDiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise HyperdiffError(f"`base` folder {label} is not a diffusers pipeline folder (no model_index.json)")
    try:
        return StableDiffusionPipeline.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, safety_checker=None,
            requires_safety_checker=False, **_dtype_kwargs(dtype),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HyperdiffError(f"`base` folder {label} could not be loaded: {_first_line(exc)}") from None


def _load_single_file(
    path: Path, label: str, dtype: torch.dtype | None, local_files_only: bool
) -> StableDiffusionPipeline:
    try:
        with safe_open(str(path), framework="pt") as f:
            is_sd = any(key.startswith(_LDM_UNET_PREFIX) for key in f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise HyperdiffError(f"`base` file {label} is not a readable .safetensors file: {_first_line(exc)}") from None
    if not is_sd:
        raise HyperdiffError(
            f"`base` file {label} is not a Stable Diffusion checkpoint (no '{_LDM_UNET_PREFIX}*' tensors)"
        )
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=local_files_only, safety_checker=None, requires_safety_checker=False,
            **_dtype_kwargs(dtype),
        )
    except Exception as exc:  # noqa: BLE001 - converting a foreign checkpoint fails in many ways, all the file's fault
        hub_related = isinstance(exc, OSError) or any(
            type(e).__module__.startswith(("huggingface_hub", "httpx", "requests")) for e in _chain(exc)
        )
        if hub_related:  # the checkpoint is local, but diffusers fetches the matching pipeline config from the hub
            raise _hub_failure(label, exc, "its diffusers config", "pass a local diffusers folder instead") from None
        raise HyperdiffError(
            f"`base` file {label} could not be loaded as a Stable Diffusion checkpoint "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _load_hub(repo_id: str, dtype: torch.dtype | None, local_files_only: bool) -> StableDiffusionPipeline:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    label = repr(repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HyperdiffError(
            f"`base` must be an existing path or a hub id like 'owner/name', got {label}"
        ) from None
    try:
        return StableDiffusionPipeline.from_pretrained(
            repo_id, local_files_only=local_files_only, use_safetensors=True, safety_checker=None,
            requires_safety_checker=False, **_dtype_kwargs(dtype),
        )
    except (OSError, ValueError) as exc:
        raise _hub_failure(label, exc, "it") from None


def load_base(
    source: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
) -> StableDiffusionPipeline:
    """Load a base SD pipeline from the embedded default, a folder, a .safetensors checkpoint or a hub id."""
    _dtype_kwargs(dtype)  # validate before any I/O
    resolved = resolve_source(source)
    if local_files_only is None:
        local_files_only = _offline()
    if resolved.kind == "tiny":
        from hyperdiff.models.tiny import tiny_pipeline

        return tiny_pipeline(seed=0, dtype=dtype or torch.float32, device=device)
    if bars_quieted():  # `quiet_loading()` reaches diffusers' own bars once it is imported
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    path = Path(resolved.location)
    if resolved.kind == "embedded":
        if dtype is None and torch.device(device).type == "cpu":
            dtype = torch.float32  # shipped in fp16 to stay small; CPUs compute fp32 much faster
        return _finish(_load_folder(path, resolved.label, dtype), device)
    if resolved.kind == "folder":
        return _finish(_load_folder(path, resolved.label, dtype), device)
    if resolved.kind == "file":
        return _finish(_load_single_file(path, resolved.label, dtype, local_files_only), device)
    return _finish(_load_hub(resolved.location, dtype, local_files_only), device)
