"""`port-broker exec --intercept` end to end: a real broker, the real CLI, unmodified
programs running as uid 65534 with no capabilities, calling bind(80) themselves.

tests/test_intercept.py tests the supervisor module on its own; this file tests what a
user runs: the broker's policy, the acquisition, the default port mapping and --map,
both recommended socket set-ups (one dual-stack socket, or an IPv4 plus an IPv6-only
socket under one name), status and signal propagation.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Final

import pytest

from tests.harness.processes import (
    NOBODY,
    OUTSIDER,
    START_TIMEOUT,
    BrokerProcess,
    Processes,
    as_user,
    http_get,
    interception_unsupported,
    proc_status,
    start_broker,
    wait_for,
)
from tests.harness.runtime import ROOT, SYSTEM_PYTHON, VITE

POLICY: Final = '[sockets.http]\nusers = ["nobody"]\n'

NODE_SERVER: Final = """
const http = require('http');
http.createServer((q, r) => r.end(`node ${process.pid} ${process.getuid()}\\n`)).listen(80);
"""

NODE_CLUSTER: Final = """
const cluster = require('cluster'), http = require('http');
if (cluster.isPrimary) { cluster.fork(); cluster.fork(); }
else http.createServer((q, r) => {
  r.setHeader('connection', 'close'); r.end(`worker ${process.pid}\\n`);
}).listen(80);
"""

FORKING_PYTHON: Final = """
import http.server, os, socket, sys
if os.fork() == 0:  # the child binds, not the program we started
    class V4(http.server.HTTPServer):
        address_family = socket.AF_INET
    V4(("0.0.0.0", 80), http.server.SimpleHTTPRequestHandler).serve_forever()
os.wait()
"""


_REASON = interception_unsupported()
pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


@pytest.fixture
def dual(processes: Processes, launcher: Path, workdir: Path) -> BrokerProcess:
    """A broker holding one dual-stack socket [::]:80, as the shipped units do."""
    return start_broker(processes, launcher, workdir, POLICY)


@pytest.fixture
def split(processes: Processes, launcher: Path, workdir: Path) -> BrokerProcess:
    """A broker holding 0.0.0.0:80 and an IPv6-only [::]:80, both named http."""
    config = workdir / "broker.toml"
    config.write_text(POLICY)
    control = workdir / "control.sock"
    with (workdir / "broker.log").open("w") as log:
        proc = processes.start(
            [str(launcher), "serve", "--config", str(config), "--bind", "http=0.0.0.0:80",
             "--bind", "http=[::]:80", "--control", str(control), "--user", OUTSIDER],
            log=log,
        )  # fmt: skip
    wait_for(control.exists, "the control socket")
    return BrokerProcess(proc, control, workdir / "broker.log")


def intercepted(
    processes: Processes, launcher: Path, broker: BrokerProcess, *command: str,
    options: tuple[str, ...] = (), user: int | str = NOBODY,
) -> subprocess.Popen[str]:  # fmt: skip
    return processes.start([*as_user(user), str(launcher), "exec", "--socket",
                            str(broker.control), "--intercept", *options, "http", "--",
                            *command])  # fmt: skip


def served(host: str, port: int = 80, timeout: float = START_TIMEOUT) -> str:
    """GET / once the program has bound (it starts asynchronously)."""
    body: list[str] = []

    def answered() -> bool:
        try:
            body.append(http_get(host, port))
        except OSError:
            return False
        return True

    wait_for(answered, f"an answer on {host}:{port}", timeout)
    return body[-1]


def script(workdir: Path, name: str, text: str) -> str:
    path = workdir / name
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return str(path)


def test_unmodified_node_listen_80(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path
) -> None:
    intercepted(processes, launcher, dual, "node", script(workdir, "s.js", NODE_SERVER))
    node, uid = served("127.0.0.1").split()[1:]
    assert uid == str(NOBODY)
    assert served("::1").split()[1] == node
    status = proc_status(int(node))
    assert status["CapEff"] == status["CapPrm"] == "0" * 16
    assert status["Seccomp"] == "2"  # it runs under the bind() filter
    # The backlog stays what the holder set (4096), not node's 511:
    ss = subprocess.run(["ss", "-Hltn", "sport", "= :80"], capture_output=True, text=True,
                        check=True).stdout  # fmt: skip
    assert ss.split()[2] == "4096", ss


def intercept_recipe(program: str) -> str:
    """The command docs/intercept.md's first example block gives for `program`."""
    block = (ROOT / "docs" / "intercept.md").read_text().split("```sh\n", 1)[1]
    for line in block.split("```", 1)[0].splitlines():
        command = line.split("#", 1)[0].strip()
        if command.split(" -- ", 1)[-1].split()[0] == program:
            return command
    raise AssertionError(f"docs/intercept.md gives no command for {program}")


