"""Real processes as real users, real sockets, and a broker under the real
`systemd-socket-activate`.

- `enter_private_network()` moves the test session into a network namespace of its own
  (loopback only), so tests can use ports 80 and 443 without touching the host's.
- `as_user()` prefixes a command so it runs as a given uid with no capabilities.
- `Processes` tracks what a test starts and stops it by pid.
- `BrokerProcess` / `start_broker()`: a broker started by `systemd-socket-activate`.

Must never: signal a process the tests did not start, or send traffic anywhere but the
session's own loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import inspect
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

NOBODY: Final = 65534
BROKER_UID: Final = 61234
"""The broker runs as a uid with no user-database entry, as under DynamicUser=."""
OUTSIDER: Final = "www-data"
"""A named user in no test policy (Debian's uid 33)."""

START_TIMEOUT: Final = 20.0
"""Seconds for a broker or worker to come up: they take ~0.3 s; a loaded CI machine may
be many times slower, and a hang should fail the test rather than stall the run."""
EXIT_TIMEOUT: Final = 20.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""
REQUEST_TIMEOUT: Final = 10.0
"""Seconds for one HTTP request to a worker on loopback."""

AS_FROM_A_TERMINAL: Final = ("env", "--default-signal=HUP,INT,QUIT")
"""A command prefix that starts a program with SIGHUP, SIGINT and SIGQUIT at their
defaults, as a shell at a terminal starts it. The suite itself may run with them ignored
(a shell's background job, nohup, a CI runner), and an ignored disposition is inherited
through fork and exec: a test that stops a program as ^C would must start it this way."""

_CLONE_NEWNET: Final = 0x40000000


def enter_private_network() -> None:
    """Move this process (and every child it starts) into a new network namespace.

    Raises:
        RuntimeError: if other threads exist (they would stay behind) or unshare fails.
    """
    if threading.active_count() != 1:
        raise RuntimeError("cannot move a multi-threaded process into a network namespace")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        raise RuntimeError(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


# --- processes --------------------------------------------------------------------


def as_user(user: int | str, *, groups: Sequence[int] = ()) -> list[str]:
    """Return a command prefix that runs as `user` with no capabilities at all.

    A name gets its user-database groups; a bare uid gets gid = uid and `groups`.
    """
    if isinstance(user, str):
        ids = ["--reuid", user, "--regid", user, "--init-groups"]
    else:
        ids = ["--reuid", str(user), "--regid", str(user)]
        ids += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return ["setpriv", *ids, "--inh-caps=-all", "--bounding-set=-all", "--"]


def proc_status(pid: int) -> dict[str, str]:
    """Return /proc/PID/status as a dict."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def child_subreaper() -> int:
    """This process's PR_GET_CHILD_SUBREAPER (1 while it adopts orphaned descendants)."""
    from broker import syscalls  # noqa: PLC0415 (only child scripts that need it pay)

    value = ctypes.c_int(-1)
    pointer = ctypes.cast(ctypes.byref(value), ctypes.c_void_p)
    syscalls.prctl(syscalls.PR_GET_CHILD_SUBREAPER, pointer)
    return value.value


def fd_count(pid: int) -> int:
    """Return how many fds `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def interception_unsupported() -> str | None:
    """Why this kernel or machine cannot run `exec --intercept`, or None if it can."""
    from broker.errors import InterceptUnsupported  # noqa: PLC0415
    from broker.intercept.seccomp import check_supported  # noqa: PLC0415

    try:
        check_supported()
    except InterceptUnsupported as exc:
        return str(exc)
    return None


def open_fds() -> list[int]:
    """This process's open fds, in order."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue  # the directory's own fd, closed by now
        found.append(int(name))
    return sorted(found)


OPEN_FDS_SOURCE: Final = inspect.getsource(open_fds)
"""`open_fds` as source, for scripts run in other processes (they must import os)."""


LISTEN_FDS_PROBE: Final = (
    """
import json, os, socket
"""
    + OPEN_FDS_SOURCE
    + """
fds = []
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
    sock = socket.socket(fileno=fd)
    fds.append({
        "ino": os.fstat(fd).st_ino,
        "type": sock.type.name,
        "address": list(sock.getsockname()),
        "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    })
    sock.detach()
keys = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_OTHER", "KEEP")
pidfd = os.pidfd_open(os.getpid())
pidfd_ino = os.fstat(pidfd).st_ino
os.close(pidfd)
print(json.dumps({
    "pid": os.getpid(),
    "pidfd_ino": pidfd_ino,
    "env": {k: os.environ.get(k) for k in keys},
    "open": open_fds(),
    "fds": fds,
}))
"""
)
"""A program (python3 -I -c) that prints, as JSON, its pid, LISTEN_* environment, open
fds and each inherited socket (inode, type, address, listening): what `exec` gave it."""


def settled_fd_count(pid: int, readings: int = 10) -> int:
    """Return `pid`'s fd count once it has stayed the same for `readings` polls 20 ms apart
    (a client that just disconnected is closed by the broker a moment later)."""
    counts: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT
    while len(counts) < readings or len(set(counts[-readings:])) != 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"fd count of {pid} never settled: {counts[-readings:]}")
        counts.append(fd_count(pid))
        time.sleep(0.02)
    return counts[-1]


CHILD_TIMEOUT: Final = 30.0
"""Seconds a forked test child gets to report: it does a few system calls."""


def run_in_child(function: Callable[[], object]) -> dict[str, Any]:
    """Run `function` in a forked child (for what must not touch this process: dropping
    root, changing namespaces) and return {"result": its JSON-able value} or
    {"error": exception class name, "message": str(exception)}."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        os.close(read_end)
        status = 1
        try:
            result = json.dumps({"result": function()})
            status = 0
        except BaseException as e:
            result = json.dumps({"error": type(e).__name__, "message": str(e)})
        finally:
            os.write(write_end, result.encode())
            os._exit(status)
    os.close(write_end)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], CHILD_TIMEOUT)
            if not ready:
                raise AssertionError(f"timed out after {CHILD_TIMEOUT} s waiting for {pid}")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    report: dict[str, Any] = json.loads(b"".join(chunks))
    return report


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll `predicate` until it holds.

    Raises:
        AssertionError: naming `what`, after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def http_get(host: str, port: int = 80, path: str = "/") -> str:
    """GET http://host:port/path and return the body; raise on a non-200 status."""
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise AssertionError(f"GET {host}:{port}{path}: {response.status} {body}")
        return body
    finally:
        connection.close()


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Stop a process we started, and everything it started in its process group.

    SIGTERM to the group, then SIGKILL to what lingers: a worker's own children (node
    cluster workers, a forked server) hold listening sockets too. Each test process is
    started in a session of its own, so the group is ours alone.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            return
        time.sleep(0.05)  # let the rest of the group act on the SIGTERM first
        if not _group_alive(proc.pid):
            return
    proc.wait(EXIT_TIMEOUT)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Processes:
    """Every process a test starts, stopped (by pid) when the test ends."""

    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(
        self,
        argv: Sequence[str],
        *,
        log: IO[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path = "/",
    ) -> subprocess.Popen[str]:
        """Start `argv` in `cwd`: by default /, not the test's working directory, which
        may be a checkout that the other users the tests run as cannot enter (a mode-0700
        home): a program serving its working directory would answer 404 there."""
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=log or subprocess.PIPE,
            stderr=subprocess.STDOUT if log else subprocess.PIPE,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its group is ours to stop (see stop_process)
        )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@dataclass
