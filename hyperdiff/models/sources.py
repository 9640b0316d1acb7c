"""Where a base model comes from, and its UNet's layer table read without loading the base.

Contract (imports neither torch nor diffusers, so zero-shot personalization can skip the base):
- `resolve_source(source)` → `BaseSource(kind, location, label)`, kind one of "embedded" (None), "tiny"
  (`TINY_BASE`), "folder", "file" (a single-file `.safetensors` checkpoint) or "hub" (an id like 'owner/name').
  Every problem the source itself shows (a pickle suffix, a missing path, a file that is not `.safetensors`, an
  empty string, not a path or a string) is the one-line `HyperdiffError` that `load_base` raises for it.
- `unet_header(source)` → the merged safetensors header ({tensor name: {"dtype", "shape", ...}}) of the base's
  diffusers UNet weights (one file or a sharded index) — the embedded base, a diffusers folder, a hub id in the
  local cache — read without loading a tensor; None when the base must be loaded to know its UNet (the tiny test
  base is built, a single-file checkpoint uses the original layout, a hub id not cached, another layout).
  `LayerTable.from_header` turns it into the base's layer table.
- `quiet_loading()`: the libraries' loading bars off the terminal (an application's choice: the CLI unless
  `--verbose`, the web UI's server) without importing them: it sets `HF_HUB_DISABLE_PROGRESS_BARS`, which
  huggingface_hub and transformers read when imported and `load_base` applies to diffusers, and switches off
  the bars of those already imported.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hyperdiff.errors import HyperdiffError
from hyperdiff.inputs import ASSETS_DIR, read_header

# The embedded SynthFaces base, a diffusers folder shipped inside the package.
EMBEDDED_BASE: Path = ASSETS_DIR / "synthfaces" / "base"
# The built-in offline test base: `tiny_pipeline(seed=0)`, random-init (tests, CI and smoke runs of the scripts).
TINY_BASE = "hyperdiff:tiny"

PICKLE_SUFFIXES: frozenset[str] = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
_FILE_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


@dataclass(frozen=True)
class BaseSource:
    kind: str  # "embedded" | "tiny" | "folder" | "file" | "hub"
    location: str  # the folder or file path, the hub id; "" for the tiny base
    label: str  # how error messages name it


def _looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else that is not an existing path is treated as a path."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_SUFFIXES
        or os.path.exists(source)
    )


def resolve_source(source: str | os.PathLike[str] | None) -> BaseSource:
    if source is None:
        if not EMBEDDED_BASE.is_dir():
            raise HyperdiffError(
                "the embedded SynthFaces base is not shipped yet: pass a base (a diffusers folder, a .safetensors "
                "checkpoint or a hub id)"
            )
        return BaseSource("embedded", str(EMBEDDED_BASE), repr(str(EMBEDDED_BASE)))
    if source == TINY_BASE:
        return BaseSource("tiny", "", repr(TINY_BASE))
    if not isinstance(source, (str, os.PathLike)):
        raise HyperdiffError(f"`base` must be a path or a hub id, got {type(source).__name__}")
    text = os.fspath(source)
    if not text.strip():
        raise HyperdiffError("`base` must be a path or a hub id, got an empty string")
    if not (isinstance(source, os.PathLike) or _looks_like_path(text)):
        return BaseSource("hub", text, repr(text))
    path, label = Path(text).expanduser(), repr(text)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise HyperdiffError(
            f"`base` file {label} is a pickle checkpoint ({suffix}); hyperdiff only loads safetensors: "
            "convert it to .safetensors or a diffusers folder"
        )
    if not path.exists():
        raise HyperdiffError(f"`base` path {label} does not exist")
    if path.is_dir():
        return BaseSource("folder", str(path), label)
    if suffix != ".safetensors":
        raise HyperdiffError(
            f"`base` file {label} must be a .safetensors checkpoint or a diffusers folder, got a {suffix or 'suffixless'} file"
        )
    return BaseSource("file", str(path), label)


def _unet_weights(folder: Path) -> dict | None:
    """The merged header of a diffusers folder's UNet weights (one file or a sharded index), None when absent."""
    single = folder / UNET_WEIGHTS
    if single.is_file():
        return read_header(single, "base UNet weights")
    index = folder / (UNET_WEIGHTS + ".index.json")
    if not index.is_file():
        return None
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    header: dict = {}
    for shard in shards:
        path = index.parent / shard
        if not path.is_file():
            return None
        header.update(read_header(path, "base UNet weights"))
    return header


def _cached_hub_folder(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", UNET_WEIGHTS, UNET_WEIGHTS + ".index.json"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):  # a snapshot folder of the cache
            return Path(found).parents[name.count("/")]
    return None


def unet_header(source: str | os.PathLike[str] | None) -> dict | None:
    resolved = resolve_source(source)
    if resolved.kind in ("embedded", "folder"):
        folder: Path | None = Path(resolved.location)
    elif resolved.kind == "hub":
        try:
            folder = _cached_hub_folder(resolved.location)
        except Exception:  # noqa: BLE001 - an id the cache cannot look up: the full load says what is wrong
            folder = None
    else:
        folder = None
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    try:
        return _unet_weights(folder) or None
    except HyperdiffError:
        return None  # unreadable weights: loading the base reports them


def quiet_loading() -> None:
    os.environ[PROGRESS_BARS_ENV] = "1"
    for module, switch in (("huggingface_hub.utils", "disable_progress_bars"),
                           ("transformers.utils.logging", "disable_progress_bar"),
                           ("diffusers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:
            getattr(sys.modules[module], switch)()


def bars_quieted() -> bool:
    """Whether `quiet_loading` (or the user, through the environment) switched the loading bars off."""
    return os.environ.get(PROGRESS_BARS_ENV, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
