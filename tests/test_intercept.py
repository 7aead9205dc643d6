"""Tests for `broker.intercept`.

The matching rules are pure and tested in-process. Everything else runs real programs
(node, python3 -m http.server, busybox httpd, small Python targets) under a real
supervisor: each scenario gets a private network namespace (`ip netns`), the holder
binds its sockets there as root, then drops to uid 65534 (nobody, no capabilities)
before it supervises, so a held socket is the only way the program can have port 80.

Unprivileged programs use /usr/bin/python3 (the first python3 on PATH may live under
/root, which nobody cannot read) and import a copy of the module from a world-readable
stage directory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.intercept import notes as notes_module
from broker.intercept import seccomp, supervisor
from broker.intercept.bindings import (
    Endpoint,
    Held,
    Inject,
    Pass,
    Refuse,
    decide,
    parse_sockaddr,
    unserved_families,
)
from broker.intercept.notes import FAMILIES_CHECK_DELAY, LINGER_DELAY, Notes
from broker.intercept.supervisor import InterceptError, InterceptUnsupported
from tests.harness.processes import AS_FROM_A_TERMINAL, NOBODY, interception_unsupported
from tests.harness.runtime import ROOT, SYSTEM_PYTHON

NODE = "/usr/bin/node"
BUSYBOX = "/bin/busybox"
HOLDER_BACKLOG = 4096
"""What systemd's Backlog= defaults to; Node asks for 511 when it listens itself."""
STARTUP_TIMEOUT = 90.0
"""Seconds for a program to come up: node cluster starts three node processes, and the
machines running this are shared, noisy 2-core VMs."""
REQUEST_TIMEOUT = 60.0
"""Seconds for one request: it waits in the held socket's backlog until the program
accepts, so it includes the program's start-up."""
EXIT_TIMEOUT = 60.0
"""Seconds for a supervisor to finish once its program has been told to exit."""
QUIET_PERIOD = 1.0
"""Seconds a target waits for a duplicate signal that must not come. A duplicate would
follow within microseconds; waiting longer only makes a missed duplicate less likely."""

PACKAGE = ROOT / "broker"


UNSUPPORTED = interception_unsupported()
needs_kernel = pytest.mark.skipif(UNSUPPORTED is not None, reason=f"{UNSUPPORTED}")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or UNSUPPORTED is not None,
    reason="scenarios need root (to bind port 80 and make network namespaces), ip(8) "
    "and a kernel with seccomp user notifications",
)
needs_node = pytest.mark.skipif(not os.access(NODE, os.X_OK), reason=f"needs {NODE}")
needs_busybox = pytest.mark.skipif(not os.access(BUSYBOX, os.X_OK), reason=f"needs {BUSYBOX}")


# --------------------------------------------------------------------------------------
# Pure matching rules.

V4_ANY = bytes(4)
V6_ANY = bytes(16)
LO4 = socket.inet_pton(socket.AF_INET, "127.0.0.1")
LO6 = socket.inet_pton(socket.AF_INET6, "::1")
TCP = (socket.SOCK_STREAM, socket.IPPROTO_TCP)
UDP = (socket.SOCK_DGRAM, socket.IPPROTO_UDP)


def endpoint(family: int, kind: tuple[int, int], ip: bytes, port: int = 80) -> Endpoint:
    return Endpoint(family, kind[0], kind[1], ip, port)


def test_decide_injects_same_family_on_wildcard() -> None:
    held = [endpoint(socket.AF_INET6, TCP, V6_ANY), endpoint(socket.AF_INET, TCP, V4_ANY)]
    assert decide(held, endpoint(socket.AF_INET, TCP, V4_ANY), "p") == Inject(1)
    assert decide(held, endpoint(socket.AF_INET6, TCP, V6_ANY), "p") == Inject(0)


def test_decide_prefers_exact_address_over_order() -> None:
    held = [endpoint(socket.AF_INET, TCP, V4_ANY), endpoint(socket.AF_INET, TCP, LO4)]
    assert decide(held, endpoint(socket.AF_INET, TCP, LO4), "p") == Inject(1)
    assert decide(held, endpoint(socket.AF_INET, TCP, V4_ANY), "p") == Inject(0)


def test_decide_never_widens_a_specific_address() -> None:
    held = [endpoint(socket.AF_INET, TCP, V4_ANY)]
    decision = decide(held, endpoint(socket.AF_INET, TCP, LO4), "pid 7 (x)")
    assert isinstance(decision, Pass)
    assert decision.note is not None
    assert "127.0.0.1:80" in decision.note
    assert "0.0.0.0:80" in decision.note


def test_decide_refuses_other_family_with_what_to_do() -> None:
    held = [endpoint(socket.AF_INET6, TCP, V6_ANY)]
    decision = decide(held, endpoint(socket.AF_INET, TCP, V4_ANY), "pid 7 (python3)")
    assert isinstance(decision, Refuse)
    assert decision.error == errno.EAFNOSUPPORT
    assert "pid 7 (python3)" in decision.message
    assert "0.0.0.0:80" in decision.message
    assert "[::]:80" in decision.message
    assert "Hold an IPv4 socket for port 80" in decision.message


def test_decide_passes_other_socket_types_silently() -> None:
    held = [endpoint(socket.AF_INET, TCP, V4_ANY)]
    assert decide(held, endpoint(socket.AF_INET, UDP, V4_ANY), "p") == Pass(None)
    sctp = (socket.SOCK_STREAM, 132)  # same type, other protocol
    assert decide(held, endpoint(socket.AF_INET, sctp, V4_ANY), "p") == Pass(None)


SCTP = (socket.SOCK_STREAM, socket.IPPROTO_SCTP)
"""SCTP's one-to-one style: a SOCK_STREAM socket like TCP's, of another protocol."""


