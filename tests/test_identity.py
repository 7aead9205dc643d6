"""Tests for `broker.identity`: who is on the other end, from the kernel alone.

Real Unix socket connections from real processes: this one, forked children that
became other uids before connecting, children that exited before they were identified,
and a child placed in a real cgroup2 `web.service`. The user database is the real one;
its cache is tested against a real change of /etc/group, bind-mounted in a child's
private mount namespace (the host's file is never touched).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import grp
import json
import os
import pwd
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from broker.daemon.audit import Audit
from broker.daemon.identity import (
    CGROUP_FILE_MAX,
    Peer,
    _peer_pidfd,
    cgroup_of,
    overflow_ids,
    parse_cgroup_file,
    peer_credentials,
    unit_from_cgroup,
)
from broker.daemon.ledger import Ledger
from broker.daemon.policy import Rule
from broker.daemon.users import UserDatabase
from tests.harness import processes
from tests.harness.runtime import SYSTEM_PYTHON

WWW_DATA: Final = pwd.getpwnam("www-data")
NOGROUP: Final = grp.getgrnam("nogroup").gr_gid
ADM: Final = grp.getgrnam("adm").gr_gid
UNNAMED_UID: Final = 61234
"""A uid with no user-database entry (as under DynamicUser=)."""
MAX_UID: Final = 2**32 - 2
"""The largest uid: (uid_t)-1 means "no uid"."""
EXTRA_GID: Final = 61999
"""A gid added to www-data's groups in a private copy of /etc/group."""
CHILD_TIMEOUT: Final = 30.0
"""Seconds a forked child gets to connect, report or exit: it takes milliseconds; a hang
should fail the test rather than stall the run."""
CACHE_LIMIT: Final = 4096
"""UserDatabase forgets everything once it holds more uids than this (users.py)."""

_CLONE_NEWNS: Final = 0x00020000
_MS_BIND: Final = 4096
_MS_REC: Final = 16384
_MS_PRIVATE: Final = 1 << 18


# --- forked peers ----------------------------------------------------------------------


def wait_readable(fd: int, what: str) -> None:
    ready, _, _ = select.select([fd], [], [], CHILD_TIMEOUT)
    if not ready:
        raise AssertionError(f"timed out after {CHILD_TIMEOUT} s waiting for {what}")


class ForkedPeer:
    """A child process connected to us; we hold the accepted end as `conn`.

    The child stays connected and alive until `exit()`; it is reaped by `reap()` or at
    the end of `forked_peer`, killed (by its pid, while still unreaped) only if it hangs.
    """

    def __init__(self, pid: int, conn: socket.socket, go: int) -> None:
        self.pid = pid
        self.conn = conn
        self._go = go
        self._pidfd = os.pidfd_open(pid)
        self.reaped = False

    def exit(self) -> None:
        """Let the child exit and wait until it has (a zombie, not reaped)."""
        if self._go >= 0:
            os.close(self._go)
            self._go = -1
        wait_readable(self._pidfd, f"child {self.pid} to exit")

    def reap(self) -> int:
        self.exit()
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if not self.reaped:
            try:
                self.exit()
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)  # our own child, not yet reaped
            os.waitpid(self.pid, 0)
            self.reaped = True
        os.close(self._pidfd)
        self.conn.close()


def _run_peer_child(
    address: bytes, go: int, ready: int, become: Callable[[], None], stay: bool
) -> None:
    status = 1
    try:
        os.read(go, 1)  # wait until the parent has placed us (cgroup)
        become()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(address)
        os.write(ready, b"connected")
        if stay:
            os.read(go, 1)  # returns at EOF: when the parent lets us go
        status = 0
    except BaseException as e:
        os.write(ready, f"child failed: {e!r}".encode())
    finally:
        os._exit(status)


