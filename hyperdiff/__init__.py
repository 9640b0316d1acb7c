"""hyperdiff: HyperDreamBooth-style personalization of Stable Diffusion.

Public API (see shared DESIGN.md): `LayerTable`, `Adapter`, `HyperNetwork`, `HyperDreamBoothPipeline`, plus the
`hyperdiff.models` builders.
"""

import importlib

# public name → module; imported on first use, so `import hyperdiff` (and the CLI's argument checks) stay free of
# torch and diffusers until a model is needed
_PUBLIC = {
    "Adapter": "hyperdiff.adapter",
    "AdapterInfo": "hyperdiff.adapter",
    "HyperLoRA": "hyperdiff.processors",
    "HyperLoRAAttnProcessor": "hyperdiff.processors",
    "HyperNetConfig": "hyperdiff.hypernet",
    "HyperNetwork": "hyperdiff.hypernet",
    "HyperDreamBoothPipeline": "hyperdiff.pipeline",
    "HyperdiffError": "hyperdiff.errors",
    "LayerTable": "hyperdiff.layers",
    "LiDBConfig": "hyperdiff.lidb",
    "LowRankDelta": "hyperdiff.processors",
    "TargetConfig": "hyperdiff.layers",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hyperdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
