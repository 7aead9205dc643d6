"""End to end on this machine: systemd-socket-activate binds :80, the broker (an
unprivileged uid) holds it, and workers running as other unprivileged uids get it.

Everything is real: the sockets, the ports (inside the session's own network
namespace), `systemd-socket-activate`, `setpriv`-ed uids with no capabilities, `node`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from broker import client
from tests.harness.processes import (
    BROKER_UID,
    NOBODY,
    OUTSIDER,
    START_TIMEOUT,
    BrokerProcess,
    Processes,
    as_user,
    http_get,
    proc_status,
    settled_fd_count,
    start_broker,
    wait_for,
)
from tests.harness.runtime import ROOT, SYSTEM_PYTHON

pytestmark = pytest.mark.needs_root

NOBODY_MAY_HAVE_HTTP = '[sockets.http]\nusers = ["nobody"]\n'


@pytest.fixture
def hello(workdir: Path) -> Path:
    """The Node hello worker, where every user can read it."""
    path = workdir / "hello.js"
    shutil.copyfile(ROOT / "docs" / "examples" / "hello.js", path)
    path.chmod(0o644)
    return path


@pytest.fixture
def broker(processes: Processes, launcher: Path, workdir: Path) -> BrokerProcess:
    return start_broker(processes, launcher, workdir, NOBODY_MAY_HAVE_HTTP)


def run_as(
    user: int | str, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*as_user(user), *argv],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
        env=env,
    )


def start_node_worker(
    processes: Processes,
    launcher: Path,
    broker: BrokerProcess,
    hello: Path,
    user: int | str = NOBODY,
) -> subprocess.Popen[str]:
    worker = processes.start(
        [
            *as_user(user),
            str(launcher),
            "exec",
            "--socket",
            str(broker.control),
            "http",
            "--",
            "node",
            str(hello),
        ]
    )
    assert worker.stdout is not None
    line = worker.stdout.readline()  # "listening on fd 3 (http)" once it serves
    assert "listening on fd 3 (http)" in line, line + (worker.stdout.read() or "")
    return worker


def test_an_unprivileged_uid_cannot_bind_port_80_itself() -> None:
    # The control experiment: without the broker, nobody has no way onto port 80 here.
    done = run_as(
        NOBODY, [SYSTEM_PYTHON, "-c", "import socket; socket.socket().bind(('127.0.0.1', 80))"]
    )
    assert done.returncode != 0
    assert "PermissionError" in done.stderr


def test_node_worker_serves_port_80_through_exec(
    processes: Processes, launcher: Path, broker: BrokerProcess, hello: Path
) -> None:
    worker = start_node_worker(processes, launcher, broker, hello)

    body = http_get("127.0.0.1")
    assert f"pid {worker.pid}, uid {NOBODY}" in body  # exec replaced the launcher in place
    assert "client 127.0.0.1" in body or "client ::ffff:127.0.0.1" in body
    assert f"uid {NOBODY}" in http_get("::1")  # one dual-stack socket from systemd
    status = proc_status(worker.pid)
    assert status["CapEff"] == status["CapPrm"] == status["CapAmb"] == "0" * 16
    assert status["Uid"].split() == [str(NOBODY)] * 4
    env = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
    assert b"LISTEN_FDS=1" in env
    assert b"LISTEN_FDNAMES=http" in env
    assert f"LISTEN_PID={worker.pid}".encode() in env
    # The socket came from the broker (the answer above is the worker's own).
    assert "granted socket 'http' to user nobody" in broker.output()


def test_python_client_acquires_as_an_unprivileged_uid(
    launcher: Path, broker: BrokerProcess
) -> None:
    site = launcher.parent.parent / "site"
    script = textwrap.dedent(f"""
        import sys, threading, urllib.request
        sys.path.insert(0, {str(site)!r})
        import broker.client
        sock = broker.client.acquire("http", path={str(broker.control)!r})
        print(sock.getsockname()[1], sock.family.name, sock.type.name)
        def answer():
            conn, _ = sock.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nserved by python")
            conn.close()
        threading.Thread(target=answer).start()
        print(urllib.request.urlopen("http://127.0.0.1/", timeout=10).read().decode())
    """)
    done = run_as(NOBODY, [SYSTEM_PYTHON, "-I", "-c", script])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["80 AF_INET6 SOCK_STREAM", "served by python"]


def test_a_user_outside_the_policy_is_refused_and_gets_no_fd(
    launcher: Path, broker: BrokerProcess, workdir: Path
) -> None:
    marker = workdir / "ran"
    done = run_as(
        OUTSIDER,
        [
            str(launcher),
            "exec",
            "--socket",
            str(broker.control),
            "http",
            "--",
            "touch",
            str(marker),
        ],
    )
    assert done.returncode == 77
    assert not marker.exists()  # the command never started
    message = done.stderr.strip()
    assert message.startswith("port-broker exec: user www-data (uid 33, pid ")
    assert "may not acquire socket 'http'" in message
    assert f"[sockets.http] in {workdir / 'broker.toml'}" in message
    assert "\n" not in message

    # Through the library: AccessDenied carries the broker's words, and no fd arrives.
    site = launcher.parent.parent / "site"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(site)!r})
        import broker.client, broker.errors
        before = sorted(os.listdir("/proc/self/fd"))
        try:
            broker.client.acquire("http", path={str(broker.control)!r})
        except broker.errors.AccessDenied as e:
            print(e.code, e.message)
        print(before == sorted(os.listdir("/proc/self/fd")))
    """)
    done = run_as(OUTSIDER, [SYSTEM_PYTHON, "-I", "-c", script])
    lines = done.stdout.splitlines()
    assert lines[0].startswith("denied user www-data (uid 33")
    assert lines[1] == "True"
    assert "denied socket 'http' to user www-data" in broker.output()