@contextlib.contextmanager
def forked_peer(
    become: Callable[[], None] = lambda: None,
    place: Callable[[int], None] = lambda pid: None,
    *,
    stay: bool = True,
) -> Iterator[ForkedPeer]:
    """Fork a child that runs `become()`, connects to us, and stays until `exit()`.

    Args:
        become: Run in the child before it connects (change uid...).
        place: Run in the parent with the child's pid before the child connects.
        stay: False to have the child exit right after connecting.
    """
    address = f"\0pbtest-identity-{os.getpid()}".encode()  # abstract: any uid may connect
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(address)
        server.listen()
        server.settimeout(CHILD_TIMEOUT)
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(ready_r)
            _run_peer_child(address, go_r, ready_w, become, stay)
        os.close(go_r)
        os.close(ready_w)
        conn = None
        try:
            place(pid)
            os.write(go_w, b"g")
            wait_readable(ready_r, f"child {pid} to connect")
            said = os.read(ready_r, 4096)
            assert said == b"connected", said.decode(errors="replace")
            conn, _ = server.accept()
        except BaseException:
            os.close(go_w)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(ready_r)
        peer = ForkedPeer(pid, conn, go_w)
        try:
            yield peer
        finally:
            peer.close()


def become(uid: int, gid: int, groups: list[int]) -> Callable[[], None]:
    def change() -> None:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    return change


def run_in_child(function: Callable[[], Any]) -> Any:
    """Run `function` in a forked child and return its JSON-able result (or raise)."""
    report = processes.run_in_child(function)
    if "error" in report:
        raise AssertionError(f"in the child: {report['error']}: {report['message']}")
    return report["result"]


def database_groups(user: pwd.struct_passwd) -> frozenset[int]:
    return frozenset(os.getgrouplist(user.pw_name, user.pw_gid))


def new_users(ttl: float | None = None) -> UserDatabase:
    """The user database as the server holds one (its warnings to stderr)."""
    warn = Ledger(Audit(journal=False), time.monotonic).warning
    return UserDatabase(warn) if ttl is None else UserDatabase(warn, ttl=ttl)


def identify(fd: int) -> Peer:
    """The peer on `fd` as the server sees it: the kernel's account, then the user
    database's name and groups, through the server's own calls."""
    return trio.run(new_users().complete, peer_credentials(fd), CHILD_TIMEOUT)


async def names_of(users: UserDatabase, uid: int) -> tuple[str | None, frozenset[int]]:
    """What `users` adds to a peer of `uid` (no groups of its own): name and groups."""
    peer = await users.complete(Peer(pid=0, uid=uid, gid=0), CHILD_TIMEOUT)
    return peer.user, peer.groups


def lookup(users: UserDatabase, uid: int) -> tuple[str | None, frozenset[int]]:
    """`names_of`, from synchronous code."""
    return trio.run(names_of, users, uid)


# --- Peer.with_user ----------------------------------------------------------------------


@pytest.mark.parametrize("mapped", [True, False], ids=["uid-mapped", "uid-unmapped"])
@pytest.mark.parametrize("gid_mapped", [True, False], ids=["gid-mapped", "gid-unmapped"])
def test_with_user_adds_the_user_database_part_and_keeps_the_kernels(
    mapped: bool, gid_mapped: bool
) -> None:
    # An unmapped peer shows as the overflow ids, which the user database calls nobody
    # and nogroup: adding that name and its groups must not make it mapped.
    peer = Peer(pid=7, uid=65534, gid=65534, groups=frozenset({4}), unit="x.service",
                cgroup="/system.slice/x.service", mapped=mapped, gid_mapped=gid_mapped)  # fmt: skip
    named = peer.with_user("nobody", frozenset({65534}))
    assert named == dataclasses.replace(peer, user="nobody", groups=frozenset({4, 65534}))
    assert Rule(uids=frozenset({65534})).match(named) == (
        "uid 65534 is in users" if mapped else None
    )


# --- unit_from_cgroup ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/", None),
        ("", None),
        ("/system.slice", None),
        ("/system.slice/web.service", "web.service"),
        ("/system.slice/web.service/worker", "web.service"),
        ("/system.slice/web.service/a/b/c.scope", "web.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service", "user@1000.service"),
        ("/machine.slice/machine-abc.scope/payload", "machine-abc.scope"),
        ("/a.slice/b.slice/c.slice/deep.service", "deep.service"),
        ("/web.service", "web.service"),
        ("/init.scope", "init.scope"),
        ("/system.slice/web.socket", None),
        ("/system.slice/docker/abc", None),
        ("/lxc.payload.c1/system.slice/web.service", None),
        ("//system.slice//web.service//", "web.service"),
        ("/system.slice/web.service.d/x", None),
    ],
)
def test_unit_from_cgroup(path: str, unit: str | None) -> None:
    assert unit_from_cgroup(path) == unit


# --- cgroup_of ---------------------------------------------------------------------------


def unified_line(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))


