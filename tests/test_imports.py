"""The top-level package: light to import, and exporting exactly what its docstring lists."""

from __future__ import annotations

import ast
import re
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


def test_commands_the_docstring_names_exist() -> None:
    from rotgraph.cli import parser

    commands = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    named = set(re.findall(r"`rotgraph (\w+)", rotgraph.__doc__ or ""))
    assert named and named <= set(commands), f"the package docstring names no such command: {named - set(commands)}"


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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: not those in functions or under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            found += _module_level_imports(node.body)
    return found


def _import_graph() -> dict[str, set[str]]:
    """rotgraph module -> the rotgraph modules it imports at module level (`from package import module`
    counts as an import of the module, `from module import name` as one of the module)."""
    files = {_module_name(p): p for p in (ROOT / "rotgraph").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            assert source is not None
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                edges.add(submodule if submodule in files else source)
        graph[name] = {m for m in edges if m in files and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_import_graph_finds_a_cycle() -> None:
    """The checker itself: a cycle through `from package import module` and one only under TYPE_CHECKING."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\nimport z\n"
    )
    assert [ast.unparse(n) for n in _module_level_imports(tree.body)] == [
        "from typing import TYPE_CHECKING",
        "import z",
    ]


def test_no_module_level_import_cycles() -> None:
    graph = _import_graph()
    assert "rotgraph.structure.model" in graph["rotgraph.structure.summary"]
    cycles = [sorted(c) for c in _cycles(graph)]
    assert not cycles, (
        f"modules importing each other at module level (import one inside a function, or move what they share): {cycles}"
    )
