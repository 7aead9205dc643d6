"""How the project's Python is laid out: rules a reviewer would otherwise have to keep.

- No test module imports another: what tests share lives in tests/harness.
- bench/ reaches the harness as a package (`tests.harness`), never through sys.path.
- The modules of broker/ import one another without a cycle, counting the imports made
  inside functions (the lazy ones that keep `exec` cheap): every layer depends only on
  layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness.runtime import ROOT


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports at any depth (absolute names; relative ones as-is)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("*.py")), ids=lambda path: path.name)
def test_no_test_module_imports_another(path: Path) -> None:
    test_modules = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    for module in imported_modules(path):
        last = module.rsplit(".", 1)[-1]
        assert last not in test_modules, f"{path.name} imports {module}: use tests/harness"
        assert module.split(".")[0] not in {"support", "box", "conftest"}, module


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_reaches_the_harness_as_a_package(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), (
                f"{path.name}:{node.lineno} touches sys.path"
            )


def broker_imports() -> dict[str, set[str]]:
    """broker module → the broker modules it imports, at any depth of its code."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "broker").glob("*.py")):
        module = "broker" if path.stem == "__init__" else f"broker.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "broker":
                found.update(f"broker.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("broker."):
                found.add(node.module or "")
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("broker."))
        graph[module] = found - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `graph` as a path that returns to its start, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done or node not in graph:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_broker_modules_import_one_another_without_a_cycle() -> None:
    graph = broker_imports()
    assert "broker.loader" in graph["broker.cli"]  # lazy imports are seen
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
