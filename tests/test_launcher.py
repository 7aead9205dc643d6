"""`place_fds`, `listen_environment` and `exec_with` (broker/launcher.py).

`place_fds` rearranges the fds of the process it runs in and `exec_with` replaces it, so
both run in child processes, which report what they see as JSON: which socket (by
inode) sits at which fd, what is open, and what the exec'd program found — the same
pid, LISTEN_* as systemd sets them, and exactly fds 0, 1, 2, 3, … open.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from broker.launcher import LISTEN_FDS_START, listen_environment, pidfd_id
from tests.harness.inprocess import (
    public_dir,
    running_broker,
)
from tests.harness.processes import LISTEN_FDS_PROBE, OPEN_FDS_SOURCE, START_TIMEOUT

PLACE: Final = (
    """
import fcntl, json, os, socket, sys
from broker.launcher import place_fds
"""
    + OPEN_FDS_SOURCE
    + """
positions, bystanders = json.loads(sys.argv[1])
assert open_fds() == [0, 1, 2], open_fds()
# Make one socket per position, parked far up, then put each at its position exactly
# as a received fd would be: close-on-exec.
parked = []
for _ in positions:
    fd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()
    parked.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000))
    os.close(fd)
for fd, position in zip(parked, positions):
    os.dup2(fd, position, inheritable=False)
    os.close(fd)
for position in bystanders:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    if fd != position:
        os.dup2(fd, position, inheritable=False)
        os.close(fd)
def ino(fd):
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None
inos = [ino(fd) for fd in positions]
before = {fd: ino(fd) for fd in bystanders}
place_fds(positions)
print(json.dumps({
    "inos": inos,
    "placed": [ino(3 + i) for i in range(len(positions))],
    "inheritable": [os.get_inheritable(3 + i) for i in range(len(positions))],
    "open": open_fds(),
    "bystanders": {fd: [before[fd], ino(fd)] for fd in bystanders},
}))
"""
)


def run_child(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
        env=env,
    )


def place(positions: Sequence[int], bystanders: Sequence[int] = ()) -> dict[str, Any]:
    done = run_child(PLACE, json.dumps([list(positions), list(bystanders)]))
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


SHUFFLED: Final = random.Random(1812).sample(range(3, 400), 100)  # noqa: S311 (a fixed layout)


@pytest.mark.parametrize(
    "positions",
    [
        pytest.param([3], id="already at 3"),
        pytest.param([3, 4], id="already in place"),
        pytest.param([4, 3], id="at 3 and 4 in reverse order"),
        pytest.param([4, 5, 3], id="rotated within the target range"),
        pytest.param([5, 3], id="one in the range, one beyond"),
        pytest.param([4, 6, 8, 3, 5], id="interleaved"),
        pytest.param([40, 41, 42], id="far above"),
        pytest.param(SHUFFLED, id="100 scattered"),
        pytest.param(list(range(102, 2, -1)), id="100 in reverse over the range"),
    ],
)
def test_place_fds_puts_each_socket_at_3_and_up_in_order(positions: list[int]) -> None:
    result = place(positions)
    count = len(positions)
    assert result["placed"] == result["inos"]
    assert len(set(result["inos"])) == count  # distinct sockets, really moved
    assert result["inheritable"] == [True] * count
    # Nothing but the placed sockets: the originals and the parking spots are closed.
    assert result["open"] == list(range(LISTEN_FDS_START + count))


def test_place_fds_replaces_whatever_was_at_the_target_and_nothing_else() -> None:
    result = place([7, 9], bystanders=[3, 20])
    assert result["placed"] == result["inos"]
    assert result["open"] == [0, 1, 2, 3, 4, 20]
    (before_3, now_3), (before_20, now_20) = result["bystanders"]["3"], result["bystanders"]["20"]
    assert now_3 != before_3  # replaced by the first socket, as systemd would
    assert now_20 == before_20  # untouched


def test_place_fds_with_nothing_changes_nothing() -> None:
    result = place([], bystanders=[3])
    assert result["open"] == [0, 1, 2, 3]
    assert result["bystanders"]["3"][0] == result["bystanders"]["3"][1]


def test_listen_environment_sets_what_sd_listen_fds_reads_from_a_clean_slate() -> None:
    base = {"PATH": "/usr/bin", "LISTEN_FDS": "9", "LISTEN_FDNAMES": "stale", "LISTEN_PID": "1",
            "LISTEN_PIDFDID": "4242", "LISTEN_SOMETHING_NEW": "x"}  # fmt: skip
    env = listen_environment(["http", "dual", "dual"], base)
    own = pidfd_id()
    assert env == {
        "PATH": "/usr/bin",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "http:dual:dual",
        "LISTEN_PID": str(os.getpid()),
        **({} if own is None else {"LISTEN_PIDFDID": str(own)}),
    }
    assert base["LISTEN_FDS"] == "9"  # a copy: the caller's mapping is untouched


def test_the_pidfd_id_is_this_processs_own_where_pidfds_have_their_own_inodes() -> None:
    mine = os.pidfd_open(os.getpid())
    init = os.pidfd_open(1)
    try:
        unique = os.fstat(mine).st_ino != os.fstat(init).st_ino  # pidfs (Linux 6.9+)
        assert pidfd_id() == (os.fstat(mine).st_ino if unique else None)
    finally:
        os.close(mine)
        os.close(init)


EXEC_WITH: Final = """
import json, os, socket, sys
from broker.launcher import exec_with
http = socket.socket()
http.bind(("127.0.0.1", 0))
http.listen()
dns = socket.socket(type=socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 0))
stray = open("/dev/null")  # a file this process has open: not passed on
mode = sys.argv[1]
environ = {"PATH": os.environ["PATH"], "KEEP": "given"} if mode == "environ" else None
print(json.dumps({
    "pid": os.getpid(),
    "inos": [os.fstat(s.fileno()).st_ino for s in (http, dns)],
    "addresses": [list(s.getsockname()) for s in (http, dns)],
}), flush=True)
grants = [("http", http.detach()), ("dns", dns.detach())]
exec_with(grants, [sys.executable, "-I", "-c", sys.argv[2]], environ)
"""


@pytest.mark.parametrize("mode", ["inherit", "environ"])
def test_exec_with_replaces_the_process_with_the_sockets_at_3_and_up(mode: str) -> None:
    env = {**os.environ, "LISTEN_FDS": "9", "LISTEN_FDNAMES": "stale", "KEEP": "inherited",
           "LISTEN_PIDFDID": "4242", "LISTEN_OTHER": "stale"}  # fmt: skip
    done = run_child(EXEC_WITH, mode, LISTEN_FDS_PROBE, env=env)
    assert done.returncode == 0, done.stderr
    before, after = (json.loads(line) for line in done.stdout.splitlines())
    assert after["pid"] == before["pid"]  # replaced in place
    unique = pidfd_id() is not None
    assert after["env"] == {
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "http:dns",
        "LISTEN_PID": str(before["pid"]),
        "LISTEN_PIDFDID": str(after["pidfd_ino"]) if unique else None,  # its own
        "LISTEN_OTHER": None,
        "KEEP": "given" if mode == "environ" else "inherited",
    }
    assert after["open"] == [0, 1, 2, 3, 4]  # nothing else leaks into the program
    assert [fd["ino"] for fd in after["fds"]] == before["inos"]
    assert [fd["address"] for fd in after["fds"]] == before["addresses"]
    assert [(fd["type"], fd["listening"]) for fd in after["fds"]] == [
        ("SOCK_STREAM", 1),
        ("SOCK_DGRAM", 0),
    ]


def test_libsystemd_takes_the_sockets_despite_a_stale_listen_pidfdid() -> None:
    # sd_listen_fds() of systemd 256+ refuses the fds when LISTEN_PIDFDID names another
    # process: what a worker started from a socket-activated parent inherits.
    probe = "from systemd import daemon; print(daemon.listen_fds())"
    env = {**os.environ, "LISTEN_PIDFDID": "4242"}
    done = run_child(EXEC_WITH, "inherit", probe, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[3, 4]"


def test_exec_with_finds_the_program_on_path() -> None:
    script = """
