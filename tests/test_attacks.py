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
import re
import select
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing

from broker import client
from broker.daemon.admission import UNNAMED_BURST, UNNAMED_RATE
from broker.daemon.ledger import REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW
from broker.daemon.policy import Rule
from broker.daemon.sdnotify import STATUS_INTERVAL
from tests.harness.inprocess import (
    CONFIG_PATH,
    DEFAULT_RULES,
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
from tests.harness.processes import START_TIMEOUT, Processes, as_user, start_broker
from tests.harness.runtime import ROOT, SYSTEM_PYTHON

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


SHARED_UID: Final = 61400
WEB_GID: Final = 61401

ASK_ONCE: Final = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"v":1,"op":"acquire","names":["http"]}\\n')
print(sock.recv(4096).decode().strip())
"""


async def test_a_once_named_uid_is_exempt_from_the_rate_only_with_what_named_it(
    rundir: Path,
) -> None:
    # A shared service account: its web worker is named by a group, its other processes
    # are not, and must not flood the broker unthrottled on the worker's account.
    rules = {**DEFAULT_RULES, "http": Rule(gids=frozenset({WEB_GID}))}
    worker = [*as_user(SHARED_UID, groups=[WEB_GID]), SYSTEM_PYTHON, "-I", "-c", ASK_ONCE]
    rounds = int(UNNAMED_BURST) + 1000
    async with running_broker(rundir, rules=rules) as served:
        with trio.fail_after(START_TIMEOUT):
            first = await trio.run_process([*worker, served.path], capture_stdout=True)
        assert b'"ok":true' in first.stdout  # (uid, group) is now known to be named
        began = trio.current_time()
        with trio.fail_after(START_TIMEOUT):
            await trio.run_process(
                [*as_user(SHARED_UID), SYSTEM_PYTHON, "-I", "-c", FLOODER, served.path,
                 str(rounds)]
            )  # fmt: skip
        took = trio.current_time() - began
        refused = served.broker.ledger.refusals["busy"]
        assert refused >= rounds - UNNAMED_BURST - UNNAMED_RATE * took  # as any flood
        with trio.fail_after(START_TIMEOUT):  # the worker is still let in past the rate
            again = await trio.run_process([*worker, served.path], capture_stdout=True)
        assert b'"ok":true' in again.stdout


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


# --- granted fds that are never read (in flight, charged to the broker) ---------------


HOARDER_UID: Final = 61300
VICTIM_UID: Final = 61301
HOARD_POLICY: Final = f"[sockets.http]\nusers = [{HOARDER_UID}, {VICTIM_UID}]\n"

HOARDER: Final = """
import socket, sys, time
path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
request = b'{"v":1,"op":"acquire","names":["http"]}\\n'
held = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
        if mode == "pipelined":  # 100 acquires at once, and no reply read
            sock.sendall(request * 100)
            time.sleep(0.005)  # (served one after another, within one uid's slots)
        else:  # one acquire, then half-close: nothing more to say, nothing read
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    held.append(sock)  # kept open: what the broker sent stays unread in its queue
print("hoarding", flush=True)
time.sleep(3600)  # until the test stops it
"""

ACQUIRER: Final = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from broker.client import acquire
from broker.errors import ClientError
path, count, interval = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
latencies, failures = [], []
for _ in range(count):
    began = time.monotonic()
    try:
        acquire("http", path=path, timeout=1.0).close()  # ten times the p99 budget
        latencies.append(time.monotonic() - began)
    except ClientError as e:
        failures.append(e.message)
    time.sleep(interval)
print(json.dumps({"latencies": latencies, "failures": failures}))
"""


def acquisitions(launcher: Path, control: Path, uid: int, count: int) -> dict[str, Any]:
    """`count` acquisitions of http by `uid`, 10 ms apart: their latencies and failures."""
    site = launcher.parent.parent / "site"
    argv = [*as_user(uid), SYSTEM_PYTHON, "-I", "-c", ACQUIRER, str(site), str(control),
            str(count), "0.01"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=count * 2, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


UNIT_NOFILE: Final = re.findall(
    r"^LimitNOFILE=(\d+)$", (ROOT / "units" / "port-broker.service").read_text(), re.M
)[0]


@pytest.mark.needs_root
@pytest.mark.parametrize(
    "hoard", [("pipelined", 120), ("half-closed", 9000)], ids=["pipelined", "half-closed"]
)
@pytest.mark.parametrize(
    "nofile", [f"{UNIT_NOFILE}:{UNIT_NOFILE}", "1024:16384"], ids=["unit", "default"]
)
def test_hoarders_starve_nobody(
    processes: Processes, launcher: Path, workdir: Path, nofile: str, hoard: tuple[str, int]
) -> None:
    # The kernel charges every fd sent but not yet received to the sender's user and
    # refuses more (ETOOMANYREFS) past its RLIMIT_NOFILE: an allowed uid that never
    # reads must not make every other grant fail. Either hoard (12,000 and 9,000 fds if
    # every grant went) passes the unit's LimitNOFILE= and the soft limit the broker
    # raises itself to under systemd's default soft limit of 1024 (whose hard limit,
    # 512 Ki, is more than a test run here may set: 16 Ki stands for it).
    broker = start_broker(processes, launcher, workdir, HOARD_POLICY, nofile=nofile)
    hoarder = processes.start(
        ["prlimit", "--nofile=16384:16384", "--", *as_user(HOARDER_UID), SYSTEM_PYTHON, "-I",
         "-c", HOARDER, str(broker.control), hoard[0], str(hoard[1])]
    )  # fmt: skip
    assert hoarder.stdout is not None
    assert select.select([hoarder.stdout], [], [], START_TIMEOUT)[0]
    assert hoarder.stdout.readline() == "hoarding\n"
    result = acquisitions(launcher, broker.control, VICTIM_UID, 100)
    latencies = sorted(result["latencies"])
    assert len(latencies) >= 99, result["failures"][:3]
    assert latencies[98] <= 0.1, latencies[-5:]
    # The log and the status report name who holds them: the hoarder, within its share
    # (one unread reply per connection, each carrying http's one socket).
    report = client.status(path=str(broker.control))
    holders = {entry["uid"]: entry["fds"] for entry in report["unread"]["holders"]}
    assert set(holders) == {HOARDER_UID}, report["unread"]
    assert 0 < holders[HOARDER_UID] <= 64