def test_decide_never_gives_a_socket_of_another_protocol_on_the_same_port() -> None:
    both = [endpoint(socket.AF_INET, SCTP, V4_ANY), endpoint(socket.AF_INET, TCP, V4_ANY)]
    assert decide(both, endpoint(socket.AF_INET, TCP, V4_ANY), "p") == Inject(1)
    assert decide(both, endpoint(socket.AF_INET, SCTP, V4_ANY), "p") == Inject(0)
    # Only SCTP on the address asked for: TCP's wildcard socket would widen it.
    exact = [endpoint(socket.AF_INET, SCTP, LO4), endpoint(socket.AF_INET, TCP, V4_ANY)]
    assert isinstance(decide(exact, endpoint(socket.AF_INET, TCP, LO4), "p"), Pass)
    # Only SCTP in the family asked for: TCP is held for the other family alone.
    crossed = [endpoint(socket.AF_INET, SCTP, V4_ANY), endpoint(socket.AF_INET6, TCP, V6_ANY)]
    refusal = decide(crossed, endpoint(socket.AF_INET, TCP, V4_ANY), "p")
    assert isinstance(refusal, Refuse)
    assert refusal.error == errno.EAFNOSUPPORT


endpoints = st.builds(
    lambda family, kind, loopback, port: endpoint(
        family, kind, (LO4 if family == socket.AF_INET else LO6) if loopback else
        (V4_ANY if family == socket.AF_INET else V6_ANY), port),
    st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    st.sampled_from([TCP, UDP, SCTP]),
    st.booleans(),
    st.sampled_from([80, 443]),
)  # fmt: skip


@given(st.lists(endpoints, max_size=6), endpoints)
def test_decide_injects_only_what_was_asked_for(held: list[Endpoint], want: Endpoint) -> None:
    """Invariant (the module's "must never"): an injected socket has the family, type
    and protocol of the program's, and its address, or the program asked for any."""
    decision = decide(held, want, "p")
    if isinstance(decision, Inject):
        given_ = held[decision.choice]
        assert given_[:3] == want[:3]
        assert given_.ip == want.ip or want.ip in (V4_ANY, V6_ANY)


def test_decide_matches_datagram_sockets() -> None:
    held = [endpoint(socket.AF_INET, TCP, V4_ANY), endpoint(socket.AF_INET, UDP, V4_ANY)]
    assert decide(held, endpoint(socket.AF_INET, UDP, V4_ANY), "p") == Inject(1)


def held(family: int, port: int, inode: int, *, v6only: bool = False) -> Held:
    """A held socket as the supervisor describes it (its socket object is not needed)."""
    ip = V6_ANY if family == socket.AF_INET6 else V4_ANY
    return Held(cast(socket.socket, None), endpoint(family, TCP, ip, port), v6only, (1, inode))


def test_a_family_left_unserved_is_told_once_after_the_delay() -> None:
    v4, v6 = held(socket.AF_INET, 80, 1), held(socket.AF_INET6, 80, 2, v6only=True)
    notes = Notes({80: [v6, v4]})
    assert notes.timeout_ms(0.0) is None  # nothing taken: nothing to wait for
    assert notes.due(100.0) == []
    notes.took(v4.inode, 10.0)
    assert notes.timeout_ms(10.0) == FAMILIES_CHECK_DELAY * 1000
    notes.took(v4.inode, 11.0)  # the first bind() starts the wait, no later one
    assert notes.due(10.0 + FAMILIES_CHECK_DELAY / 2) == []
    [note] = notes.due(10.0 + FAMILIES_CHECK_DELAY)
    assert note.startswith("the program took the socket held on 0.0.0.0:80 but not the one held")
    assert "on [::]:80: its IPv6 clients connect and wait until they time out" in note
    assert notes.due(100.0) == []  # once
    assert notes.timeout_ms(100.0) is None


@pytest.mark.parametrize("left", [[], [os.getpid()]])
def test_what_the_program_left_running_is_named_once_after_the_delay(
    monkeypatch: pytest.MonkeyPatch, left: list[int]
) -> None:
    monkeypatch.setattr(notes_module, "our_children", lambda: left)  # (this process)
    notes = Notes({})
    notes.exited(3, 5.0)
    assert notes.timeout_ms(5.0) == LINGER_DELAY * 1000
    assert notes.due(5.0 + LINGER_DELAY / 2) == []
    said = notes.due(5.0 + LINGER_DELAY)
    if left:
        [note] = said
        assert note.startswith("the program exited (3); what it started still runs under the ")
        assert note.endswith(f": pid {os.getpid()} ({Path('/proc/self/comm').read_text().strip()})")
    else:
        assert said == []  # nothing left: nothing to say
    assert notes.due(100.0) == []  # and it is not looked for again
    assert notes.timeout_ms(100.0) is None


def test_both_families_taken_or_one_held_is_nothing_to_tell() -> None:
    v4, v6 = held(socket.AF_INET, 80, 1), held(socket.AF_INET6, 80, 2, v6only=True)
    assert unserved_families({80: [v6, v4]}, {v4.inode, v6.inode}) == []
    assert unserved_families({80: [v4]}, {v4.inode}) == []
    assert unserved_families({80: [v6, v4]}, set()) == []  # nothing taken: no program yet
    [note] = unserved_families({80: [v6, v4]}, {v6.inode})
    assert "its IPv4 clients connect" in note


def test_parse_sockaddr_reads_what_the_kernel_reads() -> None:
    v4 = socket.AF_INET.to_bytes(2, "little") + (80).to_bytes(2, "big") + LO4 + bytes(8)
    assert parse_sockaddr(v4) == (socket.AF_INET, LO4, 80)
    assert parse_sockaddr(v4[:15]) is None  # shorter than sockaddr_in: EINVAL
    v6 = socket.AF_INET6.to_bytes(2, "little") + (443).to_bytes(2, "big") + bytes(4) + LO6
    assert parse_sockaddr(v6) == (socket.AF_INET6, LO6, 443)
    assert parse_sockaddr(v6 + bytes(4)) == (socket.AF_INET6, LO6, 443)
    unix = socket.AF_UNIX.to_bytes(2, "little") + b"/run/x.sock\0"
    assert parse_sockaddr(unix) is None


