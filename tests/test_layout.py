"""The package layout: old dotted paths still import as their new modules, and the code imports only new ones."""

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


def _imported(path: Path) -> set[str]:
    """Every module a file names in an import statement (at any depth), `from P import x` as P and P.x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("old", sorted(hyperdiff._MOVED))
def test_an_old_path_imports_as_its_new_module(old):
    new = hyperdiff._MOVED[old]
    module = importlib.import_module(old)
    assert module is importlib.import_module(new) and sys.modules[old] is module
    assert module.__name__ == new and module.__spec__.name == new  # the new module's own identity, untouched
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is module  # `from hyperdiff import pipeline` too


def test_monkeypatching_an_old_path_patches_the_new_module(monkeypatch):
    import hyperdiff.core.files
    import hyperdiff.files

    monkeypatch.setattr(hyperdiff.files, "FLOAT_DTYPES", ())
    assert hyperdiff.core.files.FLOAT_DTYPES == ()


def test_old_paths_import_in_a_fresh_process_without_torch_first():
    """`import hyperdiff.<old>` as the first import of a process, and `import hyperdiff` still imports no torch."""
    code = ("import sys, hyperdiff; assert 'torch' not in sys.modules\n"
            "import hyperdiff.pipeline, hyperdiff.data.synthfaces as sf\n"
            "from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline\n"
            "assert hyperdiff.pipeline.HyperDreamBoothPipeline is HyperDreamBoothPipeline and sf.render\n"
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
