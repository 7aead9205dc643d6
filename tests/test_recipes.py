"""The worker commands README.md gives ("A worker", the table of how servers take an
inherited socket), run as written: the command is read from the README itself, started
with `port-broker exec http --` as nobody, with no capability, against a real broker
holding port 80 (in the session's own network namespace), and asked over HTTP.

The servers are the real ones from PyPI, at the versions locked in
.ci/requirements/servers.txt (gunicorn, uvicorn); the Node row is
docs/examples/hello.js, which tests/test_integration.py serves the same way.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Final

import pytest

from tests.harness.processes import (
    NOBODY,
    START_TIMEOUT,
    BrokerProcess,
    Processes,
    as_user,
    http_get,
    proc_status,
    start_broker,
)
from tests.harness.runtime import ROOT, build_servers, make_public_dir

pytestmark = pytest.mark.needs_root

APPS: Final = {
    "gunicorn": """\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from gunicorn\\n"]
""",
    "uvicorn": """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello from uvicorn\\n"})
""",
}
"""The smallest app each server's recipe names (`app:app`, in the working directory)."""


def readme_command(server: str) -> str:
    """The command README.md's worker table gives for `server`: its first code span."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"| {server} |"):
            found = re.search(r"`([^`]+)`", line)
            assert found, line
            return found.group(1)
    raise AssertionError(f"README.md has no row for {server} in its worker table")


@pytest.fixture(scope="module")
def servers(public_root: Path) -> Path:
    """The servers' world-readable bin/ (built once for the module)."""
    return build_servers(make_public_dir(public_root, "servers"))


@pytest.mark.parametrize("server", sorted(APPS))
def test_readme_worker_command(  # (short: the workdir is named after it, 40 characters)
    server: str,
    processes: Processes,
    launcher: Path,
    workdir: Path,
    servers: Path,
) -> None:
    command = readme_command(server)
    assert command.split()[0] == server
    broker: BrokerProcess = start_broker(
        processes, launcher, workdir, '[sockets.http]\nusers = ["nobody"]\n'
    )
    app = make_public_dir(workdir, "app")
    (app / "app.py").write_text(APPS[server])
    (app / "app.py").chmod(0o644)
    env = {"PATH": f"{servers}:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    argv = [*as_user(NOBODY), str(launcher), "exec", "--socket", str(broker.control), "http"]
    worker = processes.start([*argv, "--", *shlex.split(command)], env=env, cwd=app)
    deadline = time.monotonic() + START_TIMEOUT
    body = None
    while body is None:
        try:
            body = http_get("127.0.0.1")
        except (OSError, AssertionError):
            if worker.poll() is not None or time.monotonic() > deadline:
                output = worker.stdout.read() if worker.stdout else ""
                pytest.fail(f"{command} did not serve (status {worker.poll()}):\n{output}")
            time.sleep(0.1)
    assert body == f"hello from {server}\n"
    assert http_get("::1") == body  # the dual-stack socket: both families
    status = proc_status(worker.pid)
    assert status["CapEff"] == "0" * 16
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert "granted socket 'http' to user nobody" in broker.output()
    worker.terminate()
    try:
        worker.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        worker.kill()
