"""Session set-up: a private network namespace, a world-readable runtime, clean-up.

Tests that need root (other uids, port 80, systemd-socket-activate) are marked
`needs_root` and skipped with that reason otherwise; CI runs as root, so there they run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.harness.inprocess import public_dir
from tests.harness.processes import Processes, enter_private_network
from tests.harness.runtime import build_runtime, make_public_dir

IS_ROOT = os.geteuid() == 0

AUTOJUMP_IDLE = 0.05
"""Real seconds of idleness before the mock clock jumps: a user-database lookup in a
thread takes well under a millisecond."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_root: runs processes as other users and binds ports below 1024"
    )
    if IS_ROOT:
        # Ports 80/443 and every request in the suite stay inside this namespace.
        enter_private_network()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: runs processes as other uids and binds :80")
    for item in items:
        if "needs_root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def public_root() -> Iterator[Path]:
    """A world-readable scratch directory for the session (not under /tmp/pytest-of-*,
    which other users cannot enter)."""
    path = Path(tempfile.mkdtemp(prefix="port-broker-test.", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="session")
def launcher(public_root: Path) -> Path:
    """bin/port-broker of a world-readable runtime built from the working tree."""
    return build_runtime(make_public_dir(public_root, "runtime"))


@pytest.fixture
def workdir(public_root: Path, request: pytest.FixtureRequest) -> Path:
    """A world-readable directory for one test (short: Unix socket paths end at 107
    bytes)."""
    return make_public_dir(public_root, request.node.name[5:45].replace("/", "_"))


@pytest.fixture
def rundir(public_root: Path) -> Path:
    """A fresh world-readable directory with a short path, for one test."""
    return public_dir(public_root)


@pytest.fixture(autouse=True)
def no_systemd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker must not talk to a systemd that happens to run these tests."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, but jumping only after AUTOJUMP_IDLE seconds of real
    idleness: the broker asks the user database in a thread, and the clock must wait for
    that thread instead of jumping past the client's deadline."""
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_IDLE)


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Processes started by the test; stopped by pid afterwards."""
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.stop_all()
