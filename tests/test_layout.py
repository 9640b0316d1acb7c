"""The package layout: old dotted paths still import as their new modules, the code imports only new ones, and the
modules' imports form layers without circles."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import hyperdiff

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("hyperdiff", "ui", "scripts", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
ALIASES = sorted(old for old, new in hyperdiff._MOVED.items() if isinstance(new, str))
SPLITS = sorted(old for old, new in hyperdiff._MOVED.items() if not isinstance(new, str))
# what a layer may import besides itself: the foundations every layer uses, and nothing above it
FOUNDATIONS = {"hyperdiff", "hyperdiff.errors", "hyperdiff.config", "hyperdiff.inputs"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for folder in ("hyperdiff", "ui") for p in sorted((ROOT / folder).rglob("*.py"))}


def _imported(path: Path) -> set[str]:
    """Every module a file names in an import statement (at any depth: function-level imports count), `from P
    import x` as P.x where that is a module and as P otherwise."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                names.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module)
    return names


def _graph() -> dict[str, set[str]]:
    """Module → the modules of hyperdiff and ui that importing it imports: those it names, and the packages above
    them (their `__init__` runs first) unless that package is above the importer too (already running)."""
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target in _imported(path) & set(MODULES):
            edges.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if not (name == package or name.startswith(package + ".")):
                    edges.add(package)
        graph[name] = edges - {name}
    return graph


@pytest.mark.parametrize("old", ALIASES)
def test_an_old_path_imports_as_its_new_module(old):
    new = hyperdiff._MOVED[old]
    module = importlib.import_module(old)
    assert module is importlib.import_module(new) and sys.modules[old] is module
    assert module.__name__ == new and module.__spec__.name == new  # the new module's own identity, untouched
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is module  # `from hyperdiff import pipeline` too


@pytest.mark.parametrize("old", SPLITS)
def test_a_split_module_keeps_every_name_at_its_old_path(old):
    view = importlib.import_module(old)
    parts = [importlib.import_module(name) for name in hyperdiff._MOVED[old]]
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is view and sys.modules[old] is view
    for part in parts:
        for node in ast.parse(Path(part.__file__).read_text()).body:  # every top-level name each part defines
            defined = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                n.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if t is not None
                for n in ast.walk(t) if isinstance(n, ast.Name)]
            for name in (n for n in defined if not n.startswith("__")):
                assert getattr(view, name) is getattr(part, name), (old, part.__name__, name)
        assert set(getattr(part, "__all__", ())) <= set(view.__all__)
    with pytest.raises(AttributeError):
        view.no_such_name


def test_monkeypatching_an_old_path_patches_the_new_modules(monkeypatch):
    import hyperdiff.core.files
    import hyperdiff.files
    import hyperdiff.finetune
    import hyperdiff.personalize.finetune
    import hyperdiff.personalize.losses

    monkeypatch.setattr(hyperdiff.files, "FLOAT_DTYPES", ())
    assert hyperdiff.core.files.FLOAT_DTYPES == ()
    # a split module: the name is set where it is defined and where the other parts imported it from there
    original = hyperdiff.personalize.losses.per_sample_mse
    with monkeypatch.context() as m:
        m.setattr(hyperdiff.finetune, "per_sample_mse", len)
        assert hyperdiff.personalize.losses.per_sample_mse is len and hyperdiff.personalize.finetune.per_sample_mse is len
    assert hyperdiff.personalize.finetune.per_sample_mse is original is hyperdiff.personalize.losses.per_sample_mse


def test_old_paths_import_in_a_fresh_process_without_torch_first():
    """`import hyperdiff.<old>` as the first import of a process, and `import hyperdiff` still imports no torch."""
    code = ("import sys, hyperdiff; assert 'torch' not in sys.modules\n"
            "import hyperdiff.pipeline, hyperdiff.data.synthfaces as sf\n"
            "from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline\n"
            "from hyperdiff.data.synthfaces import Identity, Scene, render, caption, PALETTE, TRAIN_SEEDS, VAL_SEEDS\n"
            "from hyperdiff.metrics import IdentityEncoder, scene_fidelity\n"
            "assert hyperdiff.pipeline.HyperDreamBoothPipeline is HyperDreamBoothPipeline and sf.render is render\n"
            "print(hyperdiff.pipeline.__file__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == ROOT / "hyperdiff" / "personalize" / "pipeline.py"


def test_the_code_imports_new_paths_only():
    """hyperdiff, ui, scripts and the tests name every module by its new path (the old ones are for users' code)."""
    old = set(hyperdiff._MOVED)
    found = {f"{p.relative_to(ROOT)}: {name}" for p in SOURCES if p.name != "test_layout.py"
             for name in _imported(p) & old}
    assert not found, sorted(found)


def test_the_modules_import_each_other_without_circles():
    graph, state, path = _graph(), {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_layers_import_only_what_is_below_them():
    """The core and the base loaders import only themselves and the foundations; nothing imports the interfaces
    (`hyperdiff.cli`, `ui`) but the interfaces themselves (the `hyperdiff ui` command starts the web UI)."""
    graph = _graph()
    for layer in ("hyperdiff.core", "hyperdiff.models"):
        for name in (n for n in graph if n == layer or n.startswith(layer + ".")):
            above = {t for t in graph[name] if not t.startswith(layer) and t not in FOUNDATIONS}
            assert not above, (name, sorted(above))
    for name, targets in graph.items():
        if name != "hyperdiff.cli" and not name.startswith("ui"):
            assert not {t for t in targets if t == "hyperdiff.cli" or t == "ui" or t.startswith("ui.")}, name
        if name.startswith("ui"):
            assert "hyperdiff.cli" not in targets, name


def test_the_shipped_models_are_found_in_hyperdiff_assets():
    from hyperdiff.inputs import ASSETS_DIR
    from hyperdiff.models.base import EMBEDDED_BASE
    from hyperdiff.personalize.pipeline import EMBEDDED_HYPERNET
    from hyperdiff.synthfaces.encoder import DEFAULT_ENCODER_DIR, JUDGE_ENCODER_DIR

    assert ASSETS_DIR == ROOT / "hyperdiff" / "assets"
    for folder, name in ((EMBEDDED_BASE, "base"), (EMBEDDED_HYPERNET, "hypernet"),
                         (DEFAULT_ENCODER_DIR, "identity_encoder"), (JUDGE_ENCODER_DIR, "judge_encoder")):
        assert folder == ASSETS_DIR / "synthfaces" / name
        assert any((folder / f).is_file() for f in ("config.json", "model_index.json")), folder