def test_cgroup_of_this_process_is_its_unified_cgroup() -> None:
    assert cgroup_of(os.getpid()) == unified_line(os.getpid())


def test_cgroup_of_a_child_is_inherited() -> None:
    with forked_peer() as child:
        assert cgroup_of(child.pid) == cgroup_of(os.getpid())


def test_cgroup_of_a_pid_that_cannot_exist_is_none() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert cgroup_of(pid_max + 1) is None
    assert cgroup_of(0) is None


# --- identify ----------------------------------------------------------------------------


def test_identify_this_process() -> None:
    address = f"\0pbtest-identify-self-{os.getpid()}".encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(address)
        server.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(address)
            conn, _ = server.accept()
            with conn:
                peer = identify(conn.fileno())
                me = pwd.getpwuid(os.geteuid())
                cgroup = cgroup_of(os.getpid())
                assert peer == Peer(
                    pid=os.getpid(),
                    uid=os.geteuid(),
                    gid=os.getegid(),
                    user=me.pw_name,
                    groups=database_groups(me) | {os.getegid()},
                    unit=unit_from_cgroup(cgroup or ""),
                    cgroup=cgroup,
                )
                # The caller keeps its fd: still open, still connected.
                conn.sendall(b"still here")
                assert client.recv(16) == b"still here"


def test_identify_a_socketpair() -> None:
    left, right = socket.socketpair()
    with left, right:
        peer = identify(left.fileno())
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
        os.fstat(left.fileno())


def test_identify_refuses_a_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError, match="Socket operation on non-socket"):
            identify(read_end)
        os.fstat(read_end)  # not closed
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        (socket.AF_UNIX, socket.SOCK_STREAM),
        (socket.AF_INET, socket.SOCK_STREAM),
        (socket.AF_INET6, socket.SOCK_DGRAM),
    ],
    ids=["unconnected-unix", "tcp", "udp"],
)
def test_identify_refuses_a_socket_without_peer_credentials(family: int, kind: int) -> None:
    # The kernel answers SO_PEERCRED for these too, with (uid_t)-1 for "nobody there".
    with socket.socket(family, kind) as sock:
        with pytest.raises(OSError, match="no peer credentials"):
            identify(sock.fileno())
        os.fstat(sock.fileno())  # not closed


@pytest.mark.needs_root
def test_identify_a_child_that_became_another_user() -> None:
    # Its gid differs from www-data's own, and its supplementary group (adm) is not
    # www-data's in the user database: the gid and the process's own groups (recorded
    # by the kernel at connect, SO_PEERGROUPS) count beside the user database's.
    change = become(WWW_DATA.pw_uid, NOGROUP, [ADM])
    with forked_peer(change) as child:
        peer = identify(child.conn.fileno())
        assert (peer.pid, peer.uid, peer.gid) == (child.pid, WWW_DATA.pw_uid, NOGROUP)
        assert peer.user == "www-data"
        assert ADM not in database_groups(WWW_DATA)
        assert peer.groups == database_groups(WWW_DATA) | {NOGROUP, ADM}
        assert peer.mapped
        assert peer.cgroup == cgroup_of(child.pid)
        assert peer.describe().startswith(f"user www-data (uid {WWW_DATA.pw_uid}, pid {child.pid}")


@pytest.mark.needs_root
def test_identify_a_uid_with_no_user_entry() -> None:
    with pytest.raises(KeyError):
        pwd.getpwuid(UNNAMED_UID)
    with forked_peer(become(UNNAMED_UID, UNNAMED_UID, [])) as child:
        peer = identify(child.conn.fileno())
        assert (peer.uid, peer.gid, peer.user) == (UNNAMED_UID, UNNAMED_UID, None)
        assert peer.groups == frozenset({UNNAMED_UID})
        assert peer.describe() == f"unnamed user (uid {UNNAMED_UID}, pid {child.pid})"


@pytest.mark.needs_root
@pytest.mark.parametrize("uid", [2**31, MAX_UID], ids=["2^31", "max"])
def test_identify_uids_beyond_the_signed_range(uid: int) -> None:
    # uid_t is unsigned: ids up to 2^32-2 are valid (user namespaces use high ranges).
    with forked_peer(become(uid, uid, [])) as child:
        peer = identify(child.conn.fileno())
        assert (peer.pid, peer.uid, peer.gid) == (child.pid, uid, uid)
        assert peer.groups == frozenset({uid})


