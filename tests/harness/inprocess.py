"""A real `Broker` run in the test's own trio run, on real sockets.

`running_broker()` serves a real AF_UNIX control socket (mode 0666, so processes of
other uids can connect) and holds real TCP (IPv4 and IPv6) and UDP sockets on loopback;
`Wire` talks the protocol raw. Because the broker runs in the test's process,
/proc/self/fd counts its fds too: `open_fds()` and `settled_fds()` watch for leaks.

Must never: leave a socket or file behind (everything is closed, and the control
socket's file removed, when the context ends).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import pwd
import re
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import trio
import trio.testing

from broker.daemon import users
from broker.daemon.activation import BACKLOG, HeldSocket, Intake, inspect
from broker.daemon.audit import Audit
from broker.daemon.config import Config
from broker.daemon.driver import (
    Broker,
)
from broker.daemon.identity import cgroup_of, unit_from_cgroup
from broker.daemon.policy import Policy, Rule
from broker.protocol import SCM_MAX_FD
from tests.harness.processes import NOBODY, START_TIMEOUT

CONFIG_PATH: Final = "/etc/port-broker/test-broker.toml"
"""Only named in messages: the policy is built here, never read from a file."""
CLIENT_TIMEOUT: Final = 5.0
"""The default client_timeout. Tests that wait for it run on the autojump clock."""
LONG_TIMEOUT: Final = 600.0
"""client_timeout for tests on the real clock whose idle clients must stay connected for
the whole test; no test waits for it."""
UID: Final = os.geteuid()
GID: Final = os.getegid()
USER: Final = pwd.getpwuid(UID).pw_name
"""Who this test process is (root in CI, but nothing here depends on it unless marked)."""
ME: Final = Rule(uids=frozenset({UID}))
DEFAULT_RULES: Final[Mapping[str, Rule]] = {
    "http": ME,
    "dual": ME,
    "dns": Rule(gids=frozenset({GID})),
    "secret": Rule(uids=frozenset({NOBODY})),
    # "norule" is held but has no rule: nobody may have it.
}
HELD_NAMES: Final = "dns, dual, http, norule, secret"
MINE: Final = "dns, dual, http"
"""What this process may acquire under DEFAULT_RULES: all an unknown-socket refusal names."""
ANCILLARY: Final = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)

LIST: Final = b'{"v":1,"op":"list"}\n'
STATUS: Final = b'{"v":1,"op":"status"}\n'


def acquire_line(*names: str) -> bytes:
    return json.dumps({"v": 1, "op": "acquire", "names": list(names)}).encode() + b"\n"


# --- sockets and fds --------------------------------------------------------------


def tcp_listener(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on an ephemeral port of `host`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    """A UDP socket bound to an ephemeral port of `host`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def default_held() -> dict[str, list[socket.socket]]:
    """http (IPv4), dual (IPv4 + IPv6), dns (UDP), secret (nobody's), norule (no rule)."""
    held: dict[str, list[socket.socket]] = {}
    try:
        for name, make, host in (
            ("http", tcp_listener, "127.0.0.1"),
            ("dual", tcp_listener, "127.0.0.1"),
            ("dual", tcp_listener, "::1"),
            ("dns", udp_socket, "127.0.0.1"),
            ("secret", tcp_listener, "127.0.0.1"),
            ("norule", tcp_listener, "127.0.0.1"),
        ):
            held.setdefault(name, []).append(make(host))
    except BaseException:
        for socks in held.values():
            for sock in socks:
                sock.close()
        raise
    return held


def ino(sock: socket.socket | int) -> int:
    """The socket's inode: equal for two fds of the same open socket, and only then."""
    return os.fstat(sock if isinstance(sock, int) else sock.fileno()).st_ino


def open_fds() -> dict[int, str]:
    """This process's open fds and what each is (readlink of /proc/self/fd/N)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        # FileNotFoundError: the fd os.listdir itself had open, closed by now.
        with contextlib.suppress(FileNotFoundError):
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


async def settled_fds() -> dict[int, str]:
    """`open_fds()` once every task (the broker's too) is blocked: it has closed what a
    finished client left it."""
    await trio.testing.wait_all_tasks_blocked()
    return open_fds()


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


class Closable(Protocol):
    def close(self) -> None: ...


SocketT = TypeVar("SocketT", bound=Closable)


@contextlib.contextmanager
def owned(socks: Sequence[SocketT]) -> Iterator[Sequence[SocketT]]:
    """Close every socket in `socks` afterwards."""
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


class Wire:
    """A raw control connection: bytes (and fds) out, reply lines and fds in."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.pending = b""

    @classmethod
    async def open(cls, path: str) -> Wire:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            view = view[await self.sock.sendmsg([view], ancillary) :]
        while view:
            view = view[await self.sock.send(view) :]

    async def reply(self) -> tuple[dict[str, Any], list[socket.socket]]:
        """Read one reply line; return it parsed, with the fds that came with it."""
        fds: list[int] = []
        while b"\n" not in self.pending:
            data, ancdata, flags, _ = await self.sock.recvmsg(65536, ANCILLARY)
            fds += fds_from(ancdata)
            if not data or flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise AssertionError(f"no complete reply: {self.pending!r}, flags {flags}")
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line), [socket.socket(fileno=fd) for fd in fds]

    async def plain_reply(self) -> dict[str, Any]:
        """Read one reply; it must carry no fds."""
        reply, fds = await self.reply()
        with owned(fds):
            assert fds == [], reply
        return reply

    async def last_reply(self) -> dict[str, Any]:
        """Read one reply with no fds, after which the broker closes, sending nothing more."""
        reply = await self.plain_reply()
        assert await self.rest() == b"", reply
        return reply

    async def request(self, data: bytes) -> dict[str, Any]:
        """Send `data`, return the reply; it must carry no fds."""
        await self.send(data)
        return await self.plain_reply()

    async def rest(self) -> bytes:
        """Everything else the broker sends until it closes; it must carry no fds."""
        data = self.pending
        while True:
            try:
                chunk, ancdata, _, _ = await self.sock.recvmsg(65536, ANCILLARY)
            except ConnectionResetError:  # it closed with our bytes still unread
                return data
            assert fds_from(ancdata) == []
            if not chunk:
                return data
            data += chunk


