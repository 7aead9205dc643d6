"""The broker against hostile local users, through real connections from real
processes of other uids (docs/security.md has each attack and how it is met).

Each test here is an attack that once worked: a request writing a line of its own into
the log (V2), clients drowning the log in notices (V3), a connect/close flood (V4) and
slow connections from many uids (V5) keeping named workers out, one uid taking every
slot. The cgroup-name forgery (V1) is in tests/test_identity.py, the clients' wait for
room in a full queue in tests/test_client.py, the journal's side under real systemd in
tests/test_systemd.py, and the same attacks at scale in bench/ ("Under attack").
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing

from broker import client
from broker.admission import UNNAMED_BURST, UNNAMED_RATE
from broker.ledger import REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW
from broker.policy import Rule
from broker.sdnotify import STATUS_INTERVAL
from tests.harness.inprocess import (
    CONFIG_PATH,
    LIST,
    LONG_TIMEOUT,
    UID,
    Served,
    Wire,
    acquire_line,
    audit_fields,
    audit_lines,
    me,
    running_broker,
)
from tests.harness.processes import START_TIMEOUT, as_user
from tests.harness.runtime import SYSTEM_PYTHON

# --- the audit trail ---------------------------------------------------------------


FORGED_GRANT: Final = "port-broker: info: granted socket 'http' to user root (uid 0, pid 1)"


@pytest.mark.parametrize("brk", ["\n", "\r", "\u2028", "\x1b[1A\x1b[2K"], ids=ascii)
async def test_a_request_cannot_write_a_line_of_its_own_into_the_log(
    rundir: Path, capsys: pytest.CaptureFixture[str], brk: str
) -> None:
    request = {"v": 1, "op": "list", f"x{brk}{FORGED_GRANT}": 1}
    async with running_broker(rundir) as served, await Wire.open(served.path) as wire:
        reply = await wire.request(json.dumps(request).encode() + b"\n")
        assert reply["code"] == "malformed"
        assert brk not in reply["message"]
        assert served.broker.ledger.refusals == {"malformed": 1}
    lines = capsys.readouterr().err.split("\n")
    assert not [line for line in lines if line.startswith(FORGED_GRANT)]
    (refused,) = [line for line in lines if "refused" in line]
    assert refused.isprintable()
    shown = f"list request has unknown key(s): x{ascii(brk)[1:-1]}port-broker: info: gr"
    assert shown in refused


# --- one user's share ---------------------------------------------------------------


HOLDER: Final = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])  # and never a byte: a slow client
    held.append(sock)
print("connected", flush=True)
sys.stdin.read()  # until the test is done
"""