def test_a_peer_the_brokers_user_namespace_does_not_map_is_not_nobody(
    processes: Processes, launcher: Path, workdir: Path
) -> None:
    # A broker in a user namespace that maps its own uid alone (as in a container) sees
    # every other uid as the overflow uid, 65534, which the user database calls nobody
    # (group nogroup): that names no one in particular, so a rule naming nobody and
    # nogroup grants nobody from outside, nor nobody itself.
    policy = '[sockets.http]\nusers = ["nobody"]\ngroups = ["nogroup"]\n'
    broker = start_broker(processes, launcher, workdir, policy,
                          wrapper=["unshare", "--user", "--map-current-user"])  # fmt: skip
    for user in (BROKER_UID + 1, NOBODY):
        done = run_as(user, [str(launcher), "exec", "--socket", str(broker.control), "http",
                             "--", "true"])  # fmt: skip
        assert done.returncode == 77, done.stderr
        assert "(uid 65534, pid " in done.stderr
        assert "its uid is not mapped into the broker's user namespace" in done.stderr
    assert "denied socket 'http' to user nobody (uid 65534" in broker.output()
    assert "granted" not in broker.output()


def test_unknown_socket_names_what_the_user_may_acquire(
    launcher: Path, broker: BrokerProcess
) -> None:
    done = run_as(
        NOBODY, [str(launcher), "exec", "--socket", str(broker.control), "https", "--", "true"]
    )
    assert done.returncode == 66
    assert done.stderr == "port-broker exec: no socket named 'https' (you may acquire: http)\n"


def test_exec_out_of_fds_for_the_sockets_says_so_and_runs_nothing(
    launcher: Path, broker: BrokerProcess, workdir: Path
) -> None:
    # fds 0-4: the granted socket comes at 4, and moving it to 3 needs one more.
    marker = workdir / "ran"
    done = run_as(NOBODY, ["prlimit", "--nofile=5", str(launcher), "exec", "--socket",
                           str(broker.control), "http", "--", "touch", str(marker)])  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        "port-broker exec: cannot move the 1 granted socket(s) to fd 3..3: Too many open "
        "files; touch was not run (see the open-file limit, ulimit -n)\n"
    )
    assert not marker.exists()


def test_exec_without_a_broker_says_where_it_looked(launcher: Path, workdir: Path) -> None:
    missing = workdir / "no-broker.sock"
    done = run_as(
        NOBODY,
        [str(launcher), "exec", "http", "--", "true"],
        env={"PORT_BROKER_SOCKET": str(missing), "PATH": os.environ["PATH"]},
    )
    assert done.returncode == 69
    assert done.stderr.startswith(f"port-broker exec: {missing}: no such socket")