# --- the broker under test --------------------------------------------------------


@dataclass
class Served:
    """A broker serving in this process.

    Attributes:
        broker: The `Broker`.
        path: Its control socket.
        held: The sockets it holds, by name (owned by its intake).
        stopped: Set when `serve` has ended, for whatever reason.
        returned: True if `serve` returned by itself (SIGTERM), not cancelled.
    """

    broker: Broker
    path: str
    held: dict[str, list[socket.socket]]
    stopped: trio.Event = field(default_factory=trio.Event)
    returned: bool = False

    def inos(self, *names: str) -> list[int]:
        return [ino(sock) for name in names for sock in self.held[name]]


_broker_numbers = itertools.count()


def make_intake(control: socket.socket, held: Mapping[str, Sequence[socket.socket]]) -> Intake:
    return Intake(
        control=control,
        held={
            name: [
                HeldSocket(name, sock, inspect(sock, name, f"test socket {name}")) for sock in socks
            ]
            for name, socks in held.items()
        },
    )


@contextlib.asynccontextmanager
async def running_broker(
    directory: Path,
    *,
    held: Mapping[str, Sequence[socket.socket]] | None = None,
    rules: Mapping[str, Rule] = DEFAULT_RULES,
    status: Rule = ME,
    policy: Policy | None = None,
    max_connections: int = 64,
    max_connections_per_user: int = 64,
    client_timeout: float = CLIENT_TIMEOUT,
    config_path: str = CONFIG_PATH,
    idle_exit: float = 0.0,
    restartable: bool = False,
) -> AsyncIterator[Served]:
    """Serve `held` (default: `default_held()`, taking ownership) in this trio run.

    `restartable`: serve as a broker systemd started does, which stops when idle.

    The body must finish within START_TIMEOUT seconds (virtual ones on a MockClock).

    The control socket is `directory`/brokerN.sock, mode 0666 (as port-broker.socket),
    so processes of other uids can connect when `directory` is world-readable.
    """
    sockets = default_held() if held is None else {k: list(v) for k, v in held.items()}
    path = directory / f"broker{next(_broker_numbers)}.sock"
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    intake = Intake(control=control)
    try:
        control.bind(str(path))
        path.chmod(0o666)
        control.listen(BACKLOG)
        intake = make_intake(control, sockets)
        config = Config(
            path=config_path,
            exists=True,
            policy=policy or Policy(sockets=rules, status=status, source=config_path),
            max_connections=max_connections,
            max_connections_per_user=max_connections_per_user,
            client_timeout=client_timeout,
            idle_exit=idle_exit,
        )
        broker = Broker(intake, config, Audit(journal=False), restartable=restartable)
        served = Served(broker, str(path), sockets)
        # This process's uid is looked up now: otherwise the broker asks in a thread,
        # and wait_all_tasks_blocked() would count a handler waiting on it as settled.
        served.broker.users.store(UID, users.query(UID))

        async def serve(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                await served.broker.serve(task_status=task_status)
                served.returned = True
            finally:
                served.stopped.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            with trio.fail_after(START_TIMEOUT):  # a hang fails the test, on either clock
                yield served
            nursery.cancel_scope.cancel()
    finally:
        intake.close()
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        path.unlink(missing_ok=True)


def public_dir(public_root: Path) -> Path:
    """A fresh world-readable directory with a short path (Unix socket paths end at 107
    bytes; conftest's `workdir` is named after the test, which parametrized tests share)."""
    path = Path(tempfile.mkdtemp(prefix="t", dir=public_root))
    path.chmod(0o755)
    return path


def my_unit() -> str | None:
    """The systemd unit this process runs in, if any, as the broker finds it."""
    path = cgroup_of(os.getpid())
    return unit_from_cgroup(path) if path else None


def me() -> str:
    """How the broker describes this process (`Peer.describe`)."""
    unit = my_unit()
    return f"user {USER} (uid {UID}, pid {os.getpid()}{f', unit {unit}' if unit else ''})"


# --- the audit trail on stderr ---------------------------------------------------


def audit_fields(line: str) -> dict[str, str]:
    """The key=value fields of one audit line (values unquoted)."""
    fields = {}
    for key, raw in re.findall(r' ([a-z_]+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        # The audit's quoting is a subset of JSON's string syntax.
        fields[key] = json.loads(raw, strict=False) if raw.startswith('"') else raw
    return fields


def audit_lines(err: str, needle: str) -> list[str]:
    """The lines of `err` (what the broker wrote to stderr) that contain `needle`."""
    return [line for line in err.splitlines() if needle in line]


def send_signal_to_self(signum: signal.Signals) -> None:
    """Signal this process, as systemd would signal the broker. Only while a handler
    (trio's) is installed: the default action would end pytest."""
    assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    os.kill(os.getpid(), signum)