@pytest.mark.needs_root
def test_credentials_are_those_of_connect_time() -> None:
    # The child connects as www-data; what it does afterwards changes nothing.
    with forked_peer(become(WWW_DATA.pw_uid, WWW_DATA.pw_gid, [])) as child:
        child.exit()
        peer = identify(child.conn.fileno())
        assert (peer.pid, peer.uid) == (child.pid, WWW_DATA.pw_uid)


def test_a_peer_that_exited_has_no_unit_and_no_cgroup() -> None:
    with forked_peer(stay=False) as child:
        child.exit()  # a zombie: /proc/PID/cgroup still reads, but the pidfd says exited
        assert cgroup_of(child.pid) is not None
        peer = identify(child.conn.fileno())
        assert (peer.pid, peer.uid, peer.gid) == (child.pid, os.geteuid(), os.getegid())
        assert (peer.unit, peer.cgroup) == (None, None)
        assert child.reap() == 0
        peer = identify(child.conn.fileno())  # reaped: pid may be reused
        assert (peer.pid, peer.uid) == (child.pid, os.geteuid())
        assert (peer.unit, peer.cgroup) == (None, None)


# --- identify in a real cgroup -------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """The mount point of the cgroup2 hierarchy, if it is mounted at its root."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if rest.split()[0] == "cgroup2" and parts[3] == "/":
            return Path(parts[4])
    return None


@pytest.fixture
def cgroup_root() -> Path:
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 hierarchy is mounted here")
    if not os.access(mount / "cgroup.procs", os.W_OK):
        pytest.skip(f"{mount} is not writable here")
    if cgroup_of(os.getpid()) is None:
        pytest.skip("this process has no cgroup2 entry")
    return mount


