"""hyperdiff: HyperDreamBooth-style personalization of Stable Diffusion.

Public API (see shared DESIGN.md): `LayerTable`, `Adapter`, `HyperNetwork`, `HyperDreamBoothPipeline`, plus the
`hyperdiff.models` builders.

Layout, one subpackage per layer of the architecture (each imports only the ones above it in this list, and the
foundations `errors`, `config`, `inputs`): `core` (layer tables, LiDB, processors, fusion, schedules, the Adapter and
its files), `models` (base loading), `hypernet` (the hypernetwork and its training), `personalize` (the pipeline and
the fine-tune), `synthfaces` (the embedded world, its encoders, base-model training and benchmarks); `cli` and `ui`
sit on top and nothing imports them. The modules' old dotted paths (`hyperdiff.adapter`, `hyperdiff.pipeline`, ...)
still import: `_MOVED` below maps each to its new home.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

# public name → module; imported on first use, so `import hyperdiff` (and the CLI's argument checks) stay free of
# torch and diffusers until a model is needed
_PUBLIC = {
    "Adapter": "hyperdiff.core.adapter",
    "AdapterInfo": "hyperdiff.core.adapter",
    "HyperLoRA": "hyperdiff.core.processors",
    "HyperLoRAAttnProcessor": "hyperdiff.core.processors",
    "HyperNetConfig": "hyperdiff.hypernet",
    "HyperNetwork": "hyperdiff.hypernet",
    "HyperDreamBoothPipeline": "hyperdiff.personalize.pipeline",
    "HyperdiffError": "hyperdiff.errors",
    "LayerTable": "hyperdiff.core.layers",
    "LiDBConfig": "hyperdiff.core.lidb",
    "LowRankDelta": "hyperdiff.core.processors",
    "TargetConfig": "hyperdiff.core.layers",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"

# Old dotted path → its new home. `import hyperdiff.pipeline` gives the module object `hyperdiff.personalize.pipeline`
# itself (one object under two names in sys.modules), so attributes read or monkeypatched through either name are the
# same. No file is left at an old path.
_MOVED = {
    "hyperdiff.layers": "hyperdiff.core.layers",
    "hyperdiff.lidb": "hyperdiff.core.lidb",
    "hyperdiff.processors": "hyperdiff.core.processors",
    "hyperdiff.fusion": "hyperdiff.core.fusion",
    "hyperdiff.adapter": "hyperdiff.core.adapter",
    "hyperdiff.formats": "hyperdiff.core.formats",
    "hyperdiff.files": "hyperdiff.core.files",
    "hyperdiff.schedule": "hyperdiff.core.schedule",
    "hyperdiff.random_adapters": "hyperdiff.core.random_adapters",
    "hyperdiff.train.hypernet": "hyperdiff.hypernet.training",
    "hyperdiff.pipeline": "hyperdiff.personalize.pipeline",
    "hyperdiff.finetune": "hyperdiff.personalize.finetune",
    "hyperdiff.data.synthfaces": "hyperdiff.synthfaces.world",
    "hyperdiff.metrics": "hyperdiff.synthfaces.encoder",
    "hyperdiff.train.base_model": "hyperdiff.synthfaces.base_model",
    "hyperdiff.evaluation": "hyperdiff.synthfaces.evaluation",
    "hyperdiff.fidelity": "hyperdiff.synthfaces.fidelity",
    "hyperdiff.sheet": "hyperdiff.synthfaces.sheet",
    "hyperdiff.demo": "hyperdiff.synthfaces.demo",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hyperdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old dotted path of `_MOVED` as its new module. First on `sys.meta_path`, so no other finder (an
    editable install's, a stale copy on the path) answers for a name that moved."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in _MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, cls())

    def create_module(self, spec):
        return None  # a placeholder module; `exec_module` puts the real one in its place

    def exec_module(self, module) -> None:
        # the import system returns whatever sys.modules holds under the name once this returns, and binds it as
        # the parent package's attribute: the new module, its own attributes (__name__, __spec__) untouched
        sys.modules[module.__name__] = importlib.import_module(_MOVED[module.__name__])


if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