@contextlib.asynccontextmanager
async def slow_connections(served: Served, uids: range, each: int) -> AsyncIterator[None]:
    """`each` silent connections from each of `uids`, kept open until the block ends;
    entered once the broker has taken or refused every one of them."""
    holders = []
    try:
        for uid in uids:
            holder = await trio.lowlevel.open_process(
                [*as_user(uid), SYSTEM_PYTHON, "-I", "-c", HOLDER, served.path, str(each)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            holders.append(holder)
        for holder in holders:
            assert holder.stdout is not None
            with trio.fail_after(START_TIMEOUT):
                assert await holder.stdout.receive_some() == b"connected\n"
        with trio.fail_after(START_TIMEOUT):
            while served.broker.admission.connections < len(uids) * each:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        yield
    finally:
        for holder in holders:
            holder.kill()
            await holder.wait()


async def test_slow_connections_of_many_uids_leave_room_for_the_named_ones(
    rundir: Path,
) -> None:
    # 4 uids no rule names, 3 silent connections each, against max_connections=8: they
    # share 6 slots (a quarter is kept), and this process, named, is still served.
    async with (
        running_broker(rundir, max_connections=8, client_timeout=LONG_TIMEOUT) as served,
        slow_connections(served, range(61000, 61004), 3),
    ):
        assert served.broker.admission.unnamed == 6
        assert served.broker.ledger.refusals["busy"] == 6
        for _ in range(2):  # the reserve: the named peer gets its sockets
            (await client.acquire_trio("http", path=served.path, timeout=1.0)).close()


ADMIN: Final = 61010
ADMINS: Final = 61999
"""An admin's uid, which no rule names, and a group that only [status] names."""


async def test_an_admin_named_only_in_status_by_a_group_is_kept_room_for(
    rundir: Path, launcher: Path
) -> None:
    # The same flood: the reserve is for whomever any rule names, [status] included.
    status = Rule(gids=frozenset({ADMINS}))
    async with (
        running_broker(
            rundir, status=status, max_connections=8, client_timeout=LONG_TIMEOUT
        ) as served,
        slow_connections(served, range(61000, 61004), 3),
    ):
        assert served.broker.admission.unnamed == 6
        argv = [*as_user(ADMIN, groups=[ADMINS]), str(launcher), "status", "--json",
                "--socket", served.path]  # fmt: skip
        with trio.fail_after(START_TIMEOUT):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                          check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["connections"]["active"] == 7


FLOODER: Final = """
import socket, sys
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    try:  # a connection refused at accept may be closed before the request goes
        sock.sendall(b'{"v":1,"op":"list"}\\n')
        sock.recv(4096)
    except OSError:
        pass
    sock.close()
"""


async def test_a_connect_close_flood_is_refused_at_accept_and_a_named_worker_served(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rounds = int(UNNAMED_BURST) + 1000
    async with running_broker(rundir) as served:
        began = trio.current_time()
        with trio.fail_after(START_TIMEOUT):
            done = await trio.run_process(
                [*as_user(61000), SYSTEM_PYTHON, "-I", "-c", FLOODER, served.path, str(rounds)]
            )
        took = trio.current_time() - began
        assert done.returncode == 0
        refused = served.broker.ledger.refusals["busy"]
        assert refused >= rounds - UNNAMED_BURST - UNNAMED_RATE * took  # all but the rate
        assert refused > 0
        (await client.acquire_trio("http", path=served.path, timeout=1.0)).close()
    # Refused at accept: not one line each in the log (the list answers are not logged).
    assert len(audit_lines(capsys.readouterr().err, "peer_uid=61000")) == 0


async def test_one_uid_cannot_take_every_connection(rundir: Path) -> None:
    async with running_broker(rundir, max_connections=64, max_connections_per_user=2,
                              client_timeout=LONG_TIMEOUT) as served:  # fmt: skip
        first = await Wire.open(served.path)
        second = await Wire.open(served.path)
        async with first, second:
            await trio.testing.wait_all_tasks_blocked()
            async with await Wire.open(served.path) as third:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    await third.send(LIST)
                reply, fds = await third.reply()
                assert fds == []
                assert reply["code"] == "busy"
                assert reply["message"] == (
                    f"uid {UID} already has 2 connections to the broker, its limit "
                    f"(max_connections_per_user in {CONFIG_PATH}); retry shortly"
                )
            assert (await first.request(LIST))["ok"] is True
        await trio.testing.wait_all_tasks_blocked()
        assert served.broker.admission.per_uid == {}  # every slot given back
        with await client.acquire_trio("http", path=served.path):
            pass


async def test_a_flood_of_refusals_is_logged_in_part_and_summed_up(
    rundir: Path, capsys: pytest.CaptureFixture[str], autojump_clock: trio.testing.MockClock
) -> None:
    denied = acquire_line("secret")  # DEFAULT_RULES: not for this uid
    async with running_broker(rundir) as served:
        async with await Wire.open(served.path) as wire:
            for _ in range(REFUSAL_LOG_BURST + 30):
                assert (await wire.request(denied))["code"] == "denied"
        granted = await client.acquire_trio("http", path=served.path)  # grants: always
        granted.close()
        await trio.sleep(REFUSAL_LOG_WINDOW + STATUS_INTERVAL)  # the window ends
        assert served.broker.ledger.refusals == {"denied": REFUSAL_LOG_BURST + 30}
    err = capsys.readouterr().err
    assert len(audit_lines(err, "denied socket 'secret'")) == REFUSAL_LOG_BURST
    assert len(audit_lines(err, "granted socket 'http'")) == 1
    (summary,) = audit_lines(err, "were not logged")
    assert summary.startswith(f"port-broker: notice: 30 more notices of uid {UID} in ")
    assert served.broker.report()["log"] == {"suppressed": 30, "lost": 0}


async def test_clients_that_hang_up_before_their_answer_do_not_flood_the_log(
    rundir: Path, capsys: pytest.CaptureFixture[str], autojump_clock: trio.testing.MockClock
) -> None:
    # connect, ask, close without reading: each answer fails (EPIPE), each a notice.
    rounds = REFUSAL_LOG_BURST * 5
    async with running_broker(rundir) as served:
        for _ in range(rounds):
            hasty = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            hasty.connect(served.path)
            hasty.sendall(LIST)
            hasty.close()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(REFUSAL_LOG_WINDOW + STATUS_INTERVAL)  # the window ends
        (await client.acquire_trio("http", path=served.path)).close()  # grants: always
        suppressed = served.broker.report()["log"]["suppressed"]
    err = capsys.readouterr().err
    dropped = audit_lines(err, f"dropped {me()}: ")
    assert len(dropped) == REFUSAL_LOG_BURST
    assert audit_fields(dropped[0])["peer_uid"] == str(UID)
    (summary,) = audit_lines(err, "were not logged")
    assert summary.startswith(
        f"port-broker: notice: {suppressed} more notices of uid {UID} in 10 s were not logged"
    )
    assert suppressed > 0
    assert len(audit_lines(err, "granted socket 'http'")) == 1
