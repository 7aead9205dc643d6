"""The locks in .ci/requirements/ against pyproject.toml, and the runtime built from them.

.ci/lock writes the locks; .ci/setup installs dev.txt into .venv and runtime.txt into
.venv/runtime, which every test that runs the broker as another user copies
(support.build_runtime). These tests fail when pyproject.toml gained a dependency the
locks lack (run .ci/lock), when two locks disagree on a version, or when a package was
installed other than from a wheel of the locked version (a legacy `setup.py install`
leaves no WHEEL file and an incomplete file list).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from typing import Final

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness.runtime import ROOT, RUNTIME_DEPENDENCIES

LOCKS: Final = ROOT / ".ci" / "requirements"
LAYERS: Final = ("build", "runtime", "dev", "bench", "servers")
"""Each lock is resolved with the one before it as constraints (.ci/lock); dev holds
runtime, bench holds dev. servers stands alone (what the recipes' workers run)."""


def entries(lock: str) -> Iterator[tuple[Requirement, int]]:
    """Every pin in `lock` (whatever its markers) with how many hashes it lists."""
    pin: Requirement | None = None
    hashes = 0
    for line in (LOCKS / f"{lock}.txt").read_text().splitlines():
        if line.startswith("    --hash=sha256:"):
            hashes += 1
        elif line and not line[0].isspace() and not line.startswith("#"):
            if pin is not None:
                yield pin, hashes
            pin, hashes = Requirement(line.removesuffix("\\").strip()), 0
    if pin is not None:
        yield pin, hashes


def pins(lock: str) -> dict[str, str]:
    """name → version of every pin in `lock` that applies to this interpreter."""
    found: dict[str, str] = {}
    for requirement, _ in entries(lock):
        if requirement.marker is None or requirement.marker.evaluate():
            [spec] = requirement.specifier
            found[canonicalize_name(requirement.name)] = spec.version
    return found


def project() -> dict[str, list[str]]:
    """pyproject.toml's requirements: `runtime`, each extra, and `build`."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        data = tomllib.load(f)
    return {
        "runtime": data["project"]["dependencies"],
        "build": data["build-system"]["requires"],
        **data["project"]["optional-dependencies"],
    }


@pytest.mark.parametrize("lock", LAYERS)
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    found = list(entries(lock))
    assert found
    for requirement, hashes in found:
        assert [spec.operator for spec in requirement.specifier] == ["=="], requirement
        assert hashes >= 1, f"{requirement} in {lock}.txt has no hash"


@pytest.mark.parametrize(
    ("lock", "wanted"),
    [
        ("build", ["build"]),
        ("runtime", ["runtime"]),
        ("dev", ["runtime", "test", "lint", "lock", "package", "dev"]),
        ("bench", ["runtime", "test", "lint", "lock", "package", "dev", "bench"]),
        ("servers", ["servers"]),
    ],
)
def test_each_lock_holds_what_pyproject_asks_for(lock: str, wanted: list[str]) -> None:
    requirements = project()
    locked = pins(lock)
    for group in wanted:
        for text in requirements[group]:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if name == "port-broker":  # an extra of its own (dev = test + lint + lock + package)
                continue
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            assert name in locked, f"{text} ({group}) is not in {lock}.txt: run .ci/lock"
            assert requirement.specifier.contains(locked[name], prereleases=True), (
                f"{lock}.txt pins {name}=={locked[name]}, outside {text}: run .ci/lock"
            )


@pytest.mark.parametrize(("lower", "upper"), [("runtime", "dev"), ("dev", "bench")])
def test_a_lock_keeps_the_versions_of_the_one_below(lower: str, upper: str) -> None:
    below, above = pins(lower), pins(upper)
    assert {name: above.get(name) for name in below} == below


@pytest.mark.parametrize("lock", LAYERS[1:4])
def test_the_build_tools_are_the_same_in_every_lock(lock: str) -> None:
    build, other = pins("build"), pins(lock)
    assert {name: other[name] for name in build if name in other} == {
        name: version for name, version in build.items() if name in other
    }


def test_the_runtime_is_the_runtime_lock_installed_from_wheels() -> None:
    if not RUNTIME_DEPENDENCIES.is_dir():
        pytest.fail(f"{RUNTIME_DEPENDENCIES} is missing: run .ci/setup")
    installed: dict[str, str] = {}
    for info in RUNTIME_DEPENDENCIES.glob("*.dist-info"):
        name, version = info.name.removesuffix(".dist-info").rsplit("-", 1)
        installed[canonicalize_name(name)] = version
        wheel = info / "WHEEL"
        assert wheel.is_file(), f"{info.name} was not installed from a wheel"
        for line in (info / "RECORD").read_text().splitlines():
            path = line.rsplit(",", 2)[0]
            if not path.startswith("../"):  # scripts: not part of the runtime
                assert (RUNTIME_DEPENDENCIES / path).exists(), f"{info.name}: {path} missing"
    assert not list(RUNTIME_DEPENDENCIES.glob("*.egg-info")), "a legacy (setup.py) install"
    assert installed == pins("runtime")