@contextlib.contextmanager
def made_cgroup(root: Path, *parts: str) -> Iterator[tuple[Path, str]]:
    """Create root/parts... and yield it and its cgroup path; processes left in it are
    moved back to the root and the directories removed afterwards."""
    created: list[Path] = []
    try:
        path = root
        for part in parts:
            path = path / part
            try:
                path.mkdir()
            except OSError as e:
                pytest.skip(f"cannot create a cgroup here: {e}")
            created.append(path)
        yield path, "/" + "/".join(parts)
    finally:
        for made in reversed(created):
            for pid in (made / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(pid)
            made.rmdir()


def placer(cgroup: Path) -> Callable[[int], None]:
    def place(pid: int) -> None:
        (cgroup / "cgroup.procs").write_text(str(pid))

    return place


@pytest.mark.needs_root
@pytest.mark.parametrize(
    ("leaf", "unit"),
    [
        (("web.service",), "web.service"),
        (("web.service", "worker"), "web.service"),
        (("app-7.scope",), "app-7.scope"),
        (("inner.slice", "deep.service"), "deep.service"),
        (("not-a-unit",), None),
    ],
)
def test_identify_a_peer_in_a_real_cgroup(
    cgroup_root: Path, leaf: tuple[str, ...], unit: str | None
) -> None:
    with (
        made_cgroup(cgroup_root, f"pbtest-{os.getpid()}.slice", *leaf) as (path, name),
        forked_peer(place=placer(path)) as child,
    ):
        assert cgroup_of(child.pid) == name
        peer = identify(child.conn.fileno())
        assert (peer.unit, peer.cgroup) == (unit, name)
        if unit:
            assert f"unit {unit}" in peer.describe()


@pytest.mark.needs_root
def test_a_peer_that_left_its_service_is_not_credited_to_it(cgroup_root: Path) -> None:
    # The zombie's /proc entry still says web.service; the pidfd check must win.
    change = become(WWW_DATA.pw_uid, WWW_DATA.pw_gid, [])
    with (
        made_cgroup(cgroup_root, f"pbtest-{os.getpid()}.slice", "web.service") as (path, name),
        forked_peer(change, place=placer(path), stay=False) as child,
    ):
        child.exit()
        assert cgroup_of(child.pid) == name
        peer = identify(child.conn.fileno())
        assert (peer.pid, peer.uid, peer.user) == (child.pid, WWW_DATA.pw_uid, "www-data")
        assert (peer.unit, peer.cgroup) == (None, None)


# --- a /proc/PID/cgroup longer than the broker reads --------------------------------------

LONG_CGROUP_FILE: Final = r"""
import json, os, subprocess, sys, time

pid, limit, unified_root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
SEGMENT = 250  # bytes of a cgroup's name (a file name: 255 at most)
LINE_PATH = 4000  # one line's path (past PATH_MAX, 4096, the kernel shows no file at all)
CUT = "/web.service"
named = []  # (name, mount point, its directories)
unified = []  # directories made in the unified hierarchy

def chain(top, length, suffix, made):
    # Directories below `top`, each named ...suffix, `length` bytes of path in all.
    path, left = top, length
    while left > 0:
        size = min(SEGMENT, left - 1)
        if 0 < left - 1 - size <= len(suffix):  # leave the last one room for its name
            size = left - 2 - len(suffix)
        path += "/" + "p" * (size - len(suffix)) + suffix
        left -= size + 1
        os.mkdir(path)
        made.append(path)
    return path

def place(path):
    with open(path + "/cgroup.procs", "w") as f:
        f.write(str(pid))

def unified_line():
    with open(f"/proc/{pid}/cgroup", "rb") as f:
        data = f.read()
    start = 0 if data.startswith(b"0::") else data.index(b"\n0::") + 1
    return start, data[start + 3 :].split(b"\n")[0].decode()

def mount(name, top):
    return subprocess.run(["mount", "-t", "cgroup", "-o", f"none,name={name}", "cgroup", top],
                          capture_output=True, text=True).returncode == 0

def hierarchy_gone(name):
    with open("/proc/self/cgroup") as f:
        return f":name={name}:" not in f.read()

start, original = unified_line()
try:
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/mnt"], check=True)
    # Named v1 hierarchies with the process 4 KB deep in each, until the unified line
    # (the last) starts a little before the limit.
    while start < limit + 1 - 3000:
        name, top = f"pbtest-{pid}-{len(named)}", f"/mnt/{len(named)}"
        os.mkdir(top)
        if not mount(name, top):
            print(json.dumps({"skip": "cannot make a cgroup v1 hierarchy here (only the "
                              "initial cgroup namespace can, on a kernel with cgroup v1)"}))
            sys.exit(0)
        named.append((name, top, []))
        place(chain(top, min(LINE_PATH, limit + 1 - 1000 - start), "", named[-1][2]))
        start, _ = unified_line()
    # The unified path: slices, then web.service where the limit cuts, then an x.
    path = chain(unified_root, limit + 1 - start - len("0::") - len(CUT), ".slice", unified)
    path += CUT + "x"
    os.mkdir(path)
    unified.append(path)
    place(path)
    print(json.dumps({"unified": path[len(unified_root):]}), flush=True)
    sys.stdin.read()  # until the test is done with it
finally:
    try:
        place(unified_root + original)
        for _, top, _ in named:
            place(top)
    except OSError:
        pass  # it has exited
    for path in reversed(unified):
        os.rmdir(path)
    for name, top, made in reversed(named):
        for path in reversed(made):
            os.rmdir(path)
    # A v1 hierarchy goes at its unmount only if the cgroups removed from it have been
    # released by then (the kernel does that a moment later): mount again what stays.
    deadline = time.monotonic() + 10
    left = named
    while left:
        for _, top, _ in left:
            subprocess.run(["umount", top], check=True)
        settled = time.monotonic() + 0.5
        while time.monotonic() < settled and any(not hierarchy_gone(n) for n, _, _ in left):
            time.sleep(0.02)
        left = [(n, top, made) for n, top, made in left if not hierarchy_gone(n)]
        if time.monotonic() > deadline:
            sys.exit(f"cgroup v1 hierarchies left behind: {[n for n, _, _ in left]}")
        for name, top, _ in left:
            mount(name, top)
"""
"""Run as root in a mount namespace of its own with PID, CGROUP_FILE_MAX and the cgroup2
mount point: puts process PID 4 KB deep in new named cgroup v1 hierarchies until its
/proc/PID/cgroup is nearly CGROUP_FILE_MAX long, then in a cgroup2 path of slices whose
first CGROUP_FILE_MAX + 1 bytes end in "/web.service" and whose whole last name is
"web.servicex"; prints {"unified": that path} (or {"skip": why not}); once its stdin
closes, undoes it all, waiting until each hierarchy has gone."""


@contextlib.contextmanager
def long_cgroup_file(root: Path) -> Iterator[Callable[[int], str]]:
    """Yield `place(pid)`, which makes pid's /proc/PID/cgroup longer than the broker
    reads (LONG_CGROUP_FILE) and returns its whole cgroup2 path; undone afterwards."""
    helpers: list[subprocess.Popen[str]] = []

    def place(pid: int) -> str:
        argv = ["unshare", "--mount", "--propagation=private", SYSTEM_PYTHON, "-I", "-c",
                LONG_CGROUP_FILE, str(pid), str(CGROUP_FILE_MAX), str(root)]  # fmt: skip
        pipe = subprocess.PIPE
        helper = subprocess.Popen(argv, stdin=pipe, stdout=pipe, text=True)
        helpers.append(helper)
        assert helper.stdout is not None
        wait_readable(helper.stdout.fileno(), "the long cgroup file")
        said: dict[str, str] = json.loads(helper.stdout.readline() or "{}")
        if "skip" in said:
            pytest.skip(said["skip"])
        assert "unified" in said, f"the helper failed ({helper.wait(CHILD_TIMEOUT)})"
        return said["unified"]

    try:
        yield place
    finally:
        for helper in helpers:
            assert helper.stdin is not None
            helper.stdin.close()
            assert helper.wait(CHILD_TIMEOUT) == 0
            assert helper.stdout is not None
            helper.stdout.close()


@pytest.mark.needs_root
def test_a_cgroup_file_longer_than_the_read_limit_gives_no_unit(cgroup_root: Path) -> None:
    # Read up to its limit, the file would end in ".../web.service": a peer in
    # web.servicex would pass for web.service. The whole file is refused instead.
    unified: list[str] = []
    with (
        long_cgroup_file(cgroup_root) as make_long,
        forked_peer(place=lambda pid: unified.append(make_long(pid))) as child,
    ):
        data = Path(f"/proc/{child.pid}/cgroup").read_bytes()
        assert len(data) > CGROUP_FILE_MAX  # the kernel gives it whole
        assert data[: CGROUP_FILE_MAX + 1].endswith(b"/web.service")
        assert parse_cgroup_file(data) == unified[0]
        assert unit_from_cgroup(unified[0]) is None
        assert cgroup_of(child.pid) is None
        peer = identify(child.conn.fileno())
        assert (peer.unit, peer.cgroup) == (None, None)
        assert Rule(units=("web.service",)).match(peer) is None


# --- cgroup names that hold line breaks (cgroup v1 and hybrid hosts) ---------------

LINE_BREAKS_BUT_NEWLINE: Final = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
                                  "\u2029"]  # fmt: skip