import socket, sys
from broker.launcher import exec_with
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
exec_with([("http", sock.detach())],
          ["sh", "-c", 'echo "$$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES"'])
"""
    done = run_child(script)
    assert done.returncode == 0, done.stderr
    pid, listen_pid, count, names = done.stdout.split()
    assert (pid, count, names) == (listen_pid, "1", "http")


@pytest.mark.parametrize(
    ("program", "error"),
    [
        ("/nonexistent/program", "FileNotFoundError"),
        ("/etc/passwd", "PermissionError"),  # not executable
        ("/", "PermissionError"),  # a directory
    ],
)
def test_exec_with_raises_when_the_program_cannot_run(program: str, error: str) -> None:
    script = f"""
import os, socket
from broker.launcher import exec_with
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
fd = sock.detach()
try:
    exec_with([("http", fd)], [{program!r}])
except OSError as e:
    print(type(e).__name__, os.path.exists(f"/proc/self/fd/{{fd}}") and fd != 3,
          socket.socket(fileno=3).detach() == 3)
"""
    done = run_child(script)
    assert done.returncode == 0, done.stderr
    # Raised, with the socket already handed over to fd 3 (closed when the process ends).
    assert done.stdout.split() == [error, "False", "True"]


@pytest.fixture
def rundir(public_root: Path) -> Path:
    return public_dir(public_root)


async def test_acquire_then_exec_leaves_only_the_sockets_open(rundir: Path) -> None:
    # The whole path of `port-broker exec`: the control connection and everything the
    # client opened are gone by the time the program runs; the sockets are the broker's.
    script = """
import sys
from broker.cli import main
sys.exit(main(["exec", "--socket", sys.argv[1], "http,dual", "--", sys.executable, "-I", "-c",
               sys.argv[2]]))
"""
    async with running_broker(rundir) as served:
        with trio.fail_after(START_TIMEOUT):
            done = await trio.run_process(
                [sys.executable, "-I", "-c", script, served.path, LISTEN_FDS_PROBE],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        after = json.loads(done.stdout)
        assert after["open"] == [0, 1, 2, 3, 4, 5]
        assert [fd["ino"] for fd in after["fds"]] == served.inos("http", "dual")
        assert after["env"]["LISTEN_FDNAMES"] == "http:dual:dual"
        assert after["env"]["LISTEN_PID"] == str(after["pid"])
        assert [fd["listening"] for fd in after["fds"]] == [1, 1, 1]