NODE_ON_3000: Final = """
const http = require('http');
http.createServer((q, r) => r.end(`node on ${process.pid}\\n`)).listen(3000);
"""


@pytest.mark.parametrize("program", ["python3", "busybox", "node"])
def test_the_docs_intercept_commands_as_written(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path, program: str
) -> None:
    # As a user types them: `port-broker` on PATH, the broker found by
    # PORT_BROKER_SOCKET, in a directory holding the files they serve or run.
    command = intercept_recipe(program)
    (workdir / "index.html").write_text("hello from the working directory\n")
    (workdir / "index.html").chmod(0o644)
    script(workdir, "server.js", NODE_ON_3000)
    env = {"PATH": f"{launcher.parent}:/usr/bin:/bin", "HOME": "/nonexistent",
           "LANG": "C.UTF-8", "PORT_BROKER_SOCKET": str(dual.control)}  # fmt: skip
    proc = processes.start([*as_user(NOBODY), "sh", "-c", command], env=env, cwd=workdir)
    expected = "node on" if program == "node" else "hello from the working directory"
    assert expected in served("127.0.0.1")
    assert expected in served("::1")
    assert proc.poll() is None


def test_the_docs_vite_command_as_written(
    processes: Processes, launcher: Path, workdir: Path
) -> None:
    # README.md and docs/intercept.md give the same line; it runs in docs/examples/vite,
    # with that project's packages as .ci/setup installed them from its lock.
    command = intercept_recipe("npx")
    assert f"\n{command}\n" in (ROOT / "README.md").read_text()
    if not VITE.is_dir():
        raise RuntimeError(f"{VITE} is missing: run .ci/setup (docs/examples/vite)")
    broker = start_broker(processes, launcher, workdir, '[sockets.https]\nusers = ["nobody"]\n',
                          sockets=(("https", "443"),))  # fmt: skip
    app = workdir / "vite"
    shutil.copytree(VITE, app, symlinks=True)
    shutil.copy(ROOT / "docs" / "examples" / "vite" / "index.html", app)
    (workdir / "home").mkdir()
    for path in [app, workdir / "home", *app.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)  # vite writes its cache in node_modules/.vite
    env = {"PATH": f"{launcher.parent}:/usr/bin:/bin", "HOME": str(workdir / "home"),
           "LANG": "C.UTF-8", "PORT_BROKER_SOCKET": str(broker.control)}  # fmt: skip
    proc = processes.start([*as_user(NOBODY), "sh", "-c", command], env=env, cwd=app)
    assert "<p>hello from vite</p>" in served("127.0.0.1", 443, timeout=START_TIMEOUT * 3)
    assert "<p>hello from vite</p>" in served("::1", 443)
    assert proc.poll() is None


def test_an_ipv4_program_gets_the_ipv4_socket_of_a_split_pair(
    processes: Processes, launcher: Path, split: BrokerProcess, workdir: Path
) -> None:
    proc = intercepted(processes, launcher, split, SYSTEM_PYTHON,
                       script(workdir, "fork.py", FORKING_PYTHON))  # fmt: skip
    assert "Directory listing" in served("127.0.0.1")  # served by the forked child
    assert proc.poll() is None


def test_an_ipv4_program_beside_a_dual_stack_socket_is_told_what_to_hold(
    processes: Processes, launcher: Path, dual: BrokerProcess
) -> None:
    proc = intercepted(processes, launcher, dual, SYSTEM_PYTHON, "-m", "http.server", "80",
                       "--bind", "0.0.0.0")  # fmt: skip
    assert proc.wait(START_TIMEOUT) == 1
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Hold an IPv4 socket for port 80 too" in err, err
    assert "Address family not supported" in err  # what http.server itself reported