"""Every line break str.splitlines() knows but "\n", the only one the kernel refuses in
a cgroup name."""


@pytest.mark.parametrize("brk", LINE_BREAKS_BUT_NEWLINE, ids=repr)
def test_a_v1_cgroup_name_cannot_forge_a_unified_line(brk: str) -> None:
    forged = f"9:name=systemd:/user.slice/x{brk}0::/system.slice/web.service\n"
    real = "0::/user.slice/user-1000.slice/session-3.scope\n"
    assert parse_cgroup_file((forged + real).encode()) == real[3:-1]
    # With no unified line (a v1-only host) the name=systemd path is used, whole.
    assert parse_cgroup_file(forged.encode()) == forged.split(":", 2)[2][:-1]
    assert unit_from_cgroup(forged.split(":", 2)[2][:-1]) is None


def test_a_cgroup_name_that_is_not_utf8_matches_no_unit() -> None:
    path = parse_cgroup_file(b"0::/system.slice/web\xff.service\n")
    assert path is not None
    assert unit_from_cgroup(path) != "web.service"


def name_systemd_mount() -> Path | None:
    """The mount point of the cgroup v1 name=systemd hierarchy (hybrid and v1 hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().split("\n"):
        fields, _, rest = line.partition(" - ")
        parts, options = fields.split(), rest.split()
        if (
            options[:1] == ["cgroup"]
            and "name=systemd" in options[-1].split(",")
            and (parts[3] == "/")
        ):
            return Path(parts[4])
    return None


@pytest.mark.needs_root
@pytest.mark.parametrize("brk", LINE_BREAKS_BUT_NEWLINE, ids=repr)
def test_a_peer_in_a_v1_cgroup_named_to_forge_a_unit_gets_no_unit(brk: str) -> None:
    mount = name_systemd_mount()
    if mount is None:
        pytest.skip("no cgroup v1 name=systemd hierarchy here (a cgroup2-only host)")
    rule = Rule(units=("web.service",))
    with (
        made_cgroup(mount, f"pbtest-{os.getpid()}-x{brk}0::web.service") as (path, name),
        forked_peer(become(65533, 65533, []), place=placer(path)) as child,
    ):
        lines = Path(f"/proc/{child.pid}/cgroup").read_bytes().split(b"\n")
        wanted = f":name=systemd:{name}".encode()
        assert any(line.endswith(wanted) for line in lines)  # the kernel kept it whole
        peer = identify(child.conn.fileno())
        assert peer.uid == 65533
        assert peer.unit != "web.service"
        assert rule.match(peer) is None


# --- the user database ---------------------------------------------------------------------


def test_lookup_of_a_real_user() -> None:
    users = new_users()
    assert lookup(users, 0) == ("root", database_groups(pwd.getpwuid(0)))
    assert lookup(users, WWW_DATA.pw_uid) == ("www-data", database_groups(WWW_DATA))


def test_lookup_of_a_uid_with_no_entry() -> None:
    assert lookup(new_users(), UNNAMED_UID) == (None, frozenset())


def with_private_group_file(
    copy: Path, extra_line: str, body: Callable[[Callable[[], None]], Any]
) -> Callable[[], Any]:
    """For a child: enter a private mount namespace, then run `body(change)`, where
    `change()` bind-mounts `copy` (/etc/group plus `extra_line`) over /etc/group."""

    def run() -> Any:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")

        def change() -> None:
            copy.write_text(Path("/etc/group").read_text() + extra_line)
            if libc.mount(bytes(copy), b"/etc/group", None, _MS_BIND, None) != 0:
                raise OSError(ctypes.get_errno(), "mount --bind over /etc/group")

        return body(change)

    return run


@pytest.mark.needs_root
def test_user_database_caches_for_its_ttl_and_then_looks_again(tmp_path: Path) -> None:
    name, uid = WWW_DATA.pw_name, WWW_DATA.pw_uid

    def body(change: Callable[[], None]) -> dict[str, list[int]]:
        cached, fresh = new_users(ttl=3600.0), new_users(ttl=0.0)
        before = [sorted(lookup(cached, uid)[1]), sorted(lookup(fresh, uid)[1])]
        change()
        return {
            "before": before[0],
            "before_fresh": before[1],
            "cached": sorted(lookup(cached, uid)[1]),
            "fresh": sorted(lookup(fresh, uid)[1]),
            "new": sorted(lookup(new_users(), uid)[1]),
        }

    line = f"pbtest:x:{EXTRA_GID}:{name}\n"
    seen = run_in_child(with_private_group_file(tmp_path / "group", line, body))
    original = sorted(database_groups(WWW_DATA))
    assert seen["before"] == seen["before_fresh"] == original
    assert seen["new"] == sorted({*original, EXTRA_GID})  # the change is real...
    assert seen["cached"] == original  # ...but within the ttl the cache answers
    assert seen["fresh"] == sorted({*original, EXTRA_GID})  # ttl 0: always asks again
    assert EXTRA_GID not in database_groups(WWW_DATA)  # the host's file is untouched


@pytest.mark.needs_root
def test_user_database_evicts_the_least_recently_used_past_its_size_limit(
    tmp_path: Path,
) -> None:
    name, uid = WWW_DATA.pw_name, WWW_DATA.pw_uid
    others = iter(range(UNNAMED_UID, UNNAMED_UID + 3 * CACHE_LIMIT))

    def body(change: Callable[[], None]) -> dict[str, bool]:
        return trio.run(evict, change)

    async def evict(change: Callable[[], None]) -> dict[str, bool]:
        users = new_users(ttl=3600.0)
        await names_of(users, uid)
        change()
        for _ in range(CACHE_LIMIT - 1):  # the cache now holds CACHE_LIMIT uids
            await names_of(users, next(others))
        still_cached = EXTRA_GID not in (await names_of(users, uid))[1]  # the most recent
        for _ in range(CACHE_LIMIT - 1):  # evicts the others, older than uid
            await names_of(users, next(others))
        kept = EXTRA_GID not in (await names_of(users, uid))[1]
        for _ in range(CACHE_LIMIT):  # uid is the least recently used: it goes
            await names_of(users, next(others))
        forgot = EXTRA_GID in (await names_of(users, uid))[1]
        return {"still_cached": still_cached, "kept": kept, "forgot": forgot}

    line = f"pbtest:x:{EXTRA_GID}:{name}\n"
    seen = run_in_child(with_private_group_file(tmp_path / "group", line, body))
    assert seen == {"still_cached": True, "kept": True, "forgot": True}


# --- the pidfd fallback and unmapped peers ----------------------------------------


class RefusingSocket:
    """A socket whose SO_PEERPIDFD fails with one errno (what a kernel answers for a
    reaped peer, or without SO_PEERPIDFD); getsockopt is all _peer_pidfd asks of it."""

    def __init__(self, errno_: int) -> None:
        self.errno = errno_

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
        raise OSError(self.errno, os.strerror(self.errno))


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ESRCH, errno.ENODATA])
def test_a_gone_peer_gets_no_pidfd_by_pid(code: int) -> None:
    # Linux 6.5-6.15 answer EINVAL for a reaped peer: a pidfd opened by pid now could
    # name another process that has the same pid since. Our own pid stands for it.
    assert _peer_pidfd(RefusingSocket(code), os.getpid()) is None


def test_a_kernel_without_so_peerpidfd_falls_back_to_pidfd_open() -> None:
    pidfd = _peer_pidfd(RefusingSocket(errno.ENOPROTOOPT), os.getpid())
    assert pidfd is not None
    try:
        assert f"Pid:\t{os.getpid()}" in Path(f"/proc/self/fdinfo/{pidfd}").read_text()
    finally:
        os.close(pidfd)


@pytest.mark.needs_root
def test_a_peer_whose_ids_are_not_mapped_into_our_user_namespace_is_not_mapped() -> None:
    # In a user namespace with no mappings, every peer's uid and gid show as the
    # overflow ids (65534): that is nobody in particular, and must not pass for nobody.
    a, b = socket.socketpair()

    def look() -> dict[str, object]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        overflow_ids.cache_clear()  # this child's user namespace is not its parent's
        peer = trio.run(new_users().complete, peer_credentials(b), CHILD_TIMEOUT)
        nobody = Rule(uids=frozenset({65534}), gids=frozenset({NOGROUP}))
        return {"uid": peer.uid, "gid": peer.gid, "mapped": peer.mapped,
                "gid_mapped": peer.gid_mapped, "user": peer.user,
                "overflow": list(overflow_ids() or ()),
                "by_nobody": nobody.match(peer)}  # fmt: skip

    with a, b:
        seen = processes.run_in_child(look)
    # The user database names the overflow uid "nobody"; the peer still is no one.
    assert seen == {"result": {"uid": 65534, "gid": 65534, "mapped": False,
                               "gid_mapped": False, "user": "nobody",
                               "overflow": [65534, 65534], "by_nobody": None}}  # fmt: skip
    here, there = socket.socketpair()
    with here, there:
        assert peer_credentials(here).mapped  # in the initial user namespace, it is


@pytest.mark.needs_root
def test_a_peer_whose_uid_alone_is_mapped_keeps_its_uid_but_not_the_overflow_gid() -> None:
    # A user namespace that maps root's uid (its own, allowed without privilege in the
    # parent) but no gid: the peer, root, shows as uid 0 and gid 65534.
    a, b = socket.socketpair()

    def look() -> dict[str, object]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        Path("/proc/self/uid_map").write_text("0 0 1\n")
        overflow_ids.cache_clear()
        peer = trio.run(new_users().complete, peer_credentials(b), CHILD_TIMEOUT)
        return {"uid": peer.uid, "gid": peer.gid, "mapped": peer.mapped,
                "gid_mapped": peer.gid_mapped, "groups": sorted(peer.groups),
                "by_uid": Rule(uids=frozenset({0})).match(peer),
                "by_overflow_gid": Rule(gids=frozenset({65534})).match(peer)}  # fmt: skip

    with a, b:
        seen = processes.run_in_child(look)
    # The user database adds root's groups (0), not the overflow gid it shows as.
    assert seen == {"result": {"uid": 0, "gid": 65534, "mapped": True, "gid_mapped": False,
                               "groups": [0], "by_uid": "uid 0 is in users",
                               "by_overflow_gid": None}}  # fmt: skip