@given(st.binary(max_size=140))
def test_parse_sockaddr_takes_any_bytes(raw: bytes) -> None:
    """Invariant: any bytes from a program parse to an inet address or to None."""
    parsed = parse_sockaddr(raw)
    if parsed is not None:
        family, ip, port = parsed
        assert (family, len(ip)) in {(socket.AF_INET, 4), (socket.AF_INET6, 16)}
        assert 0 <= port < 65536


def test_platform_check_refuses_what_it_does_not_know() -> None:
    seccomp.check_platform("6.18.44-fc-v657", "x86_64", 8)
    seccomp.check_platform("5.9.0-1-amd64", "x86_64", 8)
    for release, machine, size in [
        ("5.8.18", "x86_64", 8),
        ("4.19.0", "x86_64", 8),
        ("garbage", "x86_64", 8),
        ("6.18.0", "aarch64", 8),
        ("6.18.0", "x86_64", 4),
    ]:
        with pytest.raises(InterceptUnsupported, match="LISTEN_FDS"):
            seccomp.check_platform(release, machine, size)


def test_kernel_constants_are_the_documented_numbers() -> None:
    """The ioctl numbers are computed from struct sizes; they must equal the uapi ones."""
    assert seccomp.IOCTL_NOTIF_RECV == 0xC0502100
    assert seccomp.IOCTL_NOTIF_SEND == 0xC0182101
    assert seccomp.IOCTL_NOTIF_ID_VALID == 0x40082102
    assert seccomp.IOCTL_NOTIF_ADDFD == 0x40182103
    assert seccomp.NOTIF.size == 80
    assert len(seccomp.filter_program()) % 8 == 0


# --------------------------------------------------------------------------------------
# In-process: argument checks and process state.


def test_rejects_empty_argv() -> None:
    with pytest.raises(ValueError, match="argv"):
        supervisor.run_intercepted([], [])


def test_rejects_a_held_socket_that_is_not_listening() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(InterceptError, match="not listening"):
            supervisor.run_intercepted(["true"], [("http", sock)])


def test_rejects_a_held_unix_socket() -> None:
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(InterceptError, match="AF_INET"):
        supervisor.run_intercepted(["true"], [("http", sock)])


def _in_a_fresh_process(code: str) -> None:
    """Run `code` in a new single-threaded interpreter (run_intercepted takes over the
    process's signals and children: the test process has threads of its own)."""
    prelude = f"import sys; sys.path[:0] = [{str(ROOT)!r}]\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_refuses_to_run_beside_other_threads() -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(ValueError, match="single-threaded"):
            supervisor.run_intercepted(["true"], [])
    finally:
        stop.set()
        other.join()


@needs_kernel
def test_exec_failure_raises_and_restores_the_process() -> None:
    _in_a_fresh_process("""
        import signal
        from broker.intercept import supervisor
        from tests.harness.processes import child_subreaper
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        handler = signal.getsignal(signal.SIGCHLD)
        try:
            supervisor.run_intercepted(["/nonexistent/program"], [])
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("no FileNotFoundError")
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
        assert signal.getsignal(signal.SIGCHLD) is handler
        assert child_subreaper() == 0
    """)


@needs_kernel
def test_returns_the_status_in_process() -> None:
    _in_a_fresh_process("""
        from broker.intercept import supervisor
        from tests.harness.processes import child_subreaper
        assert supervisor.run_intercepted(["sh", "-c", "exit 0"], []) == 0
        assert supervisor.run_intercepted(["sh", "-c", "exit 42"], []) == 42
        assert child_subreaper() == 0
    """)


@needs_kernel
def test_interception_does_not_nest(tmp_path: Path) -> None:
    """A program under the filter cannot install another: a clear refusal, not a hang."""
    script, out = tmp_path / "nested.py", tmp_path / "out"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from broker.intercept import supervisor
            try:
                supervisor.run_intercepted(["true"], [])
            except supervisor.InterceptUnsupported as exc:
                open({str(out)!r}, "w").write(str(exc))
                sys.exit(3)
            """
        )
    )
    _in_a_fresh_process(f"""
        from broker.intercept import supervisor
        status = supervisor.run_intercepted([{SYSTEM_PYTHON!r}, "-I", {str(script)!r}], [])
        assert status == 3, status
    """)
    assert "do not nest" in out.read_text()


# --------------------------------------------------------------------------------------
# Scenarios: real programs, private network namespaces, an unprivileged supervisor.

RUNNER = '''
"""Hold sockets as root, drop to the target uid, supervise a program (the test's holder)."""
import json, os, socket, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from broker.intercept import supervisor

spec = json.loads(sys.argv[1])
held = []
for h in spec["held"]:
    family = socket.AF_INET6 if h["family"] == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if h.get("type") == "dgram" else socket.SOCK_STREAM
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(h.get("v6only", False)))
    s.bind((h["addr"], h["port"]))
    if kind == socket.SOCK_STREAM:
        s.listen(h.get("backlog", 4096))
    s.setblocking(h.get("blocking", True))
    s.set_inheritable(h.get("inheritable", False))
    held.append((h.get("name", f"held{len(held)}"), s))
mapping = {int(p): name for p, name in (spec.get("mapping") or {}).items()}
uid = spec["uid"]
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff:")][0].split()[1]
assert int(caps, 16) == 0, caps
os.chdir("/")
print("runner: holding", flush=True, file=sys.stderr)  # the test waits for this line
sys.exit(supervisor.run_intercepted(spec["argv"], held, mapping, env=spec["env"]))
'''

COMMON = '''
"""Helpers for the Python targets (run as nobody by /usr/bin/python3)."""
import fcntl, json, os, socket, sys

def report(**fields):
    print(json.dumps(fields), flush=True)

def serve_http(sock, body):
    """Answer one HTTP request on the listening `sock` with `body`."""
    conn, _ = sock.accept()
    with conn:
        conn.setblocking(True)
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        payload = body.encode()
        head = b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(payload)
        conn.sendall(head + payload)

def try_bind(sock, address):
    try:
        sock.bind(address)
    except OSError as exc:
        return exc.errno
    return 0

def nonblocking(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)

