"""broker/intercept/idmap.py: newuidmap and newgidmap run by the launcher for a program under
`exec --intercept` (whose no_new_privs disarms their setuid bit).

The relay is driven here as the supervisor drives it (serve() when its socket is
readable), by the test's process standing for the launcher, with a stand-in mapper on
PATH that reports what it was given; the real newuidmap, run for rootless podman, is in
tests/test_rootless.py.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from broker.intercept.idmap import Relay
from tests.harness.processes import REQUEST_TIMEOUT

MAPPER: Final = """\
#!/bin/sh
printf '%s|' "$@"
echo "uid $(id -u), $(grep NoNewPrivs /proc/self/status)"
exit 3
"""
"""A newuidmap that prints its arguments, its uid and whether it runs under
no_new_privs, and exits 3."""


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "newuidmap").write_text(MAPPER)
    (bin_dir / "newuidmap").chmod(0o755)
    served = Relay({"PATH": str(bin_dir), "XDG_RUNTIME_DIR": str(tmp_path)})
    try:
        yield served
    finally:
        served.close()


def run_shim(relay: Relay, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` with the relay's environment, serving it until it exits."""
    proc = subprocess.Popen(argv, env=relay.environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    (fd, serve), *_ = relay.services().items()
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{argv} did not end within {REQUEST_TIMEOUT} s")
        if select.select([fd], [], [], 0.05)[0]:
            serve()
    out, err = proc.communicate(timeout=REQUEST_TIMEOUT)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_the_mapper_runs_in_the_launcher_with_the_arguments_as_given(relay: Relay) -> None:
    env = relay.environment()
    first = env["PATH"].split(":")[0]
    assert Path(first).stat().st_mode & 0o777 == 0o700
    assert sorted(os.listdir(first)) == ["newuidmap", "socket"]  # no newgidmap on PATH
    # Asked from under no_new_privs, as a program under the filter is; run without it.
    nnp = ["/usr/bin/setpriv", "--no-new-privs"]
    argv = [*nnp, "newuidmap", "4242", "0", "1000", "1", "an argument"]
    done = run_shim(relay, argv)
    assert done.returncode == 3
    assert done.stderr == f"4242|0|1000|1|an argument|uid {os.getuid()}, NoNewPrivs:\t0\n"


def test_a_process_the_launcher_did_not_start_is_refused(relay: Relay, tmp_path: Path) -> None:
    # An orphan of a shell we started goes to init, not to us: outside our tree, as a
    # service of the same user under no_new_privs of its own would be.
    out = tmp_path / "out"
    done = run_shim(relay, ["/bin/sh", "-c", f"(newuidmap 1 0 1000 1 >{out} 2>&1 &)"])
    assert done.returncode == 0
    (fd, serve), *_ = relay.services().items()
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while "port-broker" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, "the orphan was never answered"
        if select.select([fd], [], [], 0.05)[0]:
            serve()
    assert "which the launcher did not start" in out.read_text()


@pytest.mark.needs_root
def test_a_request_from_another_pid_namespace_is_refused(relay: Relay) -> None:
    # Its PID argument would name another process in ours.
    done = run_shim(
        relay, ["/usr/bin/unshare", "--pid", "--fork", "newuidmap", "1", "0", "1000", "1"]
    )
    assert done.returncode == 1
    assert "asked from another pid namespace" in done.stderr


def test_nothing_is_made_without_a_mapper_on_path(tmp_path: Path) -> None:
    relay = Relay({"PATH": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)})
    assert relay.services() == {}
    assert relay.environment()["PATH"] == str(tmp_path)
    relay.close()
    assert list(tmp_path.iterdir()) == []


def test_close_removes_the_directory(relay: Relay) -> None:
    directory = Path(relay.environment()["PATH"].split(":")[0])
    relay.close()
    assert not directory.exists()
    relay.close()  # twice is harmless


def test_a_stand_in_without_its_launcher_says_so(relay: Relay) -> None:
    shim = Path(relay.environment()["PATH"].split(":")[0]) / "newuidmap"
    copy = shim.parent.parent / "orphan" / "newuidmap"
    copy.parent.mkdir()
    copy.write_text(shim.read_text())
    copy.chmod(0o700)
    done = subprocess.run([str(copy), "1"], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "cannot reach the launcher" in done.stderr
