"""The broker's trio loops (broker/daemon/driver.py), run in this process on real sockets.

A real `Broker` serves a real listening AF_UNIX control socket and holds real TCP
(IPv4 and IPv6) and UDP sockets on loopback; clients are raw trio sockets, the library
client (trio, or sync in a thread), or real processes of another uid. Deadlines run on
trio's MockClock with autojump where a test waits for one, so a 5 s timeout costs
nothing. Because the broker runs in this process, /proc/self/fd counts its fds too.

What a connection answers is tested without I/O (tests/test_connection.py), and so is
what the ledger counts and logs (tests/test_ledger.py): here, what goes on the wire.

The in-process broker (`running_broker`) and the fd helpers are the harness's
(tests/harness/inprocess.py), shared with test_client, test_launcher and test_cli.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import grp
import json
import os
import re
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing

from broker import __version__, client, status
from broker.daemon import connection, loader, users
from broker.daemon.admission import Admission, Limits
from broker.daemon.audit import Audit
from broker.daemon.connection import MAX_REQUESTS_PER_CONNECTION
from broker.daemon.driver import Broker
from broker.daemon.identity import Peer
from broker.daemon.ledger import REFUSAL_LOG_BURST
from broker.daemon.lifecycle import (
    IDLE_CHECK,
    IDLE_FLOOR,
    IDLE_OFF_CHECK,
    SHUTDOWN_GRACE,
    until_idle,
)
from broker.daemon.policy import Decision, Policy, Rule
from broker.daemon.sdnotify import STATUS_INTERVAL
from broker.errors import AccessDenied, RequestRefused
from broker.protocol import MAX_REQUEST_BYTES, SCM_MAX_FD
from tests.harness.inprocess import (
    ANCILLARY,
    CLIENT_TIMEOUT,
    CONFIG_PATH,
    DEFAULT_RULES,
    GID,
    LIST,
    LONG_TIMEOUT,
    ME,
    MINE,
    STATUS,
    UID,
    USER,
    Wire,
    acquire_line,
    audit_fields,
    audit_lines,
    fds_from,
    ino,
    me,
    open_fds,
    owned,
    running_broker,
    send_signal_to_self,
    settled_fds,
    udp_socket,
)
from tests.harness.processes import NOBODY, START_TIMEOUT, as_user
from tests.harness.runtime import SYSTEM_PYTHON

# --- grants -----------------------------------------------------------------------


async def test_a_grant_passes_the_very_same_listening_socket(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        sock = await trio.to_thread.run_sync(
            functools.partial(client.acquire, "http", path=served.path)
        )
        with sock:
            held = served.held["http"][0]
            assert sock.fileno() != held.fileno()
            assert sock.getsockname() == held.getsockname()
            assert ino(sock) == ino(held)  # one socket, two fds
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1

            # A connection to that port is accepted on the received fd: the kernel
            # carries it, the broker sees nothing of it.
            with socket.create_connection(held.getsockname(), timeout=START_TIMEOUT) as outside:
                sock.settimeout(START_TIMEOUT)
                conn, address = sock.accept()
                with conn:
                    assert address == outside.getsockname()
                    outside.sendall(b"ping")
                    assert conn.recv(4) == b"ping"


async def test_two_names_arrive_in_order_as_one_scm_rights_on_the_first_byte(
    rundir: Path,
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        await wire.send(acquire_line("dual", "http"))
        first, ancdata, _, _ = await wire.sock.recvmsg(1, ANCILLARY)
        with owned([socket.socket(fileno=fd) for fd in fds_from(ancdata)]) as fds:
            assert first == b"{"
            assert [ino(s) for s in fds] == served.inos("dual", "http")
        wire.pending = first
        reply, more = await wire.reply()
        with owned(more):
            assert more == []  # no second SCM_RIGHTS message
        dual4, dual6, http = (s.getsockname() for s in served.held["dual"] + served.held["http"])
        assert reply == {
            "v": 1,
            "ok": True,
            "op": "acquire",
            "sockets": [
                {
                    "name": "dual",
                    "family": "inet",
                    "type": "stream",
                    "address": f"127.0.0.1:{dual4[1]}",
                },
                {
                    "name": "dual",
                    "family": "inet6",
                    "type": "stream",
                    "address": f"[::1]:{dual6[1]}",
                },
                {
                    "name": "http",
                    "family": "inet",
                    "type": "stream",
                    "address": f"127.0.0.1:{http[1]}",
                },
            ],
        }


async def test_acquire_many_gives_stream_and_datagram_sockets_in_request_order(
    rundir: Path,
) -> None:
    async with running_broker(rundir) as served:
        grants = await client.acquire_many_trio(["dns", "http"], path=served.path)
        names = [name for name, _ in grants]
        socks = [socket.socket(fileno=sock.detach()) for _, sock in grants]
        with owned(socks):
            assert names == ["dns", "http"]
            assert [ino(s) for s in socks] == served.inos("dns", "http")
            assert [s.type for s in socks] == [socket.SOCK_DGRAM, socket.SOCK_STREAM]
            # The datagram socket receives what is sent to the held port.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"query", served.held["dns"][0].getsockname())
            socks[0].settimeout(START_TIMEOUT)
            assert socks[0].recvfrom(16)[0] == b"query"


async def test_a_name_held_as_ipv4_and_ipv6_gives_both(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        grants = await trio.to_thread.run_sync(
            functools.partial(client.acquire_many, ["dual"], path=served.path)
        )
        with owned([sock for _, sock in grants]) as socks:
            assert [name for name, _ in grants] == ["dual", "dual"]
            assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]
            assert [ino(s) for s in socks] == served.inos("dual")
            for sock in socks:  # each accepts on its own address
                sock.settimeout(START_TIMEOUT)
                with socket.create_connection(sock.getsockname()[:2], timeout=START_TIMEOUT):
                    conn, _ = sock.accept()
                    conn.close()


@pytest.mark.parametrize(
    ("names", "code"),
    [
        (("http", "secret"), "denied"),
        (("secret", "http"), "denied"),
        (("dual", "norule"), "denied"),
        (("http", "dual", "nope"), "unknown-socket"),
    ],
)
async def test_all_or_none_a_refused_name_means_no_fd_at_all(
    rundir: Path, names: tuple[str, ...], code: str
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        before = await settled_fds()
        await wire.send(acquire_line(*names))
        reply = await wire.plain_reply()
        assert (reply["ok"], reply["code"]) == (False, code)
        assert await settled_fds() == before
        assert served.broker.ledger.grants.total() == 0
        # Nothing was granted, so nothing is reported as granted.
        report = (await wire.request(STATUS))["status"]
        assert report["grants"] == 0
        assert [event["decision"] for event in report["recent"]] == ["deny"]


# --- refusals on the wire ---------------------------------------------------------

PADDED_LIST: Final = b'{"v":1,"op":"list"' + b" " * (MAX_REQUEST_BYTES - 20) + b"}\n"


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [  # every code and message: tests/test_connection.py; here, what goes on the wire
        (b"not json\n", "malformed", "message is not JSON"),
        (b"x" * 5000 + b"\n", "too-large", f"exceeds {MAX_REQUEST_BYTES} bytes"),
    ],
)
async def test_a_protocol_error_is_refused_with_its_code_then_the_connection_closes(
    rundir: Path, capsys: pytest.CaptureFixture[str], payload: bytes, code: str, words: str
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        # A valid request queued behind the bad one is never answered.
        await wire.send(payload + LIST)
        reply = await wire.last_reply()
        assert (reply["v"], reply["ok"], reply["code"]) == (1, False, code)
        assert words in reply["message"]
        assert served.broker.ledger.refusals == {code: 1}
        (line,) = audit_lines(capsys.readouterr().err, f"refused {me()}")
        fields = audit_fields(line)
        assert (fields["refusal_code"], fields["peer_uid"]) == (code, str(UID))
        assert fields["peer_pid"] == str(os.getpid())


async def test_a_request_of_exactly_the_size_limit_is_served(rundir: Path) -> None:
    assert len(PADDED_LIST) == MAX_REQUEST_BYTES
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        assert (await wire.request(PADDED_LIST))["op"] == "list"
        assert (await wire.request(LIST))["op"] == "list"


async def test_busy_when_max_connections_clients_are_connected(rundir: Path) -> None:
    async with running_broker(rundir, max_connections=2, client_timeout=LONG_TIMEOUT) as served:
        first = await Wire.open(served.path)
        second = await Wire.open(served.path)
        async with first, second:
            await trio.testing.wait_all_tasks_blocked()
            assert served.broker.admission.active == 2
            async with await Wire.open(served.path) as third:
                # The broker answers "busy" and closes at once, without reading: the
                # request may find the connection closed already.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    await third.send(LIST)
                assert await third.last_reply() == {
                    "v": 1,
                    "ok": False,
                    "code": "busy",
                    "message": "the broker is serving its limit of 2 connections; retry shortly",
                }
            # The two connected clients are served as usual meanwhile.
            assert (await first.request(LIST))["ok"] is True
        await trio.testing.wait_all_tasks_blocked()
        assert served.broker.admission.active == 0
        # With room again, the next client is served.
        with await client.acquire_trio("http", path=served.path):
            pass
        assert served.broker.ledger.refusals == {"busy": 1}
        assert served.broker.admission.connections == 4


async def test_a_silent_client_is_refused_with_timeout_after_client_timeout(
    rundir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        start = trio.current_time()
        reply = await wire.last_reply()
        assert trio.current_time() - start == pytest.approx(CLIENT_TIMEOUT)
        assert reply == {
            "v": 1,
            "ok": False,
            "code": "timeout",
            "message": "no complete request within 5 seconds",
        }
        assert served.broker.ledger.refusals == {"timeout": 1}


async def test_the_deadline_is_per_request_and_counts_a_half_sent_request(
    rundir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running_broker(rundir, client_timeout=2.5) as served,
        await Wire.open(served.path) as wire,
    ):
        # Slow, but every request complete within 2.5 s: all served.
        for _ in range(3):
            await trio.sleep(2.4)
            assert (await wire.request(LIST))["ok"] is True
        for byte in LIST[:-1]:  # 19 bytes 0.1 s apart: 1.9 s in all
            await wire.send(bytes([byte]))
            await trio.sleep(0.1)
        assert (await wire.request(b"\n"))["ok"] is True
        # Half a request, then silence: refused 2.5 s after the last reply.
        start = trio.current_time()
        await wire.send(LIST[:10])
        reply, _ = await wire.reply()
        assert trio.current_time() - start == pytest.approx(2.5)
        assert reply["code"] == "timeout"
        assert reply["message"] == "no complete request within 2.5 seconds"
        assert await wire.rest() == b""


async def test_a_request_trickling_in_past_its_deadline_is_refused_at_the_deadline(
    rundir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A byte a second, for ever (slowloris): each byte must not buy more time.
    async with (
        running_broker(rundir, client_timeout=2.5) as served,
        await Wire.open(served.path) as wire,
    ):
        start = trio.current_time()

        async def trickle() -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for byte in LIST[:-1]:
                    await wire.send(bytes([byte]))
                    await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            reply, _ = await wire.reply()
            assert trio.current_time() - start == pytest.approx(2.5)
            nursery.cancel_scope.cancel()
        assert reply["code"] == "timeout"
        assert served.broker.ledger.refusals == {"timeout": 1}


async def test_silent_half_sent_garbage_and_vanishing_clients_do_not_stop_a_legitimate_one(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_broker(rundir, client_timeout=LONG_TIMEOUT) as served:
        baseline = await settled_fds()
        bad = []
        for payload in (b"", b'{"v":1,"op":"acq', b"\x00garbage\n", acquire_line("http")):
            # Plain blocking sockets: connect and send complete without the broker
            # running, so the vanishing one is gone before the broker reads it.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(served.path)
            sock.sendall(payload)
            bad.append(sock)
        bad.pop().close()  # the vanishing one: its request is answered to nobody

        sock = await trio.to_thread.run_sync(
            functools.partial(client.acquire, "http", path=served.path, timeout=START_TIMEOUT)
        )
        sock.close()
        await trio.testing.wait_all_tasks_blocked()
        assert served.broker.admission.active == 2  # the silent and the half-sent one wait
        err = capsys.readouterr().err
        assert len(audit_lines(err, "granted socket 'http'")) == 1  # only the legitimate one
        (dropped,) = audit_lines(err, f"dropped {me()}: Broken pipe ")
        assert audit_fields(dropped)["peer_pid"] == str(os.getpid())
        for sock in bad:
            sock.close()
        assert await settled_fds() == baseline
        assert served.broker.admission.active == 0
        assert served.broker.ledger.grants == {"http": 1}


async def test_fds_sent_to_the_broker_are_not_kept(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        baseline = await settled_fds()
        pipes = [os.pipe() for _ in range(8)]
        try:
            async with await Wire.open(served.path) as wire:
                # With a valid request, with a refused one, and with half a request.
                await wire.send(LIST, fds=[w for _, w in pipes[:3]])
                assert (await wire.reply())[0]["ok"] is True
                await wire.send(acquire_line("nope"), fds=[w for _, w in pipes[3:5]])
                assert (await wire.reply())[0]["code"] == "unknown-socket"
                await wire.send(b'{"v":1,', fds=[w for _, w in pipes[5:]])
                await trio.testing.wait_all_tasks_blocked()  # the broker has read it
            for _, write_end in pipes:
                os.close(write_end)
            # Every write end is closed everywhere: each pipe reads as ended.
            for read_end, _ in pipes:
                os.set_blocking(read_end, False)
                assert os.read(read_end, 1) == b""
        finally:
            for read_end, _ in pipes:
                os.close(read_end)
        assert await settled_fds() == baseline


async def test_many_grants_leak_no_fd(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        baseline = await settled_fds()
        for _ in range(300):
            (await client.acquire_trio("http", path=served.path)).close()
        for _ in range(20):
            grants = await trio.to_thread.run_sync(
                functools.partial(client.acquire_many, ["dual", "dns"], path=served.path)
            )
            for _, sock in grants:
                sock.close()
        assert await settled_fds() == baseline
        assert served.broker.ledger.grants == {"http": 300, "dual": 20, "dns": 20}
        assert served.broker.admission.active == 0


async def test_several_requests_on_one_connection_are_answered_in_order(
    rundir: Path,
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        assert (await wire.request(LIST))["op"] == "list"
        await wire.send(acquire_line("http"))
        _, fds = await wire.reply()
        with owned(fds):
            assert [ino(s) for s in fds] == served.inos("http")
        assert (await wire.request(STATUS))["status"]["grants"] == 1
        await wire.send(acquire_line("dual"))
        _, fds = await wire.reply()
        with owned(fds):
            assert [ino(s) for s in fds] == served.inos("dual")
        # Pipelined: the rest of the connection's MAX_REQUESTS_PER_CONNECTION requests in
        # one write (beyond one recv), then one too many: answered up to the cap, then
        # the broker hangs up.
        rest = MAX_REQUESTS_PER_CONNECTION - 4
        await wire.send(LIST * (rest // 2) + STATUS * (rest - rest // 2) + LIST)
        ops = [(await wire.request(b""))["op"] for _ in range(rest)]
        assert ops == ["list"] * (rest // 2) + ["status"] * (rest - rest // 2)
        assert await wire.rest() == b""
        assert served.broker.admission.connections == 1


async def test_list_shows_only_what_the_caller_may_acquire(rundir: Path) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        reply = await wire.request(LIST)

        def entry(name: str, index: int = 0) -> dict[str, str]:
            sock = served.held[name][index]
            host, port = sock.getsockname()[:2]
            family = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}[sock.family]
            address = f"[{host}]:{port}" if family == "inet6" else f"{host}:{port}"
            kind = "stream" if sock.type == socket.SOCK_STREAM else "datagram"
            return {"name": name, "family": family, "type": kind, "address": address}

        assert reply == {
            "v": 1,
            "ok": True,
            "op": "list",
            "sockets": [entry("http"), entry("dual"), entry("dual", 1), entry("dns")],
        }
        listed = await trio.to_thread.run_sync(
            functools.partial(client.list_sockets, path=served.path)
        )
        assert [s.to_json() for s in listed] == reply["sockets"]


async def test_status_reports_what_was_held_granted_denied_and_refused(rundir: Path) -> None:
    async with running_broker(rundir, max_connections=7) as served:
        for name in ("http", "http", "dual"):
            with owned([s for _, s in await client.acquire_many_trio([name], path=served.path)]):
                pass
        with pytest.raises(AccessDenied):
            await client.acquire_trio("secret", path=served.path)
        with pytest.raises(AccessDenied):
            await client.acquire_trio("norule", path=served.path)
        with pytest.raises(RequestRefused):
            await client.acquire_trio("nope", path=served.path)
        async with await Wire.open(served.path) as wire:
            await wire.request(b"nonsense\n")
        async with await Wire.open(served.path) as wire:
            report = (await wire.request(STATUS))["status"]
            assert served.broker.report()["connections"]["active"] == 1

    pid = os.getpid()
    assert report["version"] == __version__
    assert report["pid"] == pid
    assert report["config"] == CONFIG_PATH
    assert report["uptime"] >= 0
    assert report["connections"] == {"active": 1, "total": 8, "limit": 7}
    assert (report["grants"], report["denials"]) == (3, 2)
    assert report["refusals"] == {"denied": 2, "unknown-socket": 1, "malformed": 1}
    counts = [(s["name"], s["family"], s["grants"], s["denials"]) for s in report["sockets"]]
    assert counts == [
        ("http", "inet", 2, 0),
        ("dual", "inet", 1, 0),
        ("dual", "inet6", 1, 0),
        ("dns", "inet", 0, 0),
        ("secret", "inet", 0, 1),
        ("norule", "inet", 0, 1),
    ]
    events = [(e["decision"], e["socket"]) for e in report["recent"]]
    assert events == [
        ("grant", "http"),
        ("grant", "http"),
        ("grant", "dual"),
        ("deny", "secret"),
        ("deny", "norule"),
        ("deny", "nope"),
    ]
    first = report["recent"][0]
    assert {k: first[k] for k in ("uid", "user", "pid", "reason")} == {
        "uid": 0,
        "user": USER,
        "pid": pid,
        "reason": f"uid {UID} is in users",
    }
    assert report["recent"][-1]["reason"].startswith("no socket named 'nope'")
    assert all(isinstance(e["time"], float) for e in report["recent"])


async def test_audit_lines_for_grant_and_denial_carry_the_structured_fields(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_broker(rundir) as served:
        (await client.acquire_trio("http", path=served.path)).close()
        with pytest.raises(AccessDenied):
            await client.acquire_trio("secret", path=served.path)
        with pytest.raises(RequestRefused):
            await client.acquire_trio("nope", path=served.path)
    err = capsys.readouterr().err
    pid = os.getpid()
    who = me()
    (grant,) = audit_lines(err, "granted socket")
    assert grant.startswith(f"port-broker: info: granted socket 'http' to {who} ")
    fields = audit_fields(grant)
    assert "message_id" not in fields  # a journal field only
    assert {k: fields[k] for k in ("decision", "socket", "peer_uid", "peer_gid", "peer_pid")} == {
        "decision": "grant",
        "socket": "http",
        "peer_uid": str(UID),
        "peer_gid": str(GID),
        "peer_pid": str(pid),
    }
    assert (fields["peer_user"], fields["reason"]) == (USER, f"uid {UID} is in users")
    assert "refusal_code" not in fields
    denied, unknown = audit_lines(err, "denied socket")
    assert denied.startswith(f"port-broker: notice: denied socket 'secret' to {who} ")
    fields = audit_fields(denied)
    assert (fields["decision"], fields["socket"], fields["refusal_code"]) == (
        "deny",
        "secret",
        "denied",
    )
    assert fields["reason"].startswith(f"{who} may not acquire socket 'secret'")
    assert audit_fields(unknown)["refusal_code"] == "unknown-socket"
    assert audit_fields(unknown)["reason"] == (f"no socket named 'nope' (you may acquire: {MINE})")


async def test_a_client_that_stops_reading_is_dropped_without_affecting_others(
    rundir: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lift the per-connection request cap, which would end this client first.
    monkeypatch.setattr(connection, "MAX_REQUESTS_PER_CONNECTION", 10**6)
    async with running_broker(rundir) as served, await Wire.open(served.path) as slow:

        async def flood() -> None:
            # Far more requests than the socket buffers hold replies for: it sends
            # until the broker hangs up on it, and reads nothing.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await slow.send(LIST * 20000)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            assert served.broker.admission.active == 1  # stuck writing replies nobody reads

            # Others are served meanwhile, at once.
            sock = await client.acquire_trio("http", path=served.path)
            sock.close()
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() == start
            assert served.broker.admission.active == 1
        # flood() has ended: the broker hung up on the slow client at its deadline.
        assert trio.current_time() - start == pytest.approx(CLIENT_TIMEOUT)
        replies = (await slow.rest()).count(b"\n")
        assert 0 < replies < 20000
        await trio.testing.wait_all_tasks_blocked()
        assert served.broker.admission.active == 0
        assert served.broker.ledger.grants == {"http": 1}


async def test_more_fds_than_one_message_can_carry_are_refused_not_sent(rundir: Path) -> None:
    many = [udp_socket() for _ in range(SCM_MAX_FD + 1)]
    held = {"most": many[:SCM_MAX_FD], "one": many[SCM_MAX_FD:]}
    rules = {"most": ME, "one": ME}
    async with running_broker(rundir, held=held, rules=rules) as served:
        grants = await client.acquire_many_trio(["most"], path=served.path)
        socks = [socket.socket(fileno=sock.detach()) for _, sock in grants]
        with owned(socks):
            assert [ino(s) for s in socks] == served.inos("most")
        # One name too many would pass SCM_MAX_FD + 1: refused, nothing sent
        # (tests/test_connection.py has the rule), and the connection serves on.
        async with await Wire.open(served.path) as wire:
            assert (await wire.request(acquire_line("most", "one")))["code"] == "too-large"
            assert (await wire.request(LIST))["ok"] is True


class ExplodingPolicy(Policy):
    """A policy with a bug: asking about 'http' raises."""

    def check_acquire(self, name: str, peer: Peer) -> Decision:
        if name == "http":
            raise RuntimeError("the policy exploded")
        return super().check_acquire(name, peer)


async def test_an_internal_error_is_refused_as_internal_and_the_connection_stays_open(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = ExplodingPolicy(sockets=DEFAULT_RULES, status=ME, source=CONFIG_PATH)
    async with (
        running_broker(rundir, policy=policy) as served,
        await Wire.open(served.path) as wire,
    ):
        reply = await wire.request(acquire_line("dual", "http"))
        assert reply["code"] == "internal"
        assert "RuntimeError" not in reply["message"]  # details go to the log only
        await wire.send(acquire_line("dual"))
        granted, fds = await wire.reply()
        with owned(fds):
            assert len(fds) == 2
        assert granted["ok"] is True
        await trio.testing.wait_all_tasks_blocked()  # grants are counted once sent
        assert served.broker.ledger.refusals == {"internal": 1}
        assert served.broker.ledger.grants == {"dual": 1}
    (line,) = audit_lines(capsys.readouterr().err, "port-broker: error:")
    assert line.startswith(f"port-broker: error: internal error answering {me()}: ")
    assert "RuntimeError('the policy exploded')" in line
    assert "Traceback" in audit_fields(line)["exception"]


async def test_out_of_fds_the_broker_pauses_accepting_then_serves(
    rundir: Path, capsys: pytest.CaptureFixture[str], autojump_clock: trio.testing.MockClock
) -> None:
    async with running_broker(rundir) as served:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            lowest_free = min(set(range(soft)) - set(open_fds()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await sock.connect(served.path)  # needs no fd here; accept() needs one
                await trio.sleep(1)  # the broker tried, paused, and tried again
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            wire = Wire(sock)
            assert (await wire.request(LIST))["ok"] is True
            assert served.broker.admission.connections == 1
    log = capsys.readouterr().err
    assert audit_lines(log, "port-broker: warning: accept") == [
        "port-broker: warning: accept on the control socket: Too many open files; retrying "
        "every 0.1s (raise LimitNOFILE= or lower max_connections)"
    ]  # once, not at each of the ten retries
    (resumed,) = audit_lines(log, "port-broker: notice: accept")
    assert re.fullmatch(
        r"port-broker: notice: accept on the control socket: accepting again after 1\.\ds",
        resumed,
    )


@pytest.mark.needs_root
async def test_a_group_the_kernel_alone_knows_of_counts(rundir: Path, launcher: Path) -> None:
    # nobody is in no group of the user database; only the kernel (SO_PEERGROUPS) knows
    # that this process of it was started with adm among its supplementary groups.
    adm = grp.getgrnam("adm")
    assert "nobody" not in adm.gr_mem
    site = launcher.parent.parent / "site"
    script = f"""