class BrokerProcess:
    """A broker started by systemd-socket-activate, as systemd would start it.

    Attributes:
        proc: systemd-socket-activate, which becomes the broker (same pid) on exec.
        control: The control socket's path.
        log: The broker's stdout and stderr.
    """

    proc: subprocess.Popen[str]
    control: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """SIGTERM the broker and return its exit status."""
        stop_process(self.proc)
        return self.proc.returncode


def start_broker(
    processes: Processes,
    launcher: Path,
    workdir: Path,
    config: str,
    sockets: Sequence[tuple[str, str]] = (("http", "80"),),
    *,
    user: int | str = BROKER_UID,
    extra: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    nofile: str | None = None,
) -> BrokerProcess:
    """Start a broker under systemd-socket-activate and wait until it serves.

    Args:
        processes: Where the process is tracked for clean-up.
        launcher: bin/port-broker of the runtime.
        workdir: A world-readable directory for the config, control socket and log.
        config: TOML policy text.
        sockets: (name, systemd-socket-activate listen address) per socket.
        user: Who the broker runs as (after systemd-socket-activate bound as root).
        extra: More arguments for `port-broker serve`.
        wrapper: A command prefix the broker runs under, as `user` (it must exec the
            rest in place: systemd-socket-activate's LISTEN_PID is the broker's pid).
        nofile: RLIMIT_NOFILE as SOFT:HARD (prlimit's form), else the test's own.
    """
    config_path = workdir / "broker.toml"
    config_path.write_text(config)
    config_path.chmod(0o644)
    control = workdir / "control.sock"
    log_path = workdir / "broker.log"
    argv = ["prlimit", f"--nofile={nofile}", "--"] if nofile else []
    argv += ["systemd-socket-activate"]
    for _, address in sockets:
        argv += ["-l", address]
    argv += ["-l", str(control), "--fdname=" + ":".join([n for n, _ in sockets] + ["control"])]
    argv += [*as_user(user), *wrapper, str(launcher), "serve", "--config", str(config_path)]
    argv += extra
    with log_path.open("w") as log:
        proc = processes.start(argv, log=log)
    wait_for(control.exists, f"{control} to appear")
    control.chmod(0o666)  # as SocketMode=0666 in port-broker.socket
    broker = BrokerProcess(proc, control, log_path)
    # systemd-socket-activate starts the broker on the first connection: make it. The
    # socket file exists from bind(), a moment before listen(): retry a refused connect.
    reply = b""
    deadline = time.monotonic() + START_TIMEOUT
    while not reply and time.monotonic() < deadline and proc.poll() is None:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(START_TIMEOUT)
            try:
                probe.connect(str(control))
                probe.sendall(b'{"v":1,"op":"list"}\n')
                reply = probe.recv(4096)
            except ConnectionRefusedError:
                time.sleep(0.01)
            except OSError:  # timed out, or the broker exited at start
                break
    if not reply:
        raise AssertionError(f"broker did not answer; its log:\n{broker.output()}")
    return broker


@contextlib.contextmanager
def listening(address: tuple[str, int], family: int = socket.AF_INET) -> Iterator[socket.socket]:
    """A TCP socket listening on `address`, closed afterwards."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
        yield sock
    finally:
        sock.close()
