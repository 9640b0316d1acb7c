"""hyperdiff: HyperDreamBooth-style personalization of Stable Diffusion.

Public API (see shared DESIGN.md): `LayerTable`, `Adapter`, `HyperNetwork`, `HyperDreamBoothPipeline`, plus the
`hyperdiff.models` builders.
"""

from hyperdiff.adapter import Adapter, AdapterInfo
from hyperdiff.errors import HyperdiffError
from hyperdiff.hypernet import HyperNetConfig, HyperNetwork
from hyperdiff.layers import LayerTable, TargetConfig
from hyperdiff.lidb import LiDBConfig
from hyperdiff.processors import HyperLoRA, HyperLoRAAttnProcessor, LowRankDelta

__all__ = [
    "Adapter",
    "AdapterInfo",
    "HyperLoRA",
    "HyperLoRAAttnProcessor",
    "HyperNetConfig",
    "HyperNetwork",
    "HyperDreamBoothPipeline",
    "HyperdiffError",
    "LayerTable",
    "LiDBConfig",
    "LowRankDelta",
    "TargetConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in diffusers pipelines and the fine-tuning engine: import it on first use.
    if name == "HyperDreamBoothPipeline":
        from hyperdiff.pipeline import HyperDreamBoothPipeline

        return HyperDreamBoothPipeline
    raise AttributeError(f"module 'hyperdiff' has no attribute {name!r}")