import sys
sys.path.insert(0, {str(site)!r})
from broker import client
print(",".join(s.name for s in client.list_sockets(path=sys.argv[1])))
"""
    rules = {"http": Rule(gids=frozenset({adm.gr_gid}))}
    async with running_broker(rundir, rules=rules) as served:
        listed = {}
        for groups in [(adm.gr_gid,), ()]:
            with trio.fail_after(START_TIMEOUT):
                done = await trio.run_process(
                    [*as_user(NOBODY, groups=groups), SYSTEM_PYTHON, "-I", "-c", script,
                     served.path],
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()
            listed[groups] = done.stdout.decode().strip()
    assert listed == {(adm.gr_gid,): "http", (): ""}


async def test_a_user_database_that_does_not_answer_delays_one_client_not_each(
    rundir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # NSS that hangs (an unreachable LDAP server) is not something a test can make. Real
    # time: a MockClock does not jump while a thread runs.
    release = threading.Event()
    asked = []

    def hangs(uid: int) -> tuple[str | None, frozenset[int]]:
        asked.append(uid)
        release.wait(START_TIMEOUT)
        return "late", frozenset()

    timeout = 0.5
    try:
        async with running_broker(rundir, client_timeout=timeout) as served:
            monkeypatch.setattr(users, "query", hangs)
            served.broker.users = users.UserDatabase(served.broker.ledger.warning)  # forget us
            start = trio.current_time()
            for _ in range(3):
                ask = client.acquire_trio("http", path=served.path, timeout=START_TIMEOUT)
                with await ask:  # granted by a uid rule, names or not
                    pass
            assert trio.current_time() - start >= timeout  # the first one waited
    finally:
        release.set()
    assert asked == [UID]  # once: the two after it were not kept waiting
    (warning,) = audit_lines(capsys.readouterr().err, "port-broker: warning:")
    assert warning == (
        f"port-broker: warning: the user database did not answer for uid {UID} within "
        f"{timeout:g}s; going on without its user name and groups for 5s (check NSS: "
        f"sssd, LDAP, nscd) peer_uid={UID}"
    )


@pytest.mark.needs_root
async def test_peers_of_other_uids_are_told_apart_by_the_kernel(
    rundir: Path, launcher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = launcher.parent.parent / "site"
    script = f"""
