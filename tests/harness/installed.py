"""A test box (tests/harness/box.py) with port-broker installed as README's "Install on a
systemd host" says, and the small helpers the real-systemd tests share.

Installed: the package at /opt/port-broker linked as /usr/local/bin/port-broker, every
unit of `units/` unchanged in /etc/systemd/system (and a copy in
/usr/share/port-broker/units), users alice and bob, /srv/hello.js.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.harness.box import Box, box_unavailable_reason
from tests.harness.processes import REQUEST_TIMEOUT
from tests.harness.runtime import ROOT


@contextlib.contextmanager
def installed_box(launcher: Path, files: Mapping[str, str] = {}) -> Iterator[Box]:
    """Boot a box with the project installed (skip the test if boxes cannot run here).

    Args:
        launcher: bin/port-broker of the world-readable runtime (the `launcher` fixture).
        files: More files to write before boot: path in the box → text.
    """
    reason = box_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    machine = Box()
    machine.copy_in(launcher.parent.parent, "/opt/port-broker")
    machine.copy_in(ROOT / "units", "/usr/share/port-broker/units")
    for unit in sorted((ROOT / "units").iterdir()):
        machine.write_file(f"/etc/systemd/system/{unit.name}", unit.read_text())
    machine.write_file("/srv/hello.js", (ROOT / "docs" / "examples" / "hello.js").read_text())
    for path, text in files.items():
        machine.write_file(path, text)
    machine.start()
    try:
        machine.run(
            ["ln", "-sfn", "/opt/port-broker/bin/port-broker", "/usr/local/bin/port-broker"]
        )
        for user in ("alice", "bob"):
            machine.run(["useradd", "--create-home", "--shell", "/bin/bash", user])
        yield machine
    finally:
        machine.stop()


def configure(box: Box, policy: str) -> None:
    """Write the broker's policy (takes effect when the broker next starts)."""
    box.write_file("/etc/port-broker/broker.toml", textwrap.dedent(policy))


def start_sockets(box: Box, *names: str) -> None:
    """Start the control socket and port-broker-NAME.socket for each name (default http)."""
    units = [f"port-broker-{name}.socket" for name in names or ("http",)]
    box.run(["systemctl", "start", "port-broker.socket", *units])


def uid(box: Box, user: str) -> int:
    return int(box.run(["id", "-u", user]).stdout)


def curl(box: Box, url: str = "http://127.0.0.1/") -> str:
    """GET `url` inside the box, retrying while nothing accepts yet."""
    return box.run(
        ["curl", "-sS", "--globoff", "--max-time", str(REQUEST_TIMEOUT), "--retry", "50",
         "--retry-connrefused", "--retry-delay", "0", url]
    ).stdout  # fmt: skip


def show(box: Box, unit: str, prop: str) -> str:
    return box.run(["systemctl", "show", "--value", "-p", prop, unit]).stdout.strip()
