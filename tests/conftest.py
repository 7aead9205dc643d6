"""Session set-up: a private network namespace, a world-readable runtime, clean-up, and
the time limit of trio tests.

Tests that need root (other uids, port 80, systemd-socket-activate) are marked
`needs_root` and skipped with that reason otherwise; CI runs as root, so there they run.
Every test has a time limit (pytest-timeout: `timeout` in pyproject.toml, or
@pytest.mark.timeout); a trio test past it is cancelled from inside its run (below).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing

from tests.harness.inprocess import public_dir
from tests.harness.processes import EXIT_TIMEOUT, Processes, enter_private_network
from tests.harness.runtime import build_runtime, make_public_dir

IS_ROOT = os.geteuid() == 0

UNWIND_TIME: Final = EXIT_TIMEOUT + 10.0
"""Seconds a trio test cancelled at its time limit gets to unwind (its fixtures stop the
processes it started: EXIT_TIMEOUT each, then SIGKILL) before it is failed from a signal
handler instead, as a synchronous test is at once."""

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


# --- the time limit of a trio test -------------------------------------------------------
# pytest-timeout fails a test that runs past its limit (`timeout` in pyproject.toml, or
# @pytest.mark.timeout) by raising from a SIGALRM handler. In a trio test that exception
# lands in trio's own loop, which it breaks for every later trio test of the session. So a
# trio test is cancelled instead, from inside its run: a system task raises, trio cancels
# every task (fixtures' clean-up runs) and trio.run raises TrioInternalError from it. A
# test that never yields to trio (a blocking call) gets the signal after UNWIND_TIME.

_TRIO_TOKEN = pytest.StashKey[trio.lowlevel.TrioToken]()


class TimeLimit(Exception):
    """A test ran past its time limit."""


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Before pytest-trio wraps a trio test in its runner: note the run it runs in."""
    test = getattr(item, "obj", None)
    if item.get_closest_marker("trio") is not None and not hasattr(test, "hypothesis"):
        assert isinstance(item, pytest.Function)
        original: Callable[..., Awaitable[Any]] = item.obj

        @functools.wraps(original)
        async def noting_its_run(**kwargs: Any) -> Any:
            item.stash[_TRIO_TOKEN] = trio.lowlevel.current_trio_token()
            return await original(**kwargs)

        item.obj = noting_its_run
    yield


async def _time_is_up(limit: float) -> None:
    raise TimeLimit(f"Timeout: the test ran past its limit of {limit:g} s and was cancelled")


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """For a trio test: cancel it from inside its run at its limit, and raise from a
    signal handler UNWIND_TIME later if it is still running. Other tests: pytest-timeout's
    own timer (None)."""
    if item.get_closest_marker("trio") is None:
        return None
    limit: float = settings.timeout

    def cancel_the_run() -> None:
        token = item.stash.get(_TRIO_TOKEN, None)
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.spawn_system_task, _time_is_up, limit)

    def still_running(signum: int, frame: object) -> None:
        pytest.fail(f"Timeout: the test ran past its limit of {limit:g} s and did not stop")

    timer = threading.Timer(limit, cancel_the_run)
    timer.daemon = True

    def cancel() -> None:
        timer.cancel()
        timer.join()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's protocol
    signal.signal(signal.SIGALRM, still_running)
    signal.setitimer(signal.ITIMER_REAL, limit + UNWIND_TIME)
    timer.start()
    return True