def cloexec(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
'''

TARGETS: dict[str, str] = {
    "probe.py": """
        # What the program sees: its credentials, its fds, and a direct bind().
        import errno, os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report, try_bind
        status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
        fds = {}
        for n in os.listdir("/proc/self/fd"):
            try:
                fds[n] = os.readlink(f"/proc/self/fd/{n}")
            except FileNotFoundError:
                pass  # the fd that listdir() itself used
        s = socket.socket()
        report(uid=os.getuid(), cap_eff=status["CapEff"].strip(),
               no_new_privs=status["NoNewPrivs"].strip(), seccomp=status["Seccomp"].strip(),
               fds=fds, bind=try_bind(s, ("0.0.0.0", int(sys.argv[1]))))
    """,
    "relisten.py": """
        # The supervisor looks at each listen() through a copy of the program's fd; a
        # copy kept would keep the program's closed socket bound.
        import os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report, try_bind
        first = socket.socket()
        first.bind(("127.0.0.1", 8080))
        first.listen(5)
        first.close()
        again = socket.socket()
        report(rebind=try_bind(again, ("127.0.0.1", 8080)))
    """,
    "undumpable.py": """
        # A program that forbids inspection keeps the kernel's answer, and is told why.
        import ctypes, os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report, try_bind
        PR_SET_DUMPABLE = 4
        assert ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
        report(bind=try_bind(socket.socket(), ("0.0.0.0", 80)))
    """,
    "nonblock.py": """
        # Pitfall 1: the injected socket must carry the program's own O_NONBLOCK (and
        # close-on-exec flag), whatever the holder's shared file description had.
        import os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import cloexec, nonblocking, report
        a = socket.socket()
        a.setblocking(False)          # event loops (node, asyncio) make sockets non-blocking
        a.bind(("0.0.0.0", 80))       # held blocking
        a.listen(5)
        try:
            a.accept()
            accept = "accepted"
        except BlockingIOError:
            accept = "EAGAIN"
        b = socket.socket()
        b.set_inheritable(True)       # a program that passes its socket to children
        b.bind(("0.0.0.0", 81))       # held non-blocking
        b.listen(5)
        report(a_nonblocking=nonblocking(a.fileno()), a_accept=accept,
               a_cloexec=cloexec(a.fileno()), b_nonblocking=nonblocking(b.fileno()),
               b_cloexec=cloexec(b.fileno()), a_port=a.getsockname()[1],
               b_port=b.getsockname()[1])
    """,
    "family.py": """
        # Pitfall 3: an AF_INET socket must not get a (dual-stack) AF_INET6 one.
        import os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report, try_bind
        report(bind=try_bind(socket.socket(socket.AF_INET), ("0.0.0.0", 80)))
    """,
    "passthrough.py": """
        # Everything that is not a bind() of a held port goes to the kernel unchanged.
        import ctypes, os, socket, struct, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report, serve_http, try_bind
        libc = ctypes.CDLL(None, use_errno=True)
        def raw_bind(fd, addr, length):
            if libc.bind(fd, addr, length) == 0:
                return 0
            return ctypes.get_errno()
        sin80 = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(80), bytes(4))
        devnull = os.open("/dev/null", os.O_RDONLY)
        # Every socket stays referenced: a collected one would close its fd early.
        s, t1, t2, t3, t4 = (socket.socket() for _ in range(5))
        u = socket.socket(socket.AF_UNIX)
        d = socket.socket(type=socket.SOCK_DGRAM)
        result = dict(
            unmapped=try_bind(s, ("0.0.0.0", 8080)),
            unix=try_bind(u, "\\0port-broker-test"),
            bad_pointer=raw_bind(t1.fileno(), ctypes.c_void_p(8), 16),
            bad_fd=raw_bind(999, sin80, len(sin80)),
            not_a_socket=raw_bind(devnull, sin80, len(sin80)),
            short=raw_bind(t2.fileno(), sin80, 8),
            # Longer than any sockaddr (128): the kernel refuses, and so must we.
            long=raw_bind(t4.fileno(), sin80 + bytes(200), len(sin80) + 200),
            other_address=try_bind(t3, ("127.0.0.1", 80)),
            other_type=try_bind(d, ("0.0.0.0", 80)),
        )
        s.listen(7)
        report(**result, port=s.getsockname()[1])
        serve_http(s, f"unmapped pid={os.getpid()}")
    """,
    "x32.py": """
        # x32 ABI syscalls (nr | 0x40000000) are intercepted like native ones, even on a
        # kernel without x32 support (seccomp runs before the syscall table lookup).
        import ctypes, os, socket, struct, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        def x32(nr, *args):
            if libc.syscall(ctypes.c_long(0x40000000 | nr), *args) == 0:
                return 0
            return ctypes.get_errno()
        s = socket.socket()
        sin80 = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(80), bytes(4))
        report(bind=x32(49, s.fileno(), sin80, len(sin80)), port=s.getsockname()[1],
               listen=x32(50, s.fileno(), 5))
    """,
    "udp.py": """
        # A held SOCK_DGRAM socket, injected into a UDP server.
        import os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report
        s = socket.socket(type=socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 53))
        report(ready=True, port=s.getsockname()[1])
        data, peer = s.recvfrom(512)
        s.sendto(b"echo " + data, peer)
    """,
    "options.py": """
        # Pitfall 6 (documented): options set before bind() stay on the replaced socket.
        import os, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        before = s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        s.bind(("0.0.0.0", 80))
        report(before=before, after=s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
    """,
    "forker.py": """
        # Pitfall 4: the filter is inherited; a child's thread (not the thread-group
        # leader) binds. Or (orphan) the program exits and leaves a child that binds.
        import os, signal, socket, sys, threading
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report, serve_http
        mode = sys.argv[1]
        def bind_and_serve(body):
            s = socket.socket()
            s.bind(("0.0.0.0", 80))
            s.listen(16)
            serve_http(s, body)
        if mode == "child-thread":
            pid = os.fork()
            if pid == 0:
                t = threading.Thread(target=lambda: bind_and_serve(
                    f"child pid={os.getpid()} thread={threading.get_native_id()}"))
                t.start()
                t.join()
                os._exit(0)
            report(parent=os.getpid(), child=pid)
            _, status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
        elif mode == "orphan":
            parent = os.getpid()
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
            if os.fork() == 0:
                while os.getppid() == parent:
                    os.sched_yield()
                report(orphan=os.getpid(), ppid=os.getppid())
                signal.sigwait([signal.SIGUSR1])
                bind_and_serve(f"orphan pid={os.getpid()}")
                os._exit(0)
            os._exit(7)
    """,
    "signals.py": """
        # Pitfall 5: signals sent to the supervisor reach the program, once each.
        import os, signal, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report
        names = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTERM"]
        sigs = [getattr(signal, n) for n in names]
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        counts = {n: 0 for n in names}
        report(ready=os.getpid())
        while True:
            info = signal.sigwaitinfo(sigs)
            name = signal.Signals(info.si_signo).name
            counts[name] += 1
            report(got=name, sender=info.si_pid)
            if name == "SIGTERM":
                break
        # Give a duplicate every chance to arrive before reporting the counts.
        while (info := signal.sigtimedwait(sigs, %(quiet)s)) is not None:
            counts[signal.Signals(info.si_signo).name] += 1
        pending = signal.sigpending()
        report(counts=counts, pending=sorted(signal.Signals(s).name for s in pending))
        sys.exit(5)
    """,
    "ttysig.py": """
        # A terminal's ^C reaches the whole foreground process group: the supervisor
        # must not send the program a second SIGINT.
        import os, signal, socket, sys
        sys.path.insert(0, os.path.dirname(__file__))
        from common import report
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        report(ready=os.getpid(), pgrp=os.getpgrp(), sid=os.getsid(0))
        signal.sigwait([signal.SIGINT])
        # A round trip through the supervisor: it has read its own SIGINT by now.
        socket.socket(socket.AF_UNIX).bind("\\0port-broker-tty-test")
        extra = 0
        while signal.sigtimedwait([signal.SIGINT], %(quiet)s) is not None:
            extra += 1
        report(extra=extra)
    """,
}

NODE_SERVER = """
const http = require('http');
const body = () => `node pid=${process.pid} uid=${process.getuid()}\\n`;
const a = http.createServer((req, res) => res.end(body()));
const b = http.createServer((req, res) => res.end(body()));
a.listen(80, () => b.listen(8080, () => console.log(JSON.stringify({ready: true}))));
"""

NODE_CLUSTER = """
const cluster = require('cluster');
const http = require('http');
if (cluster.isPrimary) {
  let listening = 0;
  cluster.on('listening', () => {
    if (++listening === 2) console.log(JSON.stringify({ready: true, primary: process.pid}));
  });
  cluster.fork();
  cluster.fork();
} else {
  http.createServer((req, res) => {
    res.setHeader('Connection', 'close');
    res.end(`worker ${cluster.worker.id} pid=${process.pid}\\n`);
  }).listen(80);
}
"""

CLIENT = '''
"""Run in the namespace as root by the test: send one datagram, print the reply."""
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(type=socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[4]))
s.sendto(payload, (host, port))
print(s.recv(512).decode())
'''


@pytest.fixture(scope="module")
def stage() -> Iterator[Path]:
    """A world-readable directory with the package, the runner and the targets."""
    path = Path(tempfile.mkdtemp(prefix="pb-intercept-"))
    try:
        path.chmod(0o755)
        shutil.copytree(PACKAGE, path / "broker", ignore=shutil.ignore_patterns("__pycache__"))
        for item in [path / "broker", *(path / "broker").iterdir()]:
            item.chmod(0o755 if item.is_dir() else 0o644)
        files = {
            "runner.py": RUNNER,
            "common.py": COMMON,
            "client.py": CLIENT,
            "server.js": NODE_SERVER,
            "cluster.js": NODE_CLUSTER,
        }
        quiet = {"quiet": repr(QUIET_PERIOD)}
        files |= {name: textwrap.dedent(text) % quiet for name, text in TARGETS.items()}
        (path / "www").mkdir(mode=0o755)
        files["www/token.txt"] = "token-from-the-test\n"
        for name, text in files.items():
            (path / name).write_text(text)
            (path / name).chmod(0o644)
        (path / "www").chmod(0o755)
        (path / "logs").mkdir(mode=0o700)
        yield path
    finally:
        shutil.rmtree(path)


_netns_counter = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with lo up; everything left in it is killed after."""
    name = f"pb-intercept-{os.getpid()}-{next(_netns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        )
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=True)


def in_netns(ns: str, *argv: str, timeout: float = REQUEST_TIMEOUT) -> str:
    """Run a command as root inside the namespace; return its stdout."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"{argv} in {ns} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def http_get(ns: str, url: str) -> str:
    return in_netns(ns, "curl", "-sS", "--globoff", "--max-time", f"{REQUEST_TIMEOUT:.0f}", url)


def listen_backlogs(ns: str) -> dict[int, int]:
    """Port -> backlog of every listening TCP socket (ss: Send-Q of a LISTEN socket)."""
    backlogs = {}
    for line in in_netns(ns, "ss", "-Hltn").splitlines():
        _state, _recvq, sendq, local, *_ = line.split()
        backlogs[int(local.rsplit(":", 1)[1])] = int(sendq)
    return backlogs


class Scenario:
    """One supervisor (the runner) in a namespace, with its output in files."""

    def __init__(self, stage: Path, ns: str, name: str) -> None:
        self.stage, self.ns, self.name = stage, ns, name
        self.out_path = stage / "logs" / f"{name}.out"
        self.err_path = stage / "logs" / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self,
        argv: list[str],
        held: list[dict[str, Any]],
        *,
        mapping: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> Scenario:
        spec = {
            "held": held,
            "mapping": mapping,
            "uid": NOBODY,
            "argv": argv,
            "env": {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        }
        runner = [SYSTEM_PYTHON, "-I", str(self.stage / "runner.py"), json.dumps(spec)]
        cmd = [*(wrapper or []), "ip", "netns", "exec", self.ns, *runner]
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=err)
        # Requests before this would find nothing listening.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "runner: holding" not in self.stderr:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.name}: the holder did not start:\n{self.stderr}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def reports(self) -> list[dict[str, Any]]:
        """The JSON lines the target printed."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def wait_for_report(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = STARTUP_TIMEOUT
    ) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            for report in self.reports():
                if predicate(report):
                    return report
            if exited or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        pytest.fail(
            f"{self.name}: no matching report within {timeout:.0f} s "
            f"(status {self.proc.poll()}):\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{self.name}: supervisor still running after {timeout:.0f} s:\n"
                f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
            )

    def kill(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def scenario(
    stage: Path, netns: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Scenario]]:
    made: list[Scenario] = []

    def start(argv: list[str], held: list[dict[str, Any]], **kwargs: Any) -> Scenario:
        name = f"{request.node.name}-{len(made)}".replace("/", "_")
        made.append(Scenario(stage, netns, re.sub(r"[^\w.-]", "_", name)))
        return made[-1].start(argv, held, **kwargs)

    yield start
    for each in made:
        each.close()


def py(stage: Path, script: str, *args: str) -> list[str]:
    return [SYSTEM_PYTHON, "-I", "-u", str(stage / script), *args]


V6_DUAL_80 = {"family": 6, "addr": "::", "port": 80, "backlog": HOLDER_BACKLOG}
V6_ONLY_80 = {"family": 6, "addr": "::", "port": 80, "v6only": True, "backlog": HOLDER_BACKLOG}
V4_80 = {"family": 4, "addr": "0.0.0.0", "port": 80, "backlog": HOLDER_BACKLOG}


@needs_root
def test_nobody_cannot_bind_port_80_itself(netns: str) -> None:
    """The premise: in these namespaces, only a held socket gives nobody port 80."""
    code = (
        "import socket\n"
        "try: socket.socket().bind(('0.0.0.0', 80))\n"
        "except OSError as e: print(e.errno)"
    )
    out = in_netns(
        netns,
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        SYSTEM_PYTHON,
        "-I",
        "-c",
        code,
    )
    assert int(out) == errno.EACCES


@needs_root
def test_program_runs_unprivileged_and_inherits_no_extra_fds(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    """No capabilities, no_new_privs, the filter; no held socket, listener or pipe leaks;
    and a bind() to an unheld privileged port fails as it would without us."""
    held = [V4_80, {"family": 4, "addr": "0.0.0.0", "port": 81, "inheritable": True}]
    run = scenario(py(stage, "probe.py", "79"), held)
    assert run.wait() == 0, run.stderr
    (report,) = run.reports()
    assert report["uid"] == NOBODY
    assert report["cap_eff"] == "0000000000000000"
    assert report["no_new_privs"] == "1"
    assert report["seccomp"] == "2"
    assert sorted(report["fds"]) == ["0", "1", "2"], report["fds"]
    assert report["bind"] == errno.EACCES


@needs_root
def test_the_programs_own_closed_socket_is_not_kept_open(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    run = scenario(py(stage, "relisten.py"), [V4_80])
    assert run.wait() == 0, run.stderr
    assert run.reports() == [{"rebind": 0}]


@needs_root
def test_a_program_that_forbids_inspection_binds_by_itself_and_is_told_why(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    run = scenario(py(stage, "undumpable.py"), [V4_80])
    assert run.wait() == 0, run.stderr
    assert run.reports() == [{"bind": errno.EACCES}]
    assert "its bind() goes to the kernel (it is non-dumpable, or Yama's ptrace_scope " in (
        run.stderr
    )


@needs_root
@needs_node
def test_node_listen_80_keeps_the_holders_backlog(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    """Unmodified node gets port 80 over IPv4 and IPv6 (pitfall 2: its listen(511) on
    the held socket is answered without running, so the holder's 4096 stands)."""
    run = scenario([NODE, str(stage / "server.js")], [V6_DUAL_80])
    assert f"uid={NOBODY}" in http_get(netns, "http://127.0.0.1/")
    assert f"uid={NOBODY}" in http_get(netns, "http://[::1]/")
    run.wait_for_report(lambda r: r.get("ready") is True)
    backlogs = listen_backlogs(netns)
    assert backlogs[80] == HOLDER_BACKLOG
    assert backlogs[8080] == 511  # node's own listen() on an unheld port: untouched
    run.kill(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM


@needs_root
@needs_node
@pytest.mark.parametrize("policy", ["rr", "none"])
def test_node_cluster_workers_serve_the_held_socket(
    stage: Path, scenario: Callable[..., Scenario], netns: str, policy: str
) -> None:
    """Pitfall 4: cluster's primary binds (rr) or its workers listen() (none) on the
    held socket; descendants are served as the program itself is."""
    env_argv = ["/usr/bin/env", f"NODE_CLUSTER_SCHED_POLICY={policy}"]
    run = scenario([*env_argv, NODE, str(stage / "cluster.js")], [V6_DUAL_80])
    ready = run.wait_for_report(lambda r: r.get("ready") is True)
    seen: set[str] = set()
    for _ in range(40):
        body = http_get(netns, "http://127.0.0.1/")
        match = re.match(r"worker (\d+) pid=(\d+)", body)
        assert match, body
        assert int(match[2]) != ready["primary"]
        seen.add(match[1])
        if len(seen) == 2 or policy == "none":  # the kernel need not spread "none"
            break
    assert seen <= {"1", "2"}
    if policy == "rr":
        assert seen == {"1", "2"}
    assert listen_backlogs(netns)[80] == HOLDER_BACKLOG
    run.kill(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM


@needs_root
def test_python_http_server_ipv4_gets_the_ipv4_socket(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    """Pitfall 3: with both families held, an AF_INET server gets the AF_INET socket
    (a dual-stack AF_INET6 one would break CPython's address decoding)."""
    argv = [SYSTEM_PYTHON, "-I", "-m", "http.server", "80", "--directory", str(stage / "www")]
    run = scenario(argv, [V6_ONLY_80, V4_80], wrapper=list(AS_FROM_A_TERMINAL))
    assert http_get(netns, "http://127.0.0.1/token.txt") == "token-from-the-test\n"
    # The IPv6 socket held beside it has nobody accepting under this program: it is told.
    deadline = time.monotonic() + FAMILIES_CHECK_DELAY + STARTUP_TIMEOUT
    unserved = "took the socket held on 0.0.0.0:80 but not the one held on [::]:80"
    while unserved not in run.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "its IPv6 clients connect and wait until they time out" in run.stderr
    run.kill(signal.SIGINT)  # ^C: http.server exits 0 on KeyboardInterrupt
    assert run.wait() == 0
    assert "127.0.0.1" in run.stderr  # its access log decoded the IPv4 peer


@needs_root
def test_python_http_server_dual_stack(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    argv = [SYSTEM_PYTHON, "-I", "-m", "http.server", "80", "--bind", "::"]
    argv += ["--directory", str(stage / "www")]
    run = scenario(argv, [V6_DUAL_80])
    assert http_get(netns, "http://[::1]/token.txt") == "token-from-the-test\n"
    assert http_get(netns, "http://127.0.0.1/token.txt") == "token-from-the-test\n"
    run.kill(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    assert "port-broker" not in run.stderr  # no family or V6ONLY complaint


@needs_root
@needs_busybox
def test_static_busybox_httpd(stage: Path, scenario: Callable[..., Scenario], netns: str) -> None:
    """A statically linked program (no LD_PRELOAD possible) gets the socket too."""
    run = scenario([BUSYBOX, "httpd", "-f", "-p", "80", "-h", str(stage / "www")], [V6_DUAL_80])
    assert http_get(netns, "http://127.0.0.1/token.txt") == "token-from-the-test\n"
    assert http_get(netns, "http://[::1]/token.txt") == "token-from-the-test\n"
    run.kill(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM


@needs_root
def test_family_mismatch_is_refused_with_what_to_do(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    """Pitfall 3: only an IPv6 socket held, an AF_INET bind(): EAFNOSUPPORT and a
    message naming the fix; never the dual-stack socket."""
    run = scenario(py(stage, "family.py"), [V6_DUAL_80])
    assert run.wait() == 0, run.stderr
    assert run.reports() == [{"bind": errno.EAFNOSUPPORT}]
    (line,) = [ln for ln in run.stderr.splitlines() if ln.startswith("port-broker:")]
    assert "0.0.0.0:80" in line
    assert "Hold an IPv4 socket for port 80 too" in line


@needs_root
def test_nonblocking_and_cloexec_follow_the_program(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    """Pitfall 1: O_NONBLOCK lives on the shared file description; it must be the
    program's own, or an event loop blocks in accept() (or a blocking server spins)."""
    held = [V4_80, {"family": 4, "addr": "0.0.0.0", "port": 81, "blocking": False}]
    run = scenario(py(stage, "nonblock.py"), held)
    assert run.wait() == 0, run.stderr
    (report,) = run.reports()
    assert report == {
        "a_nonblocking": True,
        "a_accept": "EAGAIN",
        "a_cloexec": True,
        "b_nonblocking": False,
        "b_cloexec": False,
        "a_port": 80,
        "b_port": 81,
    }


@needs_root
def test_everything_else_goes_to_the_kernel(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    """Unheld ports, AF_UNIX, bad pointers, bad fds, other addresses and types: each
    gets exactly what the kernel says (a note for the address that was not widened)."""
    run = scenario(py(stage, "passthrough.py"), [V4_80])
    report = run.wait_for_report(lambda r: "port" in r)
    assert report == {
        "unmapped": 0,
        "unix": 0,
        "bad_pointer": errno.EFAULT,
        "bad_fd": errno.EBADF,
        "not_a_socket": errno.ENOTSOCK,
        "short": errno.EINVAL,
        "long": errno.EINVAL,
        "other_address": errno.EACCES,
        "other_type": errno.EACCES,
        "port": 8080,
    }
    assert listen_backlogs(netns) == {80: HOLDER_BACKLOG, 8080: 7}  # its listen(7) ran
    assert "unmapped pid=" in http_get(netns, "http://127.0.0.1:8080/")
    assert run.wait() == 0
    notes = [ln for ln in run.stderr.splitlines() if ln.startswith("port-broker:")]
    assert len(notes) == 1
    assert "127.0.0.1:80" in notes[0]
    assert "0.0.0.0:80" in notes[0]


@needs_root
def test_udp_socket_is_injected(stage: Path, scenario: Callable[..., Scenario], netns: str) -> None:
    run = scenario(
        py(stage, "udp.py"), [{"family": 4, "addr": "0.0.0.0", "port": 53, "type": "dgram"}]
    )
    run.wait_for_report(lambda r: r.get("ready") is True)
    client = [SYSTEM_PYTHON, "-I", str(stage / "client.py"), "127.0.0.1", "53", "ping"]
    assert in_netns(netns, *client, str(REQUEST_TIMEOUT)).strip() == "echo ping"
    assert run.wait() == 0


@needs_root
def test_x32_syscalls_are_intercepted_too(stage: Path, scenario: Callable[..., Scenario]) -> None:
    run = scenario(py(stage, "x32.py"), [V4_80])
    assert run.wait() == 0, run.stderr
    assert run.reports() == [{"bind": 0, "port": 80, "listen": 0}]


@needs_root
def test_a_mapping_gives_a_held_socket_for_another_port(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    """A program that insists on 8080 can be given the socket held on 80."""
    run = scenario(py(stage, "passthrough.py"), [V4_80], mapping={"8080": "held0"})
    report = run.wait_for_report(lambda r: "port" in r)
    assert report["unmapped"] == 0
    assert report["port"] == 80  # getsockname() of the injected socket
    assert listen_backlogs(netns) == {80: HOLDER_BACKLOG}  # its listen(7) did not run
    assert "unmapped pid=" in http_get(netns, "http://127.0.0.1:80/")
    assert run.wait() == 0


OWN_NETWORK: Final = """
import json, socket, sys
sock = socket.socket()
sock.bind(("0.0.0.0", 80))  # root of its own user namespace: port 80 of its own network
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as here:
    mine = here.getsockopt(socket.SOL_SOCKET, 71, 8)  # SO_NETNS_COOKIE
print(json.dumps({
    "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "own_network": sock.getsockopt(socket.SOL_SOCKET, 71, 8) == mine,
}), flush=True)
"""


@needs_root
def test_a_bind_in_another_network_namespace_gets_its_own_socket(
    scenario: Callable[..., Scenario],
) -> None:
    """What a container does: its bind(80) in its own network namespace is its own,
    not the host's held socket (which the program's launcher, say rootlessport, serves)."""
    argv = ["unshare", "--user", "--map-root-user", "--net", SYSTEM_PYTHON, "-I", "-c",
            OWN_NETWORK]  # fmt: skip
    run = scenario(argv, [V4_80])
    report = run.wait_for_report(lambda r: "listening" in r)
    assert report == {"listening": 0, "own_network": True}  # not the held, listening one
    assert run.wait() == 0, run.stderr


@needs_root
def test_socket_options_set_before_bind_are_lost(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    """Pitfall 6 (documented, not fixable): the injected socket replaces the one the
    options were set on."""
    run = scenario(py(stage, "options.py"), [V4_80])
    assert run.wait() == 0, run.stderr
    assert run.reports() == [{"before": 1, "after": 0}]


@needs_root
def test_a_forked_childs_thread_is_served(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    """Pitfall 4: the notification names a thread of a grandchild, not the program."""
    run = scenario(py(stage, "forker.py", "child-thread"), [V4_80])
    parent = run.wait_for_report(lambda r: "child" in r)
    body = http_get(netns, "http://127.0.0.1/")
    match = re.fullmatch(r"child pid=(\d+) thread=(\d+)", body)
    assert match, body
    assert int(match[1]) == parent["child"]
    assert int(match[2]) != parent["child"]
    assert run.wait() == 0


@needs_root
def test_supervisor_outlives_the_program_while_descendants_remain(
    stage: Path, scenario: Callable[..., Scenario], netns: str
) -> None:
    """Pitfall 5: the program exits 7 and leaves an orphan, which we adopt (subreaper);
    its later bind() is still served, and our status is the program's."""
    run = scenario(py(stage, "forker.py", "orphan"), [V4_80])
    orphan = run.wait_for_report(lambda r: "orphan" in r)
    assert orphan["ppid"] == run.pid
    assert run.proc is not None
    assert run.proc.poll() is None
    os.kill(orphan["orphan"], signal.SIGUSR1)
    assert http_get(netns, "http://127.0.0.1/") == f"orphan pid={orphan['orphan']}"
    assert run.wait() == 7


@needs_root
@pytest.mark.parametrize(
    ("command", "status"),
    [
        ("exit 3", 3),
        ("kill -KILL $$", 128 + signal.SIGKILL),
        ("ulimit -c 0; kill -SEGV $$", 128 + signal.SIGSEGV),
    ],
)
def test_exit_status_is_the_programs(
    scenario: Callable[..., Scenario], command: str, status: int
) -> None:
    run = scenario(["sh", "-c", command], [])
    assert run.wait() == status


def _got(name: str, report: dict[str, Any]) -> bool:
    return bool(report.get("got") == name)


@needs_root
def test_signals_to_the_supervisor_reach_the_program_once(
    stage: Path, scenario: Callable[..., Scenario]
) -> None:
    run = scenario(py(stage, "signals.py"), [])
    run.wait_for_report(lambda r: "ready" in r)
    names = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTERM"]
    for name in names:
        run.kill(getattr(signal, name))
        run.wait_for_report(functools.partial(_got, name))
    assert run.wait() == 5
    final = run.reports()[-1]
    assert final == {"counts": dict.fromkeys(names, 1), "pending": []}
    senders = {r["sender"] for r in run.reports() if "got" in r}
    assert senders == {run.pid}  # forwarded by the supervisor


def ignored_signals(stdout: str) -> set[int]:
    """The signals that /proc/PID/status's SigIgn line in `stdout` says are ignored."""
    (mask,) = re.findall(r"^SigIgn:\s+([0-9a-f]+)$", stdout, re.MULTILINE)
    return {n for n in range(1, signal.NSIG) if int(mask, 16) >> (n - 1) & 1}


SHELL_SIGNALS: Final = {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE,
                        signal.SIGXFSZ}  # fmt: skip
"""What a shell may leave ignored (HUP, INT, QUIT) and what Python ignores (PIPE, XFSZ)."""


@needs_root
@pytest.mark.parametrize(
    ("wrapper", "ignored"),
    [
        (list(AS_FROM_A_TERMINAL), set()),
        (
            ["env", "--default-signal=HUP", "--ignore-signal=INT,QUIT"],
            {signal.SIGINT, signal.SIGQUIT},
        ),
    ],
    ids=["from-a-terminal", "from-a-background-job"],
)
def test_the_program_keeps_the_dispositions_a_shell_gave_the_supervisor(
    scenario: Callable[..., Scenario], wrapper: list[str], ignored: set[int]
) -> None:
    """A shell starts a background job with SIGINT and SIGQUIT ignored, and exec keeps
    them so: the program gets them as the supervisor got them. What Python itself ignores
    (SIGPIPE, SIGXFSZ) it gets at their defaults, as from a shell."""
    run = scenario(["grep", "^SigIgn:", "/proc/self/status"], [], wrapper=wrapper)
    assert run.wait() == 0, run.stderr
    assert ignored_signals(run.stdout) & SHELL_SIGNALS == ignored


@needs_root
def test_terminal_interrupt_is_not_doubled(stage: Path, scenario: Callable[..., Scenario]) -> None:
    """^C reaches the program from the terminal itself (same process group): the
    supervisor, which gets it too, must not forward a second one."""
    master, slave = os.openpty()
    try:
        run = scenario(py(stage, "ttysig.py"), [], wrapper=["setsid", "--ctty"], stdin=slave)
        ready = run.wait_for_report(lambda r: "ready" in r)
        assert ready["sid"] == ready["pgrp"]  # the supervisor leads session and group
        os.write(master, b"\x03")
        report = run.wait_for_report(lambda r: "extra" in r)
        assert report == {"extra": 0}
        assert run.wait() == 0
    finally:
        os.close(master)
        os.close(slave)
