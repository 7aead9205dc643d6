"""How the project's Python is laid out: rules a reviewer would otherwise have to keep.

- No test module imports another: what tests share lives in tests/harness.
- bench/ reaches the harness as a package (`tests.harness`), never through sys.path.
- The modules of broker/ import one another without a cycle, counting the imports made
  inside functions (the lazy ones that keep `exec` cheap): every layer depends only on
  layers below it.
- No module of broker/ passes MAX_MODULE_LINES, and the server's driver class stays
  within MAX_DRIVER_LINES: past that a module holds more than one job.
- broker/ uses dependencies through their public API only: no `_private` attribute of a
  third-party module, and no override of a third-party class's `_private` method (their
  bodies change between releases).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import Final

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


def broker_modules() -> dict[str, Path]:
    """Every module of broker/, subpackages included: dotted name → file."""
    found = {}
    for path in sorted((ROOT / "broker").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def broker_imports() -> dict[str, set[str]]:
    """broker module → the broker modules it imports, at any depth of its code (`from
    broker.pkg import name` counts as importing broker.pkg.name where that is a module)."""
    modules = broker_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "broker":
                base = node.module or ""
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    found.add(child if child in modules else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "broker")
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
    assert "broker.daemon.loader" in graph["broker.cli"]  # lazy imports are seen
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


MAX_MODULE_LINES: Final = 500
MAX_DRIVER_LINES: Final = 150


@pytest.mark.parametrize(
    "path", sorted((ROOT / "broker").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_broker_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it by job"


def test_the_server_is_a_thin_driver() -> None:
    path = ROOT / "broker" / "daemon" / "driver.py"
    (broker,) = [
        node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "Broker"
    ]
    lines = (broker.end_lineno or 0) - broker.lineno + 1
    assert lines <= MAX_DRIVER_LINES, f"driver.Broker has {lines} lines: move a job out"


def third_party(module: str) -> bool:
    top = module.split(".", maxsplit=1)[0]
    return top != "broker" and top not in sys.stdlib_module_names


def private_uses(path: Path) -> list[str]:
    """`_private` names of third-party modules and classes that `path` touches."""
    tree = ast.parse(path.read_text(), str(path))
    modules: dict[str, str] = {}  # local name → third-party module
    classes: dict[str, object] = {}  # local name → third-party class
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if third_party(alias.name):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and third_party(node.module):
            for alias in node.names:
                value = getattr(importlib.import_module(node.module), alias.name, None)
                if isinstance(value, type):
                    classes[alias.asname or alias.name] = value
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and (node.value.id in modules or node.value.id in classes)
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
        if isinstance(node, ast.ClassDef):
            bases = [
                classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes
            ]
            for item in node.body:
                if (
                    isinstance(item, ast.FunctionDef)
                    and item.name.startswith("_")
                    and not (item.name.startswith("__"))
                ):
                    found += [
                        f"{path.name}:{item.lineno}: overrides {base.__name__}.{item.name}"  # type: ignore[attr-defined]
                        for base in bases
                        if hasattr(base, item.name)
                    ]
    return found


@pytest.mark.parametrize(
    "path", sorted((ROOT / "broker").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_dependencies_are_used_through_their_public_api(path: Path) -> None:
    assert private_uses(path) == []


def test_the_private_api_check_finds_an_override(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import trio\n"
        "from pydantic_settings import EnvSettingsSource\n"
        "class Mine(EnvSettingsSource):\n"
        "    def _load_env_vars(self): ...\n"
        "trio._core\n"
    )
    assert private_uses(sample) == [
        "sample.py:4: overrides EnvSettingsSource._load_env_vars",
        "sample.py:5: trio._core",
    ]
