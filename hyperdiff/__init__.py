"""hyperdiff: HyperDreamBooth-style personalization of Stable Diffusion.

Public API (see shared DESIGN.md): `LayerTable`, `Adapter`, plus `hyperdiff.models` builders.
"""

from hyperdiff.adapter import Adapter, AdapterInfo
from hyperdiff.errors import HyperdiffError
from hyperdiff.layers import LayerTable, TargetConfig
from hyperdiff.lidb import LiDBConfig
from hyperdiff.processors import HyperLoRA, HyperLoRAAttnProcessor, LowRankDelta

__all__ = [
    "Adapter",
    "AdapterInfo",
    "HyperLoRA",
    "HyperLoRAAttnProcessor",
    "HyperdiffError",
    "LayerTable",
    "LiDBConfig",
    "LowRankDelta",
    "TargetConfig",
]
__version__ = "0.1.0"
