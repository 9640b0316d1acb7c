"""Offline model builders.

Contract: everything here builds or loads Stable Diffusion parts with no download unless a hub id is asked for:
`tiny_pipeline` (tiny deterministic SD pipeline for tests and the SynthFaces skeleton), `TinyPipelineConfig`,
`unet_config`/`build_unet` (real SD1.5/SD2.1 UNet shapes, meta device by default), `build_tokenizer` (offline byte-level
CLIP tokenizer), `load_base` (embedded default, folder, .safetensors checkpoint or hub id), `unet_header` (a base's
UNet weights' header, read without loading it) and `quiet_loading` (the libraries' loading bars off
the terminal). Names are imported on first use, so `hyperdiff.models.sources` (and zero-shot personalization)
never imports diffusers.
"""

from importlib import import_module

_WHERE = {
    "EMBEDDED_BASE": "sources", "TINY_BASE": "sources", "unet_header": "sources", "quiet_loading": "sources",
    "resolve_source": "sources", "load_base": "base", "build_unet": "configs", "unet_config": "configs",
    "TinyPipelineConfig": "tiny", "tiny_components": "tiny", "tiny_pipeline": "tiny",
    "DEFAULT_WORDS": "tokenizer", "build_tokenizer": "tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hyperdiff.models' has no attribute {name!r}")
    value = getattr(import_module(f"hyperdiff.models.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