def test_node_cluster_workers_all_serve(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path
) -> None:
    intercepted(processes, launcher, dual, "node", script(workdir, "c.js", NODE_CLUSTER))
    workers: set[str] = set()

    def both_answered() -> bool:
        workers.add(served("127.0.0.1"))
        return len(workers) == 2

    wait_for(both_answered, "both cluster workers to answer")


def test_map_sends_another_port_to_a_held_socket(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path
) -> None:
    server = NODE_SERVER.replace("listen(80)", "listen(3000)")
    intercepted(processes, launcher, dual, "node", script(workdir, "m.js", server),
                options=("--map", "3000=http"))  # fmt: skip
    assert served("127.0.0.1").startswith("node ")


def test_refusal_by_policy_stops_before_the_command(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path
) -> None:
    marker = workdir / "started"
    proc = intercepted(processes, launcher, dual, "touch", str(marker), user=OUTSIDER)
    assert proc.wait(START_TIMEOUT) == 77
    assert not marker.exists()
    assert proc.stderr is not None
    assert re.match(r"port-broker exec: user www-data \(uid 33, pid \d+\) may not acquire "
                    r"socket 'http'", proc.stderr.read())  # fmt: skip


def test_exit_status_and_signals_are_the_programs(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path
) -> None:
    exits = intercepted(processes, launcher, dual, "sh", "-c", "exit 7")
    assert exits.wait(START_TIMEOUT) == 7
    killed = intercepted(processes, launcher, dual, "sh", "-c", "kill -KILL $$")
    assert killed.wait(START_TIMEOUT) == 128 + signal.SIGKILL

    trap = script(workdir, "trap.sh", """
        trap 'echo got TERM; exit 3' TERM
        echo ready
        while :; do sleep 0.05; done
    """)  # fmt: skip
    proc = intercepted(processes, launcher, dual, "sh", trap)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it
    assert proc.wait(START_TIMEOUT) == 3
    assert proc.stdout.read() == "got TERM\n"


BINDER: Final = """
import os, socket, sys, time
print(os.environ["PATH"].split(":")[0], flush=True)  # the id-map relay's directory
while not os.path.exists(sys.argv[1]):  # until the silent peers are at it
    time.sleep(0.01)
took = []
for _ in range(200):
    sock = socket.socket()
    began = time.monotonic()
    sock.bind(("127.0.0.1", 0))  # each bind() waits for the supervisor's answer
    took.append(time.monotonic() - began)
    sock.close()
    time.sleep(0.005)
print(sorted(took)[197] * 1000, flush=True)  # the p99 of 200, in ms
"""

SILENT_PEER: Final = """
import socket, sys, time
held, end = [], time.monotonic() + float(sys.argv[2])
print("connecting", flush=True)
while time.monotonic() < end:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(sys.argv[1])  # and never a byte
        held.append(sock)
    except OSError:
        sock.close()
    if len(held) > 50:
        held.pop(0).close()
    time.sleep(0.01)
"""


def test_a_silent_peer_of_the_id_map_relay_does_not_slow_the_programs_binds(
    processes: Processes, launcher: Path, dual: BrokerProcess, workdir: Path
) -> None:
    # A process of the same user, outside the launcher's tree, connects to the relay's
    # socket and says nothing: the supervisor, which answers every bind() of the
    # program, must not wait on it.
    go = workdir / "go"
    binder = intercepted(processes, launcher, dual, SYSTEM_PYTHON, "-c", BINDER, str(go))
    assert binder.stdout is not None
    relay = binder.stdout.readline().strip()
    assert "port-broker-idmap." in relay  # the stand-ins are there (uidmap is installed)
    peer = processes.start(
        [*as_user(NOBODY), SYSTEM_PYTHON, "-c", SILENT_PEER, f"{relay}/socket", "30"]
    )
    assert peer.stdout is not None
    assert peer.stdout.readline() == "connecting\n"
    go.touch()
    assert binder.wait(START_TIMEOUT + 30) == 0
    assert float(binder.stdout.read()) <= 50.0  # ms: the p99 of the program's bind()s
