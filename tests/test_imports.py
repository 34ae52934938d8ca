"""The top-level package: light to import, and exporting exactly what its docstring lists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rotgraph
import rotgraph.structure

ROOT = Path(__file__).resolve().parents[1]


def test_import_rotgraph_loads_neither_onnxruntime_nor_torch() -> None:
    code = (
        "import sys, rotgraph, rotgraph.structure, rotgraph.constants; "
        "heavy = sorted(m for m in ('onnxruntime', 'torch') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_exported_name_resolves_and_is_documented() -> None:
    doc = rotgraph.__doc__ or ""
    for name in rotgraph.__all__:
        assert getattr(rotgraph, name) is not None
        assert f"`{name}`" in doc, f"{name} is exported but not listed in the package docstring"
        assert name in dir(rotgraph)
    assert rotgraph.rotate.__module__ == "rotgraph.pipeline"


def test_unknown_attributes_and_submodules_behave_as_usual() -> None:
    try:
        rotgraph.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError:
        pass
    else:
        raise AssertionError("rotgraph.no_such_name resolved")
    from rotgraph import io

    assert io.__name__ == "rotgraph.io"


def _imported_from(module: str) -> set[str]:
    """Names the repository's Python files import from `module`."""
    names = set()
    for folder in ("rotgraph", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == module:
                    names.update(alias.name for alias in node.names)
    return names


def test_structure_package_reexports_what_the_repository_imports_from_it() -> None:
    imported = _imported_from("rotgraph.structure")
    assert "discover" in imported
    missing = imported - set(rotgraph.structure.__all__)
    assert not missing, f"imported from rotgraph.structure but not in its __all__: {sorted(missing)}"
    for name in rotgraph.structure.__all__:
        assert hasattr(rotgraph.structure, name)
