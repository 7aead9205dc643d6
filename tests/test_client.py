"""The client library (broker/client.py), sync and trio, against a real broker and
against scripted peers.

The real broker is the in-process one of test_server. A scripted peer is a tiny server
in a thread of this process that accepts one connection, reads the request and sends a
crafted reply — garbage, half a line, too much, fds that do not match — so that every
way a reply can be wrong is met by the right `ClientError` and no fd left open here.
Permission errors are met by a real process of another uid.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import pytest
import trio
import trio.testing

from broker import aio, client, names
from broker.daemon.policy import Rule
from broker.errors import (
    AccessDenied,
    BrokerUnavailable,
    ClientError,
    Code,
    RequestRefused,
    UnknownSocket,
)
from broker.messages import SocketInfo
from broker.protocol import MAX_REPLY_BYTES
from tests.harness.inprocess import (
    ino,
    open_fds,
    owned,
    public_dir,
    running_broker,
    tcp_listener,
)
from tests.harness.processes import NOBODY, OPEN_FDS_SOURCE, START_TIMEOUT, as_user
from tests.harness.runtime import SYSTEM_PYTHON

PEER_TIMEOUT: Final = 10.0
"""Seconds a scripted peer waits on the client, which takes microseconds: this only
turns a hang into a failure."""
SHORT_TIMEOUT: Final = 0.2
"""The sync client's timeout against peers that never answer: any value fails the same
way; a short one keeps the test fast. (The trio client waits on the autojump clock.)"""

Variant = Literal["sync", "trio", "asyncio"]
VARIANTS: Final[list[Variant]] = ["sync", "trio", "asyncio"]
Script = Callable[[socket.socket], None]


@pytest.fixture
def rundir(public_root: Path) -> Path:
    return public_dir(public_root)


# --- calling either client --------------------------------------------------------


async def acquire_many(
    variant: Variant, names: Sequence[str], path: str | None, timeout: float = 5.0
) -> list[tuple[str, socket.socket]]:
    """`acquire_many` (in a thread), `acquire_many_trio`, or broker.aio's (an asyncio
    loop in a thread); plain sockets whichever."""
    if variant == "sync":
        return await trio.to_thread.run_sync(
            functools.partial(client.acquire_many, names, path=path, timeout=timeout)
        )
    if variant == "asyncio":
        return await trio.to_thread.run_sync(
            asyncio.run, aio.acquire_many(names, path=path, timeout=timeout)
        )
    grants = await client.acquire_many_trio(names, path=path, timeout=timeout)
    return [(name, socket.socket(fileno=sock.detach())) for name, sock in grants]


async def acquire(
    variant: Variant, name: str, path: str | None, timeout: float = 5.0
) -> socket.socket:
    if variant == "sync":
        return await trio.to_thread.run_sync(
            functools.partial(client.acquire, name, path=path, timeout=timeout)
        )
    if variant == "asyncio":
        return await trio.to_thread.run_sync(
            asyncio.run, aio.acquire(name, path=path, timeout=timeout)
        )
    sock = await client.acquire_trio(name, path=path, timeout=timeout)
    return socket.socket(fileno=sock.detach())


# --- scripted peers ---------------------------------------------------------------


def read_request(conn: socket.socket) -> bytes:
    """One request line from the client on `conn` (a scripted broker's end), newline
    included; a client that hangs up first fails the test."""
    received = b""
    while not received.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise AssertionError(f"client hung up mid-request: {received!r}")
        received += chunk
    return received


def send_fds(conn: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send `data` with `fds` attached to its first byte, as the broker does."""
    sent = conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(data):
        conn.sendall(data[sent:])


class ScriptedPeer:
    """A fake broker in a thread: accepts one client, reads its request line, then runs
    `script` on the connection and closes it.

    Attributes:
        path: Its socket.
        request: The request line it read (without the newline).
    """

    def __init__(self, path: Path, script: Script) -> None:
        self.path = str(path)
        self.script = script
        self.request = b""
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(PEER_TIMEOUT)
                self.request = read_request(conn)[:-1]
                self.script(conn)
        except BaseException as e:  # shown by __exit__, in the test
            self.error = e

    def __enter__(self) -> ScriptedPeer:
        try:
            self.listener.bind(self.path)
            self.listener.listen(1)
            self.listener.settimeout(PEER_TIMEOUT)
        except BaseException:
            self.listener.close()
            raise
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(PEER_TIMEOUT)
        self.listener.close()
        os.unlink(self.path)
        if self.thread.is_alive():
            raise AssertionError("the scripted peer did not finish")
        if self.error is not None:
            raise self.error


def replies(data: bytes) -> Script:
    """Send `data`, then hang up."""
    return lambda conn: conn.sendall(data)


def line(**body: Any) -> bytes:
    return json.dumps({"v": 1, **body}).encode() + b"\n"


def entry(name: str, sock: socket.socket) -> dict[str, str]:
    host, port = sock.getsockname()[:2]
    return {"name": name, "family": "inet", "type": "stream", "address": f"{host}:{port}"}


def granted_with(count: int, fds: int) -> Script:
    """A grant listing `count` sockets that carries `fds` fds (real listening sockets)."""

    def script(conn: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(tcp_listener()) for _ in range(max(count, fds))]
            body = line(ok=True, op="acquire", sockets=[entry("http", s) for s in socks[:count]])
            send_fds(conn, body, [s.fileno() for s in socks[:fds]])

    return script


def refusal_with_fds(conn: socket.socket) -> None:
    with tcp_listener() as one, tcp_listener() as two:
        body = line(ok=False, code="denied", message="no")
        send_fds(conn, body, [one.fileno(), two.fileno()])


def pipe_as_socket(conn: socket.socket) -> None:
    """A grant of a real socket, then a pipe where the second socket should be."""
    read_end, write_end = os.pipe()
    try:
        with tcp_listener() as real:
            body = line(
                ok=True,
                op="acquire",
                sockets=[
                    entry("http", real),
                    {"name": "http", "family": "inet", "type": "stream", "address": ":80"},
                ],
            )
            send_fds(conn, body, [real.fileno(), read_end])
    finally:
        os.close(read_end)
        os.close(write_end)


def half_with_fds(conn: socket.socket) -> None:
    with tcp_listener() as one:
        send_fds(conn, b'{"v":1,"ok":true,"op":"acq', [one.fileno()])


def floods(conn: socket.socket) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.sendall(b"x" * (MAX_REPLY_BYTES + 4096))


def never_answers(conn: socket.socket) -> None:
    conn.recv(1)  # returns once the client gives up and hangs up


@contextlib.contextmanager
def no_fd_left() -> Iterator[None]:
    """Fail if this process has other fds open afterwards than before."""
    before = open_fds()
    yield
    assert open_fds() == before


BAD_REPLIES: Final[list[tuple[str, Script, str]]] = [
    ("garbage", replies(b"garbage\n"), "invalid reply: message is not JSON"),
    ("nothing", replies(b""), "the broker closed the connection without answering"),
    ("half a line", replies(b'{"v":1,"ok":tr'), "closed the connection without answering"),
    ("too long", floods, f"message exceeds {MAX_REPLY_BYTES} bytes without ending"),
    ("v2", replies(line(v=2, ok=True)), "invalid reply: protocol version 2 is not supported"),
    ("no ok", replies(line(op="acquire")), 'invalid reply: reply has no boolean "ok"'),
    ("2 sockets 1 fd", granted_with(2, 1), "reply lists 2 sockets but carried 1 fds"),
    ("1 socket 2 fds", granted_with(1, 2), "reply lists 1 sockets but carried 2 fds"),
    ("fds, then hangs up", half_with_fds, "closed the connection without answering"),
    ("refusal with fds", refusal_with_fds, "reply lists 0 sockets but carried 2 fds"),
    ("a pipe", pipe_as_socket, "the reply carried an fd that is not a socket"),
    ("a listing", replies(line(ok=True, op="list", sockets=[])), "expected an acquire reply"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("script", "words"), [(s, w) for _, s, w in BAD_REPLIES], ids=[i for i, _, _ in BAD_REPLIES]
)
async def test_a_bad_reply_is_broker_unavailable_and_leaves_no_fd(
    rundir: Path, variant: Variant, script: Script, words: str
) -> None:
    path = rundir / "peer.sock"
    with no_fd_left():
        with ScriptedPeer(path, script) as peer, pytest.raises(BrokerUnavailable) as raised:
            await acquire_many(variant, ["http"], str(path))
        assert peer.request == b'{"v":1,"op":"acquire","names":["http"]}'
    assert raised.value.message.startswith(f"{path}: ")
    assert words in raised.value.message


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("denied", AccessDenied),
        ("unknown-socket", UnknownSocket),
        ("timeout", RequestRefused),  # busy is asked again: tests below
        ("internal", RequestRefused),
    ],
)
async def test_a_refusal_raises_its_exception_with_the_brokers_words(
    rundir: Path, variant: Variant, code: str, kind: type[RequestRefused]
) -> None:
    path = rundir / "peer.sock"
    message = f"the broker's own words for {code}"
    script = replies(line(ok=False, code=code, message=message))
    with no_fd_left(), ScriptedPeer(path, script), pytest.raises(RequestRefused) as raised:
        await acquire_many(variant, ["http"], str(path))
    assert type(raised.value) is kind
    assert (raised.value.code, raised.value.message) == (code, message)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_an_unknown_refusal_code_is_treated_as_internal(
    rundir: Path, variant: Variant
) -> None:
    path = rundir / "peer.sock"
    refusal = line(ok=False, code="moon-phase", message="the moon is full", extra=1)
    with (
        no_fd_left(),
        ScriptedPeer(path, replies(refusal)),
        pytest.raises(RequestRefused) as raised,
    ):
        await acquire_many(variant, ["http"], str(path))
    assert type(raised.value) is RequestRefused
    assert raised.value.code == Code.INTERNAL
    assert raised.value.message == "the moon is full (moon-phase)"


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_reply_split_byte_by_byte_with_fds_on_the_first_byte_is_read_whole(
    rundir: Path, variant: Variant
) -> None:
    path = rundir / "peer.sock"
    inos: list[int] = []

    def trickle(conn: socket.socket) -> None:
        with tcp_listener() as one, tcp_listener() as two:
            inos.extend([ino(one), ino(two)])
            body = line(
                ok=True, op="acquire", sockets=[entry("http", one), entry("https", two)], new=[1]
            )
            send_fds(conn, body[:1], [one.fileno(), two.fileno()])
            for byte in body[1:]:
                conn.sendall(bytes([byte]))
                time.sleep(0.0005)  # pacing only: let the client read many small pieces

    with ScriptedPeer(path, trickle):
        grants = await acquire_many(variant, ["http", "https"], str(path))
    with owned([sock for _, sock in grants]) as socks:
        assert [name for name, _ in grants] == ["http", "https"]
        assert [ino(sock) for sock in socks] == inos  # the peer's very sockets


