"""How the project's Python is laid out: rules a reviewer would otherwise have to keep.

- No test module imports another: what tests share lives in tests/harness.
- bench/ reaches the harness as a package (`tests.harness`), never through sys.path.
- The modules of broker/ import one another without a cycle, counting the imports made
  inside functions (the lazy ones that keep `exec` cheap): every layer depends only on
  layers below it.
- No module of broker/ passes MAX_MODULE_LINES, and the driver class stays within
  MAX_DRIVER_LINES: an alarm, not a rule of placement (past it a module holds more
  than one job).
- The packages keep their direction: broker.daemon (the broker) and broker.intercept
  (the supervisor) import the shared top-level modules and never each other, and no
  shared module imports either; only the entry points (cli, manual) import them.
- The worker path's imports, on real runs: `exec` (without --intercept), `list` and
  `status` import neither trio, pydantic, the daemon nor the supervisor, and a plain
  `exec` none of the standard modules that cost a start-up its milliseconds.
- docs/architecture.md's module map names every module of broker/ and no other, and
  every module opens with what it must never do.
- broker/ uses dependencies through their public API only: no `_private` attribute of a
  third-party module, and no override of a third-party class's `_private` method (their
  bodies change between releases).
"""

from __future__ import annotations

import ast
import importlib
import re
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


# --- the direction between packages ------------------------------------------------

ENTRY_POINTS: Final = frozenset({"broker.cli", "broker.__main__", "broker.manual"})
"""What runs the programs: the only top-level modules that may import the daemon or the
supervisor (lazily, for the subcommand that needs them)."""


def package_of(module: str) -> str:
    """broker.daemon, broker.intercept, or broker (the shared modules)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[1:2] in (["daemon"], ["intercept"]) else "broker"


def direction_problems(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imports in sorted(graph.items()):
        own = package_of(module)
        for target in sorted(imports):
            theirs = package_of(target)
            if theirs in (own, "broker"):
                if own != "broker" and target in ENTRY_POINTS:
                    found.append(f"{module} imports the entry point {target}")
                continue
            if own == "broker" and module in ENTRY_POINTS:
                continue
            found.append(f"{module} ({own}) imports {target} ({theirs})")
    return found


def test_the_packages_keep_their_direction() -> None:
    assert direction_problems(broker_imports()) == []


def test_the_direction_check_finds_a_crossing() -> None:
    graph = {
        "broker.daemon.driver": {"broker.intercept.bindings", "broker.names"},
        "broker.protocol": {"broker.daemon.connection"},
        "broker.intercept.notes": {"broker.cli"},
        "broker.cli": {"broker.daemon.start", "broker.intercept.supervisor"},
    }
    assert direction_problems(graph) == [
        "broker.daemon.driver (broker.daemon) imports broker.intercept.bindings (broker.intercept)",
        "broker.intercept.notes imports the entry point broker.cli",
        "broker.protocol (broker) imports broker.daemon.connection (broker.daemon)",
    ]


# --- the documented module map, and each module's contract ---------------------------


def documented_modules() -> set[str]:
    """The modules docs/architecture.md's map names, as dotted names."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    found, package = set(), "broker"
    for row in re.findall(r"^\|\s*(.*?)\s*\|\s*`(\w+)\.py`\s*\|", table, re.M):
        named = re.match(r"`([\w.]+)`", row[0])
        if named:
            package = named.group(1)
        leaf = row[1]
        found.add(package if leaf == "__init__" else f"{package}.{leaf}")
    return found


def test_the_module_map_names_every_module_and_no_other() -> None:
    documented, actual = documented_modules(), set(broker_modules())
    assert sorted(actual - documented) == [], "modules missing from docs/architecture.md"
    assert sorted(documented - actual) == [], "docs/architecture.md names modules not there"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "broker").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_module_says_what_it_must_never_do(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Must never" in docstring, f"{path.relative_to(ROOT)}: no 'Must never' in its docstring"


# --- the worker path's imports, on real runs -------------------------------------------

NEVER_ON_THE_WORKER_PATH: Final = ("trio", "pydantic", "pydantic_settings", "systemd",
                                   "broker.daemon", "broker.intercept")  # fmt: skip
NEVER_ON_A_PLAIN_EXEC: Final = (
    "argparse", "enum", "typing", "re", "json", "socket", "dataclasses", "collections",
    "functools", "contextlib",
)  # fmt: skip
"""Standard modules that each cost a start-up milliseconds (see broker/names.py), none of
them loaded by a bare interpreter."""

RUN_AND_SHOW_IMPORTS: Final = """
import sys
sys.path.insert(0, sys.argv[1])
from broker.cli import main
sys.exit(main(sys.argv[2:]))
"""


async def imports_of(args: list[str]) -> tuple[set[str], set[str]]:
    """Every module a real run of `port-broker ARGS` imports (python -X importtime) on
    the interpreter workers run (SYSTEM_PYTHON, as the installed launcher does: not
    this virtualenv's, whose .pth files import more at start), and every module that
    interpreter's own start-up imports."""
    import trio  # noqa: PLC0415 (only these tests run trio here)

    from tests.harness.runtime import SYSTEM_PYTHON  # noqa: PLC0415

    bare = await trio.run_process([SYSTEM_PYTHON, "-I", "-X", "importtime", "-c", "pass"],
                                  capture_stderr=True)  # fmt: skip
    run = await trio.run_process(
        [SYSTEM_PYTHON, "-I", "-X", "importtime", "-c", RUN_AND_SHOW_IMPORTS, str(ROOT), *args],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()

    def modules(stderr: bytes) -> set[str]:
        return {line.rsplit("|", 1)[1].strip() for line in stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line} - {"package"}  # fmt: skip

    return modules(run.stderr), modules(bare.stderr)


@pytest.mark.parametrize("command", ["exec", "list", "status"])
async def test_the_worker_path_imports_only_what_it_uses(rundir: Path, command: str) -> None:
    from tests.harness.inprocess import running_broker  # noqa: PLC0415

    async with running_broker(rundir) as served:
        args = {"exec": ["exec", "--socket", served.path, "http", "--", "true"],
                "list": ["list", "--socket", served.path],
                "status": ["status", "--socket", served.path, "--json"]}[command]  # fmt: skip
        everything, at_start = await imports_of(args)
    imported = everything - at_start
    assert "broker.cli" in imported  # the run was seen
    heavy = sorted(m for m in imported if m.split(".")[0] in NEVER_ON_THE_WORKER_PATH
                   or m.startswith(NEVER_ON_THE_WORKER_PATH))  # fmt: skip
    assert heavy == []
    # Not subtracted from what start-up imports: a bare start loads none of them either.
    assert sorted(at_start & set(NEVER_ON_A_PLAIN_EXEC)) == []
    if command == "exec":
        assert sorted(everything & set(NEVER_ON_A_PLAIN_EXEC)) == []
