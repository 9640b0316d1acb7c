"""Offline model builders.

Contract: everything here builds or loads Stable Diffusion parts with no download unless a hub id is asked for:
`tiny_pipeline` (tiny deterministic SD pipeline for tests and the SynthFaces skeleton), `TinyPipelineConfig`,
`unet_config`/`build_unet` (real SD1.5/SD2.1 UNet shapes, meta device by default), `build_tokenizer` (offline byte-level
CLIP tokenizer), `load_base` (embedded default, folder, .safetensors checkpoint or hub id) and `quiet_loading` (the
libraries' loading bars off the terminal).
"""

from hyperdiff.models.base import EMBEDDED_BASE, TINY_BASE, load_base, quiet_loading
from hyperdiff.models.configs import build_unet, unet_config
from hyperdiff.models.tiny import TinyPipelineConfig, tiny_components, tiny_pipeline
from hyperdiff.models.tokenizer import DEFAULT_WORDS, build_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "EMBEDDED_BASE",
    "TINY_BASE",
    "TinyPipelineConfig",
    "build_tokenizer",
    "build_unet",
    "load_base",
    "quiet_loading",
    "tiny_components",
    "tiny_pipeline",
    "unet_config",
]
