"""broker/node/listen-fds.js: node's own test runner for the unit tests, and a real Node
server that takes its sockets with it, started by `port-broker exec` as nobody."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import pytest

from tests.harness.processes import (
    NOBODY,
    START_TIMEOUT,
    Processes,
    as_user,
    http_get,
    start_broker,
)
from tests.harness.runtime import ROOT

SERVER: Final = """
const http = require('node:http');
const { listenTarget } = require('./listen-fds.js');
for (const [name, fallback] of [['http', 8080], ['https', 8443]]) {
  const target = listenTarget(name, fallback);
  http.createServer((q, r) => r.end(`${name} via ${JSON.stringify(target)}\\n`))
    .listen(target, () => console.log(`${name} ready`));
}
"""


def test_unit_tests_under_nodes_test_runner() -> None:
    done = subprocess.run(
        ["node", "--test", str(ROOT / "tests" / "node")],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout
    assert "# pass 7" in done.stdout


@pytest.fixture
def server(workdir: Path, launcher: Path) -> Path:
    helper = launcher.parent.parent / "site" / "broker" / "node" / "listen-fds.js"
    (workdir / "listen-fds.js").write_text(helper.read_text())
    (workdir / "server.js").write_text(SERVER)
    for name in ("listen-fds.js", "server.js"):
        (workdir / name).chmod(0o644)
    return workdir / "server.js"


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    lines = {proc.stdout.readline().strip(), proc.stdout.readline().strip()}
    assert lines == {"http ready", "https ready"}, lines


@pytest.mark.needs_root
def test_a_real_server_takes_both_sockets_by_name(
    processes: Processes, launcher: Path, workdir: Path, server: Path
) -> None:
    broker = start_broker(
        processes,
        launcher,
        workdir,
        '[sockets.http]\nusers = ["nobody"]\n[sockets.https]\nusers = ["nobody"]\n',
        sockets=(("http", "80"), ("https", "443")),
    )
    proc = processes.start(
        [*as_user(NOBODY), str(launcher), "exec", "--socket", str(broker.control),
         "http,https", "--", "node", str(server)]
    )  # fmt: skip
    wait_ready(proc)
    assert http_get("127.0.0.1", 80) == 'http via {"fd":3}\n'
    assert http_get("::1", 443) == 'https via {"fd":4}\n'


@pytest.mark.needs_root
def test_without_sockets_it_falls_back_to_ports(processes: Processes, server: Path) -> None:
    proc = processes.start([*as_user(NOBODY), "node", str(server)])
    wait_ready(proc)
    assert http_get("127.0.0.1", 8080) == 'http via {"port":8080}\n'
    assert http_get("127.0.0.1", 8443) == 'https via {"port":8443}\n'