@pytest.mark.parametrize("variant", VARIANTS)
async def test_more_fds_than_this_process_can_take_is_refused_and_closed(
    rundir: Path, variant: Variant
) -> None:
    # The kernel caps one SCM_RIGHTS message at 253 fds, and the client's ancillary
    # buffer holds 254: a peer cannot overflow it. The kernel also truncates (sets
    # MSG_CTRUNC) when the receiver has no free fd numbers left, so a child process with
    # a low RLIMIT_NOFILE meets a 10-fd reply with room for only 3.
    script = (
        """
import json, os, resource, sys
from broker import client, errors
"""
        + OPEN_FDS_SOURCE
        + """
def squeeze():
    # Room below the limit for the control socket and 3 received fds, no more.
    taken, free, limit = set(open_fds()), 0, 0
    while free < 4:
        free += limit not in taken
        limit += 1
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limits[1]))
    return limits

def report(before, message):
    print(json.dumps({"message": message, "leaked": sorted(set(open_fds()) - before)}))

path = sys.argv[1]
if sys.argv[2] == "sync":
    before, limits = set(open_fds()), squeeze()
    try:
        client.acquire_many(["http"], path=path)
    except errors.BrokerUnavailable as e:
        message = e.message
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    report(before, message)
else:
    import trio

    async def main():
        before, limits = set(open_fds()), squeeze()  # trio's own fds are open by now
        try:
            await client.acquire_many_trio(["http"], path=path)
        except errors.BrokerUnavailable as e:
            message = e.message
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        report(before, message)

    trio.run(main)
"""
    )
    path = rundir / "peer.sock"
    with no_fd_left(), ScriptedPeer(path, granted_with(10, 10)), trio.fail_after(START_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-I", "-c", script, str(path), variant],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""  # no warning about truncated ancillary data either
    result = json.loads(done.stdout)
    assert result == {
        "message": f"{path}: reply carried more fds than expected",
        "leaked": [],
    }


async def test_list_and_status_close_fds_they_did_not_ask_for(rundir: Path) -> None:
    path = rundir / "peer.sock"
    for call in (client.list_sockets, client.status):
        with (
            no_fd_left(),
            ScriptedPeer(path, granted_with(1, 1)),
            pytest.raises(BrokerUnavailable) as raised,
        ):
            await trio.to_thread.run_sync(functools.partial(call, path=str(path)))
        assert raised.value.message.startswith(f"{path}: expected a ")
        assert raised.value.message.endswith(" reply, got Granted")


async def test_list_and_status_parse_what_the_broker_says(rundir: Path) -> None:
    path = rundir / "peer.sock"
    sockets = [{"name": "http", "family": "inet6", "type": "stream", "address": "[::]:80"}]
    with ScriptedPeer(path, replies(line(ok=True, op="list", sockets=sockets))) as peer:
        listed = await trio.to_thread.run_sync(
            functools.partial(client.list_sockets, path=str(path))
        )
    assert peer.request == b'{"v":1,"op":"list"}'
    assert listed == [SocketInfo("http", "inet6", "stream", "[::]:80")]
    report = {"pid": 7, "anything": ["goes"]}
    with ScriptedPeer(path, replies(line(ok=True, op="status", status=report))) as peer:
        got = await trio.to_thread.run_sync(functools.partial(client.status, path=str(path)))
    assert peer.request == b'{"v":1,"op":"status"}'
    assert got == report
    denied = line(ok=False, code="denied", message="not you")
    with ScriptedPeer(path, replies(denied)), pytest.raises(AccessDenied, match=r"^not you$"):
        await trio.to_thread.run_sync(functools.partial(client.status, path=str(path)))


# --- reaching the broker ----------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
async def test_no_such_socket_names_the_path_and_the_variable(
    rundir: Path, variant: Variant
) -> None:
    path = rundir / "missing.sock"
    with no_fd_left(), pytest.raises(BrokerUnavailable) as raised:
        await acquire(variant, "http", str(path))
    assert raised.value.message == (
        f"{path}: no such socket: is port-broker.socket running? (set PORT_BROKER_SOCKET "
        "if the broker listens elsewhere)"
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["stale socket", "regular file"])
async def test_nothing_listening_names_the_path(rundir: Path, variant: Variant, kind: str) -> None:
    path = rundir / "stale.sock"
    if kind == "stale socket":  # a broker that died without removing its socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
            gone.bind(str(path))
    else:
        path.write_text("not a socket")
    with no_fd_left(), pytest.raises(BrokerUnavailable) as raised:
        await acquire(variant, "http", str(path))
    assert raised.value.message == (
        f"{path}: nothing is listening there: is port-broker.socket running?"
    )


@pytest.mark.needs_root
@pytest.mark.parametrize("variant", VARIANTS)
async def test_permission_denied_names_the_path(
    rundir: Path, launcher: Path, variant: Variant
) -> None:
    path = rundir / "private.sock"
    site = launcher.parent.parent / "site"
    script = f"""
import sys
sys.path.insert(0, {str(site)!r})
from broker import client, errors
try:
    if sys.argv[2] == "sync":
        client.acquire("http", path=sys.argv[1])
    else:
        import trio
        trio.run(lambda: client.acquire_trio("http", path=sys.argv[1]))
except errors.BrokerUnavailable as e:
    print(e.message)
"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as private:
        private.bind(str(path))
        private.listen(1)
        path.chmod(0o600)  # root's alone
        with trio.fail_after(START_TIMEOUT):
            done = await trio.run_process(
                [*as_user(NOBODY), SYSTEM_PYTHON, "-I", "-c", script, str(path), variant],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == (
        f"{path}: permission denied: the socket or a directory above it is not "
        "accessible to this user\n"
    )


async def test_a_peer_that_never_answers_times_out_sync(rundir: Path) -> None:
    path = rundir / "peer.sock"
    with no_fd_left(), ScriptedPeer(path, never_answers), pytest.raises(BrokerUnavailable) as e:
        await acquire("sync", "http", str(path), timeout=SHORT_TIMEOUT)
    assert e.value.message == f"{path}: the broker did not answer within {SHORT_TIMEOUT:g} s"


def trickles(conn: socket.socket) -> None:
    """A valid reply, one byte at a time, each well within the client's timeout."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
        for byte in line(ok=False, code="denied", message="no"):
            conn.send(bytes([byte]))
            time.sleep(SHORT_TIMEOUT / 4)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_the_timeout_bounds_the_whole_exchange_not_each_read(
    rundir: Path, variant: Variant
) -> None:
    path = rundir / "peer.sock"
    with no_fd_left(), ScriptedPeer(path, trickles), pytest.raises(BrokerUnavailable) as e:
        await acquire(variant, "http", str(path), timeout=SHORT_TIMEOUT)
    assert e.value.message == f"{path}: the broker did not answer within {SHORT_TIMEOUT:g} s"


async def test_a_peer_that_never_answers_times_out_trio(
    rundir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = rundir / "peer.sock"
    start = trio.current_time()
    with no_fd_left(), ScriptedPeer(path, never_answers), pytest.raises(BrokerUnavailable) as e:
        await acquire("trio", "http", str(path))
    assert trio.current_time() - start == pytest.approx(client.DEFAULT_TIMEOUT)
    assert e.value.message == f"{path}: the broker did not answer within 5 s"


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_full_connection_queue_is_waited_out_until_the_deadline(
    rundir: Path, variant: Variant
) -> None:
    # A broker that accepts nothing: its queue (backlog 0: one connection) is full.
    path = rundir / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(str(path))
        stuck.listen(0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(str(path))
            start = time.monotonic()
            with no_fd_left(), pytest.raises(BrokerUnavailable) as raised:
                await acquire(variant, "http", str(path), timeout=SHORT_TIMEOUT)
            waited = time.monotonic() - start
    assert waited >= SHORT_TIMEOUT * 0.9  # not refused at once: waited for room
    assert raised.value.message == (
        f"{path}: the broker's connection queue stayed full for {SHORT_TIMEOUT:g} s: it is "
        "overloaded or stuck; retry shortly"
    )


QUEUE_FULL_FOR: Final = 0.3
"""Seconds the scripted broker below keeps its queue full before it makes room."""


@contextlib.contextmanager
def full_queue_then_served(path: Path) -> Iterator[threading.Thread]:
    """A broker at `path` whose queue (backlog 0) is full; QUEUE_FULL_FOR seconds after
    the thread yielded is started, it makes room for one connection and grants it one
    socket. The caller starts the thread, and joins it inside any fd count (the thread's
    sockets are this process's)."""
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first,
    ):
        listener.bind(str(path))
        listener.listen(0)
        first.connect(str(path))  # the queue is full
        listener.settimeout(PEER_TIMEOUT)

        def broker() -> None:
            time.sleep(QUEUE_FULL_FOR)
            listener.accept()[0].close()  # room for one more
            conn, _ = listener.accept()  # the client that waited
            with conn:
                conn.settimeout(PEER_TIMEOUT)
                read_request(conn)
                granted_with(1, 1)(conn)

        yield threading.Thread(target=broker, daemon=True)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_client_waits_for_room_in_a_full_queue_and_is_served(
    rundir: Path, variant: Variant
) -> None:
    with full_queue_then_served(rundir / "busy.sock") as thread:
        start = time.monotonic()  # before the broker's wait begins
        thread.start()
        with no_fd_left():  # the broker's thread, in this process, is done by then too
            sock = await acquire(variant, "http", str(rundir / "busy.sock"), START_TIMEOUT)
            sock.close()
            thread.join(PEER_TIMEOUT)
    assert time.monotonic() - start >= QUEUE_FULL_FOR


BUSY: Final = line(ok=False, code="busy", message="the broker is serving its limit; retry shortly")
"""The broker's `busy` refusal."""


@pytest.mark.parametrize("variant", VARIANTS)
async def test_busy_is_asked_again_within_the_deadline(rundir: Path, variant: Variant) -> None:
    path = rundir / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        listener.settimeout(PEER_TIMEOUT)
        requests = []

        def broker() -> None:
            for answer in (replies(BUSY), replies(BUSY), granted_with(1, 1)):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(PEER_TIMEOUT)
                    requests.append(read_request(conn))
                    answer(conn)

        thread = threading.Thread(target=broker, daemon=True)
        thread.start()
        with no_fd_left():  # the broker's thread, in this process, is done by then too
            sock = await acquire(variant, "http", str(path), timeout=START_TIMEOUT)
            sock.close()
            thread.join(PEER_TIMEOUT)
    assert len(requests) == 3  # busy, busy, then served


@pytest.mark.parametrize("variant", VARIANTS)
async def test_busy_past_the_deadline_is_the_busy_refusal(rundir: Path, variant: Variant) -> None:
    path = rundir / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(64)
        stop = threading.Event()

        def broker() -> None:
            listener.settimeout(0.05)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.sendall(BUSY)  # a client past its deadline has hung up

        thread = threading.Thread(target=broker, daemon=True)
        thread.start()
        with no_fd_left():  # the broker's thread, in this process, is done by then too
            try:
                with pytest.raises(RequestRefused) as raised:
                    await acquire(variant, "http", str(path), timeout=0.3)
            finally:
                stop.set()
                thread.join(PEER_TIMEOUT)
    assert raised.value.code == "busy"


@pytest.mark.parametrize("variant", VARIANTS)
async def test_busy_then_no_answer_by_the_deadline_is_the_busy_refusal(
    rundir: Path, variant: Variant
) -> None:
    # The deadline may leave the attempt after a busy refusal too little time for the
    # broker's answer (a millisecond, on a busy machine): the broker did answer, busy.
    # Here it answers busy once, then never again.
    path = rundir / "slow.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        listener.settimeout(PEER_TIMEOUT)

        asked = 0

        def broker() -> None:
            nonlocal asked
            for answer in (replies(BUSY), never_answers):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(PEER_TIMEOUT)
                    read_request(conn)
                    asked += 1
                    answer(conn)

        thread = threading.Thread(target=broker, daemon=True)
        thread.start()
        with no_fd_left():  # the broker's thread, in this process, is done by then too
            with pytest.raises(RequestRefused) as raised:
                await acquire(variant, "http", str(path), timeout=SHORT_TIMEOUT)
            thread.join(PEER_TIMEOUT)
    assert raised.value.code == "busy"
    assert asked == 2  # it did ask again
    assert not thread.is_alive()


def test_a_signal_while_waiting_for_room_does_not_end_the_wait(rundir: Path) -> None:
    # SO_SNDTIMEO makes a blocking connect() return EINTR on a signal, which CPython
    # took for a completed connect: the client must notice and wait on. The signals are
    # SIGUSR1 to this thread every 50 ms (SIGALRM is the per-test time limit's).
    ticks = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: ticks.append(1))
    stop = threading.Event()
    waiting = threading.get_ident()

    def tick() -> None:
        while not stop.wait(0.05):
            signal.pthread_kill(waiting, signal.SIGUSR1)

    ticker = threading.Thread(target=tick, daemon=True)
    with full_queue_then_served(rundir / "busy.sock") as thread:
        thread.start()
        ticker.start()
        try:
            client.acquire("http", path=str(rundir / "busy.sock"), timeout=START_TIMEOUT).close()
        finally:
            stop.set()
            ticker.join(PEER_TIMEOUT)
            signal.signal(signal.SIGUSR1, previous)
            thread.join(PEER_TIMEOUT)
    assert ticks  # signals did arrive during the wait


# --- against the real broker ------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
async def test_acquire_returns_the_brokers_listening_socket(rundir: Path, variant: Variant) -> None:
    async with running_broker(rundir) as served:
        with await acquire(variant, "http", served.path) as sock:
            assert ino(sock) == ino(served.held["http"][0])
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert not sock.get_inheritable()  # close-on-exec until exec_with places it
        grants = await acquire_many(variant, ["dns", "dual", "http"], served.path)
        with owned([sock for _, sock in grants]) as socks:
            assert [name for name, _ in grants] == ["dns", "dual", "dual", "http"]
            assert [ino(s) for s in socks] == served.inos("dns", "dual", "http")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_refusals_from_the_broker(rundir: Path, variant: Variant) -> None:
    async with running_broker(rundir) as served:
        with no_fd_left():
            with pytest.raises(AccessDenied) as denied:
                await acquire_many(variant, ["http", "secret"], served.path)
            assert denied.value.code == Code.DENIED
            assert "may not acquire socket 'secret'" in denied.value.message
            with pytest.raises(UnknownSocket) as unknown:
                await acquire(variant, "nope", served.path)
            assert unknown.value.message == (
                "no socket named 'nope' (you may acquire: dns, dual, http)"
            )
            with pytest.raises(RequestRefused) as malformed:
                await acquire(variant, "not a name", served.path)
            assert malformed.value.code == Code.MALFORMED
            await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("variant", VARIANTS)
async def test_acquire_of_a_name_held_twice_raises_and_closes_both(
    rundir: Path, variant: Variant
) -> None:
    async with running_broker(rundir) as served:
        with no_fd_left():
            with pytest.raises(ClientError) as raised:
                await acquire(variant, "dual", served.path)
            await trio.testing.wait_all_tasks_blocked()
    assert type(raised.value) is ClientError
    assert raised.value.message == (
        "socket 'dual' is held as 2 sockets (e.g. IPv4 and IPv6); use acquire_many() to "
        "receive all of them"
    )


async def test_the_trio_variants_return_trio_sockets_that_accept(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        with await client.acquire_trio("http", path=served.path) as sock:
            assert isinstance(sock, trio.socket.SocketType)
            with trio.socket.socket() as outside:
                await outside.connect(sock.getsockname())
                conn, address = await sock.accept()
                with conn:
                    assert address == outside.getsockname()
        grants = await client.acquire_many_trio(["dual"], path=served.path)
        with owned([sock for _, sock in grants]) as socks:
            assert all(isinstance(s, trio.socket.SocketType) for s in socks)
            assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]


async def test_list_sockets_and_status_from_the_broker(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        listed = await trio.to_thread.run_sync(
            functools.partial(client.list_sockets, path=served.path)
        )
        assert [(s.name, s.family, s.type) for s in listed] == [
            ("http", "inet", "stream"),
            ("dual", "inet", "stream"),
            ("dual", "inet6", "stream"),
            ("dns", "inet", "datagram"),
        ]
        report = await trio.to_thread.run_sync(functools.partial(client.status, path=served.path))
        assert report["pid"] == os.getpid()
        assert report["connections"]["total"] == 2
    async with running_broker(rundir, status=Rule(uids=frozenset({NOBODY}))) as served:
        with pytest.raises(AccessDenied, match="may not read the broker's status"):
            await trio.to_thread.run_sync(functools.partial(client.status, path=served.path))


async def test_busy_is_a_request_refused(
    rundir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # On trio's clock the broker's every answer comes at once: on the real one a busy
    # machine can starve the last attempt, which the deadline may leave a millisecond.
    async with running_broker(rundir, max_connections=1, client_timeout=600.0) as served:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(served.path)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RequestRefused) as raised:
                await client.acquire_trio("http", path=served.path, timeout=0.5)
            assert served.broker.ledger.refusals["busy"] > 1  # asked again meanwhile
    assert type(raised.value) is RequestRefused
    assert raised.value.code == Code.BUSY


async def test_the_path_argument_then_the_environment_then_the_default(
    rundir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(rundir / "missing.sock")
    monkeypatch.delenv("PORT_BROKER_SOCKET", raising=False)
    assert client.socket_path() == names.DEFAULT_SOCKET == "/run/port-broker.sock"
    monkeypatch.setenv("PORT_BROKER_SOCKET", "")
    assert client.socket_path() == "/run/port-broker.sock"
    async with running_broker(rundir) as served:
        monkeypatch.setenv("PORT_BROKER_SOCKET", served.path)
        assert client.socket_path() == served.path
        (await client.acquire_trio("http")).close()
        await trio.to_thread.run_sync(lambda: client.acquire("http").close())
        assert len(await trio.to_thread.run_sync(client.list_sockets)) == 4

        # The argument wins over the environment, both ways.
        with pytest.raises(BrokerUnavailable, match=f"^{missing}: no such socket"):
            await client.acquire_trio("http", path=missing)
        monkeypatch.setenv("PORT_BROKER_SOCKET", missing)
        assert client.socket_path(served.path) == served.path
        (await client.acquire_trio("http", path=served.path)).close()
        with pytest.raises(BrokerUnavailable, match=f"^{missing}: no such socket"):
            await trio.to_thread.run_sync(client.list_sockets)


def test_the_client_imports_only_the_standard_library() -> None:
    # A worker's start-up path: no trio, no pydantic, no systemd until asked for.
    code = (
        "import sys, broker.client, broker.launcher, broker.aio;"
        "print(sorted(m for m in ('trio', 'pydantic', 'systemd') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=START_TIMEOUT,
    )
    assert done.stdout == "[]\n"


@pytest.mark.parametrize("timeout", [0.0, -1.0, 1.1e9, 1e19, float("inf"), float("nan")])
def test_a_timeout_must_be_above_zero_and_at_most_a_billion_seconds(timeout: float) -> None:
    with pytest.raises(
        ValueError, match="timeout must be a number of seconds above 0 and at most 1e"
    ):
        client.acquire("http", path="/nonexistent", timeout=timeout)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_the_longest_timeout_is_taken(rundir: Path, variant: Variant) -> None:
    async with running_broker(rundir) as served:
        with await acquire(variant, "http", served.path, timeout=names.MOST_SECONDS) as sock:
            assert ino(sock) == ino(served.held["http"][0])
