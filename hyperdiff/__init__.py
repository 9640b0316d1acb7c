"""hyperdiff: HyperDreamBooth-style personalization of Stable Diffusion.

Public API (see shared DESIGN.md): `LayerTable`, `Adapter`, `HyperNetwork`, `HyperDreamBoothPipeline`, plus the
`hyperdiff.models` builders.

Layout, one subpackage per layer of the architecture: `core` (layer tables, LiDB, processors, fusion, schedules, the
Adapter and its files; it imports only the foundations `errors`, `config` and `inputs`), `models` (base loading),
`hypernet` (the hypernetwork and its training), `personalize` (the pipeline and the fine-tune), `synthfaces` (the
embedded world, its encoders, base-model training and benchmarks); `cli` and `ui` sit on top and nothing imports them.
The modules' old dotted paths (`hyperdiff.adapter`, `hyperdiff.pipeline`, ...) still import: `_MOVED` below maps each to
its new home (or homes, for a module that was split).
"""

import collections
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# public name → module; imported on first use, so `import hyperdiff` (and the CLI's argument checks) stay free of
# torch and diffusers until a model is needed
_PUBLIC = {
    "Adapter": "hyperdiff.core.adapter",
    "AdapterInfo": "hyperdiff.core.info",
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

# Old dotted path → its new home. A module that moved whole is the very module object under both names (one entry in
# sys.modules each), so attributes read or monkeypatched through either name are the same. A module that was split
# along its seams maps to the modules it became: the old path is a `_Split` view whose names, read or set, are theirs.
# No file is left at an old path.
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
    "hyperdiff.train.hypernet": ("hyperdiff.hypernet.training", "hyperdiff.hypernet.targets"),
    "hyperdiff.pipeline": "hyperdiff.personalize.pipeline",
    "hyperdiff.finetune": ("hyperdiff.personalize.finetune", "hyperdiff.personalize.losses"),
    "hyperdiff.data.synthfaces": ("hyperdiff.synthfaces.world", "hyperdiff.synthfaces.captions",
                                  "hyperdiff.synthfaces.faces", "hyperdiff.synthfaces.pen"),
    "hyperdiff.metrics": ("hyperdiff.synthfaces.encoder", "hyperdiff.synthfaces.detectors",
                          "hyperdiff.synthfaces.encoder_training", "hyperdiff.synthfaces.images"),
    "hyperdiff.train.base_model": ("hyperdiff.synthfaces.base_model.config", "hyperdiff.synthfaces.base_model.data",
                                   "hyperdiff.synthfaces.base_model.vae", "hyperdiff.synthfaces.base_model.unet",
                                   "hyperdiff.synthfaces.base_model.train"),
    "hyperdiff.evaluation": "hyperdiff.synthfaces.evaluation",
    "hyperdiff.fidelity": ("hyperdiff.synthfaces.fidelity", "hyperdiff.synthfaces.calibrate"),
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


class _Split(types.ModuleType):
    """An old module that was split: reading a name gives the first of its parts' that has it (`__dict__` and `vars()`
    too); setting or deleting one does it in every part that holds that same object (a name one part defines and the
    others import from it), so code in any part sees a monkeypatch made through the old path. `__all__` is the parts'
    together."""

    def __init__(self, name: str, parts: tuple[types.ModuleType, ...]):
        super().__init__(name, f"Old path of what is now {', '.join(p.__name__ for p in parts)}.")
        super().__setattr__("_parts", parts)
        names = set()  # each part's `__all__`, or its public names where it has none (what `import *` took)
        for part in parts:
            names |= set(getattr(part, "__all__", [n for n in vars(part) if not n.startswith("_")]))
        super().__setattr__("__all__", sorted(names))

    def __getattr__(self, name: str):
        for part in self._parts:
            if name in vars(part):
                return vars(part)[name]
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def _holders(self, name: str) -> list[types.ModuleType]:
        holders = [p for p in self._parts if name in vars(p)]
        return [p for p in holders if vars(p)[name] is vars(holders[0])[name]]

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("__"):
            return super().__setattr__(name, value)
        for part in self._holders(name) or self._parts[:1]:
            setattr(part, name, value)

    def __delattr__(self, name: str) -> None:
        holders = self._holders(name)
        if not holders:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        for part in holders:
            delattr(part, name)

    @property
    def __dict__(self):  # what vars() and monkeypatch's undo read: the parts' names, live, behind the view's own
        return collections.ChainMap(types.ModuleType.__dict__["__dict__"].__get__(self), *map(vars, self._parts))

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) - {"_parts"})


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old dotted path of `_MOVED` as its new module (or `_Split` view). First on `sys.meta_path`, so no
    other finder (an editable install's, a stale copy on the path) answers for a name that moved."""

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
        new = _MOVED[module.__name__]
        if isinstance(new, str):
            sys.modules[module.__name__] = importlib.import_module(new)
            return
        view = _Split(module.__name__, tuple(importlib.import_module(name) for name in new))
        view.__spec__, view.__loader__, view.__package__ = module.__spec__, self, module.__package__
        sys.modules[module.__name__] = view


if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