def test_list_and_status(
    launcher: Path, broker: BrokerProcess, processes: Processes, hello: Path
) -> None:
    start_node_worker(processes, launcher, broker, hello)
    listed = run_as(NOBODY, [str(launcher), "list", "--json", "--socket", str(broker.control)])
    assert json.loads(listed.stdout) == [
        {"name": "http", "family": "inet6", "type": "stream", "address": "[::]:80"}
    ]
    assert (
        run_as(OUTSIDER, [str(launcher), "list", "--socket", str(broker.control)]).stdout
        == "no socket may be acquired by this user\n"
    )

    denied = run_as(NOBODY, [str(launcher), "status", "--socket", str(broker.control)])
    assert denied.returncode == 77
    assert "may not read the broker's status" in denied.stderr

    # root is the default [status] reader
    shown = subprocess.run(
        [str(launcher), "status", "--json", "--socket", str(broker.control)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(shown.stdout)
    assert report["pid"] == broker.pid
    assert report["grants"] == 1
    assert report["sockets"] == [
        {
            "name": "http",
            "family": "inet6",
            "type": "stream",
            "address": "[::]:80",
            "grants": 1,
            "denials": 0,
        }
    ]
    assert report["recent"][-1]["uid"] == NOBODY
    table = subprocess.run(
        [str(launcher), "status", "--socket", str(broker.control)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "http  tcp6   [::]:80  1       0" in table


def test_broker_runs_unprivileged_and_stops_cleanly_on_sigterm(broker: BrokerProcess) -> None:
    # The configuration was read by a child with pydantic; the broker never loaded it.
    assert "pydantic_core" not in Path(f"/proc/{broker.pid}/maps").read_text()
    status = proc_status(broker.pid)
    assert status["Uid"].split() == [str(BROKER_UID)] * 4
    assert status["CapEff"] == "0" * 16
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(START_TIMEOUT) == 0
    assert "stopping on SIGTERM" in broker.output()


def test_robust_against_bad_clients_and_leaks_no_fd(
    processes: Processes, launcher: Path, workdir: Path
) -> None:
    broker = start_broker(
        processes, launcher, workdir, '[sockets.http]\nusers = ["root"]\n', extra=()
    )
    path = str(broker.control)
    baseline = settled_fd_count(broker.pid)

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(START_TIMEOUT)
        sock.connect(path)
        return sock

    idle = connect()  # says nothing at all
    half = connect()
    half.sendall(b'{"v":1,"op":"acq')  # stops mid-request
    garbage = connect()
    garbage.sendall(b"\x00\xff garbage\n")
    oversized = connect()
    oversized.sendall(b"x" * 5000)
    vanished = connect()
    vanished.sendall(b'{"v":1,"op":"acquire","names":["http"]}\n')
    vanished.close()  # gone before the reply

    granted = client.acquire("http", path=path)
    assert granted.getsockname()[1] == 80
    granted.close()
    assert b'"code":"malformed"' in garbage.recv(4096)
    assert b'"code":"too-large"' in oversized.recv(4096)
    for sock in (idle, half, garbage, oversized):
        sock.close()

    for _ in range(1000):
        client.acquire("http", path=path).close()
    assert settled_fd_count(broker.pid) == baseline
    report = client.status(path=path)
    assert report["grants"] >= 1001
    assert report["connections"]["active"] == 1  # this status request


def test_fallback_binds_as_root_and_drops_to_the_user(
    processes: Processes, launcher: Path, workdir: Path, hello: Path
) -> None:
    config = workdir / "broker.toml"
    config.write_text(NOBODY_MAY_HAVE_HTTP)
    control = workdir / "control.sock"
    with (workdir / "broker.log").open("w") as log:
        proc = processes.start(
            [
                str(launcher),
                "serve",
                "--config",
                str(config),
                "--bind",
                "http=127.0.0.1:80",
                "--control",
                str(control),
                "--user",
                OUTSIDER,
            ],
            log=log,
        )
    wait_for(control.exists, "the control socket")
    broker = BrokerProcess(proc, control, workdir / "broker.log")

    worker = start_node_worker(processes, launcher, broker, hello)
    assert f"uid {NOBODY}" in http_get("127.0.0.1")
    status = proc_status(proc.pid)
    assert status["Uid"].split() == ["33"] * 4
    assert status["Gid"].split() == ["33"] * 4
    assert status["Groups"].split() == ["33"]
    assert status["CapEff"] == status["CapPrm"] == status["CapInh"] == "0" * 16
    assert status["NoNewPrivs"] == "1"
    assert worker.poll() is None
    assert broker.stop() == 0
    assert "serving as root" not in broker.output()  # it was root only until it dropped


def test_fallback_refuses_to_serve_as_root(launcher: Path, workdir: Path) -> None:
    done = subprocess.run(
        [
            str(launcher),
            "serve",
            "--bind",
            "http=127.0.0.1:80",
            "--control",
            str(workdir / "c.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 78
    assert "refusing to serve as root: pass --user NAME" in done.stderr
    assert not (workdir / "c.sock").exists()


def test_config_naming_a_socket_systemd_did_not_pass_stops_the_start(
    processes: Processes, launcher: Path, workdir: Path
) -> None:
    config = '[sockets.http]\nusers = ["nobody"]\n[sockets.https]\nusers = ["nobody"]\n'
    with pytest.raises(AssertionError, match="did not answer"):
        start_broker(processes, launcher, workdir, config)
    assert processes.started[-1].wait(START_TIMEOUT) == 78  # then its log is complete
    log = (workdir / "broker.log").read_text()
    assert (
        "has rules for https but the broker holds no such socket (it holds: http); add "
        "a .socket unit with that FileDescriptorName="
    ) in log