import json, os, sys
sys.path.insert(0, {str(site)!r})
from broker import client, errors
path = sys.argv[1]
out = {{"pid": os.getpid(), "listed": [s.name for s in client.list_sockets(path=path)]}}
try:
    client.acquire("http", path=path)
except errors.AccessDenied as e:
    out["denied"] = e.message
grants = client.acquire_many(["secret"], path=path)
out["secret"] = [sock.getsockname()[1] for _, sock in grants]
for _, sock in grants:
    sock.close()
try:
    client.reload(path=path)
except errors.AccessDenied as e:
    out["reload"] = e.message
print(json.dumps(out))
"""
    async with running_broker(rundir) as served:
        with trio.fail_after(START_TIMEOUT):
            done = await trio.run_process(
                [*as_user(NOBODY), SYSTEM_PYTHON, "-I", "-c", script, served.path],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        out = json.loads(done.stdout)
        assert out["listed"] == ["secret"]
        assert out["denied"] == (
            f"user nobody (uid {NOBODY}, pid {out['pid']}) may not acquire socket 'http': "
            f"not in users, groups or units of [sockets.http] in {CONFIG_PATH}"
        )
        assert out["secret"] == [served.held["secret"][0].getsockname()[1]]
        assert out["reload"] == (
            f"user nobody (uid {NOBODY}, pid {out['pid']}) may not reload the broker: only "
            f"root and uid {os.geteuid()}, the broker's own, may (as they could send it SIGHUP)"
        )
        assert served.broker.standing.generation == 1
    err = capsys.readouterr().err
    (denied,) = audit_lines(err, "denied a reload to user nobody")
    assert audit_fields(denied)["operation"] == "reload"
    (grant,) = audit_lines(err, "granted socket 'secret'")
    fields = audit_fields(grant)
    assert (fields["peer_uid"], fields["peer_gid"], fields["peer_user"]) == (
        str(NOBODY),
        str(NOBODY),
        "nobody",
    )
    assert fields["peer_pid"] == str(out["pid"])


# --- lifecycle --------------------------------------------------------------------


async def test_what_was_left_out_of_the_log_is_summed_up_when_the_broker_stops(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        for _ in range(REFUSAL_LOG_BURST + 5):
            assert (await wire.request(acquire_line("secret")))["code"] == "denied"
        send_signal_to_self(signal.SIGTERM)  # well inside the 10 s window
        with trio.fail_after(CLIENT_TIMEOUT):
            await served.stopped.wait()
    (summary,) = audit_lines(capsys.readouterr().err, "were not logged")
    assert summary.startswith(f"port-broker: notice: 5 more notices of uid {UID} in ")


# --- reload -----------------------------------------------------------------------


async def test_a_new_configuration_applies_to_the_next_request_of_a_connected_client(
    rundir: Path,
) -> None:
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        await wire.send(acquire_line("http"))
        reply, fds = await wire.reply()
        assert reply["ok"] is True
        for sock in fds:
            sock.close()
        others = Policy(sockets={"http": Rule(uids=frozenset({NOBODY}))}, status=ME, source="x")
        config = dataclasses.replace(served.broker.standing.config, policy=others)
        served.broker.standing = served.broker.standing.replaced(config, time.time())
        await wire.send(acquire_line("http"))  # the same connection: the new policy
        reply, fds = await wire.reply()
        assert (reply["ok"], reply["code"], fds) == (False, "denied", [])
        assert served.broker.report()["configuration"]["generation"] == 2


async def test_a_configuration_with_rules_for_sockets_not_held_is_refused(
    rundir: Path,
) -> None:
    path = rundir / "broker.toml"
    path.write_text(f"[sockets.http]\nusers = [{UID}]\n")
    async with running_broker(rundir, config_path=str(path)) as served:
        before = served.broker.standing
        path.write_text(f"[sockets.http]\nusers = [{UID}]\n[sockets.ftp]\nusers = [{UID}]\n")
        configuration, refused = await served.broker.reload()
        assert refused is not None
        assert "rules for ftp but the broker holds no such socket" in refused
        assert configuration["generation"] == 1
        assert served.broker.standing.policy == before.policy


async def test_sighup_reloads_the_file_and_keeps_the_old_policy_when_the_new_one_is_bad(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rundir / "broker.toml"
    path.write_text(f"[sockets.http]\nusers = [{UID}]\n[status]\nusers = [{UID}]\n")
    async with running_broker(rundir, config_path=str(path)) as served:

        async def reloaded(generation: int, refused: bool) -> status.Configuration:
            send_signal_to_self(signal.SIGHUP)
            with trio.fail_after(START_TIMEOUT):
                while True:
                    shown = served.broker.report()["configuration"]
                    if shown["generation"] == generation and bool(shown["refused"]) == refused:
                        return shown
                    await trio.sleep(0.02)

        await reloaded(2, refused=False)
        assert set(served.broker.standing.policy.sockets) == {"http"}  # the file's, not the default
        sock = await client.acquire_trio("http", path=served.path)
        sock.close()

        path.write_text('[sockets.http]\nusers = ["no-such-user-here"]\n')
        shown = await reloaded(2, refused=True)
        refused = shown["refused"]
        assert refused is not None
        assert "no-such-user-here" in refused["reason"]
        sock = await client.acquire_trio("http", path=served.path)  # the old policy holds
        sock.close()
    err = capsys.readouterr().err
    assert f"reloaded {path}: generation 2 in force" in err
    assert "refused the new configuration: " in err
    assert f"generation 2 of {path} stays in force" in err


RELOAD: Final = b'{"v":1,"op":"reload"}\n'


async def test_a_reload_request_is_answered_once_the_new_policy_is_in_force(
    rundir: Path,
) -> None:
    path = rundir / "broker.toml"
    path.write_text(f"[sockets.http]\nusers = [{UID}]\n")
    async with (
        running_broker(rundir, config_path=str(path)) as served,
        await Wire.open(served.path) as wire,
    ):
        path.write_text(f"[sockets.dual]\nusers = [{UID}]\n")
        reply = await wire.request(RELOAD)
        assert reply["op"] == "reload"
        shown = reply["configuration"]
        assert (shown["path"], shown["generation"], shown["refused"]) == (str(path), 2, None)
        # The very next request, on the same connection, meets the new policy.
        assert (await wire.request(acquire_line("http")))["code"] == "denied"
        path.write_text('[sockets.dual]\nusers = ["no-such-user-here"]\n')
        reply = await wire.request(RELOAD)
        assert reply["code"] == "invalid-config"
        assert reply["message"].startswith(f"{path}: sockets.dual.users[0]: unknown user")
        assert reply["message"].endswith(f"; generation 2 of {path} stays in force")
        await wire.send(acquire_line("dual"))  # generation 2 still decides
        granted, fds = await wire.reply()
        with owned(fds):
            assert (granted["ok"], len(fds)) == (True, 2)
        assert served.broker.report()["configuration"]["refused"] is not None


async def test_reloads_asked_for_at_once_run_one_after_the_other(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rundir / "broker.toml"
    path.write_text(f"[sockets.http]\nusers = [{UID}]\n")
    async with running_broker(rundir, config_path=str(path)) as served:
        async with await Wire.open(served.path) as first, await Wire.open(served.path) as second:
            send_signal_to_self(signal.SIGHUP)
            await first.send(RELOAD)
            await second.send(RELOAD)
            replies = [await first.request(b""), await second.request(b"")]
        generations = sorted(r["configuration"]["generation"] for r in replies)
        with trio.fail_after(START_TIMEOUT):  # the SIGHUP's reload nobody waits for
            while served.broker.standing.generation < 4:
                await trio.sleep(0.02)
        assert served.broker.standing.generation == 4
        assert generations[1] > generations[0] >= 2
    err = capsys.readouterr().err
    done = [line for line in err.splitlines() if f"reloaded {path}: generation" in line]
    assert [line.split("generation ")[1] for line in done] == [
        "2 in force",
        "3 in force",
        "4 in force",
    ]


async def test_a_reload_that_cannot_even_start_is_refused_and_the_broker_serves_on(
    rundir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(loader, "command", lambda path: ["/nonexistent/python"])
    async with running_broker(rundir) as served:
        send_signal_to_self(signal.SIGHUP)
        with trio.fail_after(START_TIMEOUT):
            while served.broker.standing.refused is None:
                await trio.sleep(0.02)
        assert served.broker.standing.refused["reason"] == (
            "/etc/port-broker/test-broker.toml: cannot start the configuration loader "
            "(/nonexistent/python): No such file or directory"
        )
        sock = await client.acquire_trio("http", path=served.path)  # still serving
        sock.close()
    assert "refused the new configuration: /etc/port-broker/test-broker.toml: cannot start" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_returns_on_sigterm_after_the_shutdown_grace(
    rundir: Path,
    capsys: pytest.CaptureFixture[str],
    autojump_clock: trio.testing.MockClock,
    signum: signal.Signals,
) -> None:
    async with running_broker(rundir) as served:
        idle = await Wire.open(served.path)
        async with idle:
            await trio.testing.wait_all_tasks_blocked()
            assert served.broker.admission.active == 1
            start = trio.current_time()
            send_signal_to_self(signum)
            with trio.fail_after(CLIENT_TIMEOUT):
                await served.stopped.wait()
            assert served.returned  # it returned by itself, not cancelled
            # A client in the middle of a conversation had the grace, and no more.
            assert trio.current_time() - start == pytest.approx(SHUTDOWN_GRACE)
            assert await idle.rest() == b""
        assert served.broker.admission.active == 0
        # Nobody is served any more, but what the broker does not own stays open.
        async with await Wire.open(served.path) as late:
            await late.send(LIST)
            with trio.move_on_after(CLIENT_TIMEOUT * 2) as waited:
                await late.rest()
            assert waited.cancelled_caught
        assert all(s.fileno() >= 0 for socks in served.held.values() for s in socks)
        assert served.broker.intake.control.fileno() >= 0
    assert f"port-broker: info: stopping on {signum.name}" in capsys.readouterr().err


# --- idle_exit ----------------------------------------------------------------------


async def test_a_broker_systemd_started_stops_when_idle_and_no_sooner_than_the_floor(
    rundir: Path, capsys: pytest.CaptureFixture[str], autojump_clock: trio.testing.MockClock
) -> None:
    async with running_broker(rundir, idle_exit=1.0, restartable=True) as served:
        async with await Wire.open(served.path) as wire:
            assert (await wire.request(LIST))["ok"] is True
        last = trio.current_time()
        with trio.fail_after(IDLE_FLOOR + 2 * IDLE_CHECK):
            await served.stopped.wait()
        # idle_exit says a second, but the rate buckets and log windows of that client
        # must have run out first: a restart would forgive what they counted.
        assert trio.current_time() - last >= IDLE_FLOOR
        assert served.returned
        assert served.broker.intake.control.fileno() >= 0  # systemd's, still open
    assert "(idle_exit): exiting; systemd starts the broker again" in capsys.readouterr().err


async def test_a_connection_that_comes_once_an_idle_broker_stopped_is_served_by_the_next(
    rundir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The control socket is systemd's and stays open across the exit: a client that
    # connects then waits in its queue, and the next start (here, on the same sockets,
    # as systemd passes them again) answers it.
    async with running_broker(rundir, idle_exit=1.0, restartable=True) as served:
        with trio.fail_after(IDLE_FLOOR + 2 * IDLE_CHECK):
            await served.stopped.wait()
        async with await Wire.open(served.path) as late, trio.open_nursery() as nursery:
            await late.send(LIST)
            after = Broker(served.broker.intake, served.broker.standing.config,
                           Audit(journal=False), restartable=True)  # fmt: skip
            after.users.store(UID, users.query(UID))
            await nursery.start(after.serve)
            assert (await late.plain_reply())["ok"] is True
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("waiting", ["held TCP connection", "held datagram", "client"])
async def test_an_idle_broker_stays_while_anything_waits_for_it(
    rundir: Path, autojump_clock: trio.testing.MockClock, waiting: str
) -> None:
    # With a connection waiting on a held socket and no worker to take it, systemd would
    # start the broker again as soon as it stopped: it must not stop.
    async with (
        running_broker(rundir, idle_exit=1.0, restartable=True, client_timeout=60.0) as served,
        contextlib.AsyncExitStack() as stack,
    ):
        if waiting == "held TCP connection":
            (http,) = served.held["http"]
            peer = stack.enter_context(socket.create_connection(http.getsockname()))
        elif waiting == "held datagram":
            (dns,) = served.held["dns"]
            peer = stack.enter_context(udp_socket("127.0.0.1"))
            peer.sendto(b"query", dns.getsockname())
        else:  # connected, saying nothing, within its client_timeout
            await stack.enter_async_context(await Wire.open(served.path))
        await trio.sleep(IDLE_FLOOR + 5 * IDLE_CHECK)
        # Still accepting (a broker that stopped would leave this one queued).
        with trio.fail_after(1):
            async with await Wire.open(served.path) as late:
                assert (await late.request(LIST))["ok"] is True


async def test_an_idle_broker_stays_while_a_reload_runs_and_a_stop_kills_its_loader(
    rundir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A loader child that never answers (it waits on a FIFO nobody opens).
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    script = f"open({str(fifo)!r}).read()"
    monkeypatch.setattr(loader, "command", lambda path: [SYSTEM_PYTHON, "-c", script])

    def loaders() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if script.encode() in f.read():
                    found.append(int(pid))
        return found

    try:
        async with running_broker(rundir, idle_exit=1.0, restartable=True) as served:
            send_signal_to_self(signal.SIGHUP)
            await trio.sleep(IDLE_FLOOR + 5 * IDLE_CHECK)
            assert served.broker.reloader.busy
            assert not served.stopped.is_set()
            assert len(loaders()) == 1
        # The reload was cancelled with the broker: its child is killed, not left behind.
        deadline = time.monotonic() + START_TIMEOUT
        while loaders() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loaders() == []
    finally:  # whatever failed, no child stays blocked on the FIFO
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_until_idle_waits_while_the_broker_is_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = Admission(
        lambda: Limits(max_connections=4, max_per_user=4, source=CONFIG_PATH), trio.current_time
    )
    busy = True
    with trio.move_on_after(IDLE_FLOOR * 3) as waited:
        await until_idle(slots, lambda: 1.0, lambda: busy, [])
    assert waited.cancelled_caught
    busy = False
    start = trio.current_time()
    assert await until_idle(slots, lambda: 1.0, lambda: busy, []) >= IDLE_FLOOR
    assert trio.current_time() - start <= IDLE_FLOOR + IDLE_CHECK


async def test_until_idle_takes_an_idle_exit_a_reload_sets_counting_from_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = Admission(
        lambda: Limits(max_connections=4, max_per_user=4, source=CONFIG_PATH), trio.current_time
    )
    idle_exit = 0.0
    with trio.move_on_after(IDLE_FLOOR * 10) as waited:  # off: never
        await until_idle(slots, lambda: idle_exit, lambda: False, [])
    assert waited.cancelled_caught
    async with trio.open_nursery() as nursery:
        returned = trio.Event()

        async def watch() -> None:
            await until_idle(slots, lambda: idle_exit, lambda: False, [])
            returned.set()

        nursery.start_soon(watch)
        await trio.sleep(IDLE_FLOOR * 10 + IDLE_OFF_CHECK / 2)  # between two looks
        set_at, idle_exit = trio.current_time(), 1.0  # a reload sets it
        await returned.wait()
        # Idle long before, yet counted from the reload: at least the floor, at most an
        # off look, the floor and a check.
        took = trio.current_time() - set_at
        assert IDLE_FLOOR <= took <= IDLE_OFF_CHECK + IDLE_FLOOR + IDLE_CHECK


@pytest.mark.parametrize(
    ("idle_exit", "restartable"),
    [(1.0, False), (0.0, True)],
    ids=["nothing would start it again", "idle_exit 0"],  # serve --bind; never
)
async def test_a_broker_that_may_not_stop_when_idle_does_not(
    rundir: Path, autojump_clock: trio.testing.MockClock, idle_exit: float, restartable: bool
) -> None:
    async with running_broker(rundir, idle_exit=idle_exit, restartable=restartable) as served:
        await trio.sleep(START_TIMEOUT - 1)
        assert not served.stopped.is_set()


async def test_status_line_for_systemd(rundir: Path) -> None:
    async with running_broker(rundir) as served:
        broker = served.broker
        assert broker.status_line() == (
            "Holding http, dual, dns, secret, norule; 0 grants, 0 denials, 0 clients"
        )
        (await client.acquire_trio("http", path=served.path)).close()
        with pytest.raises(AccessDenied):
            await client.acquire_trio("secret", path=served.path)
        async with await Wire.open(served.path):
            await trio.testing.wait_all_tasks_blocked()
            assert broker.status_line() == (
                "Holding http, dual, dns, secret, norule; 1 grants, 1 denials, 1 clients"
            )
    async with running_broker(rundir, held={}, rules={}) as served:
        assert served.broker.status_line() == "Holding nothing; 0 grants, 0 denials, 0 clients"


async def read_notifications(notify: trio.socket.SocketType, until: str) -> list[str]:
    messages: list[str] = []
    while not messages or until not in messages[-1]:
        messages.append((await notify.recv(4096)).decode())
    return messages


async def test_serve_tells_systemd_ready_status_and_stopping(
    rundir: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    path = rundir / "notify.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        await notify.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        async with running_broker(rundir) as served:
            holding = "STATUS=Holding http, dual, dns, secret, norule"
            ready = await notify.recv(4096)
            assert ready.decode() == f"READY=1\n{holding}; 0 grants, 0 denials, 0 clients"
            (await client.acquire_trio("http", path=served.path)).close()
            start = trio.current_time()
            messages = await read_notifications(notify, "1 grants")
            assert trio.current_time() - start <= STATUS_INTERVAL
            assert messages[-1] == f"{holding}; 1 grants, 0 denials, 0 clients"
            with trio.move_on_after(STATUS_INTERVAL * 5):  # unchanged counts: no news
                unexpected = await notify.recv(4096)
                pytest.fail(f"unexpected notification {unexpected!r}")
            send_signal_to_self(signal.SIGTERM)
            assert await notify.recv(4096) == b"STOPPING=1"
            await served.stopped.wait()


@pytest.mark.parametrize("ours", [True, False])
async def test_serve_pings_the_watchdog_when_it_is_for_this_process(
    rundir: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
    ours: bool,
) -> None:
    path = rundir / "notify.sock"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        await notify.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if ours else 1))
        async with running_broker(rundir):
            pings: list[float] = []
            with trio.move_on_after(7.0):
                while True:
                    if await notify.recv(4096) == b"WATCHDOG=1":
                        pings.append(trio.current_time())
    if ours:  # every half WatchdogSec
        start = pings[0]
        assert [round(t - start, 6) for t in pings] == [0.0, 1.5, 3.0, 4.5, 6.0]
    else:
        assert pings == []
