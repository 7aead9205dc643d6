"""How the project's Python is laid out: rules a reviewer would otherwise have to keep.

- No test module imports another: what tests share lives in tests/harness.
- bench/ reaches the harness as a package (`tests.harness`), never through sys.path.
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
