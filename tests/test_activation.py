"""Tests for `broker.activation`: sockets from systemd, `--bind`, and leaving root.

Real file descriptors of every kind are handed to `intake_fds` as systemd would pass them
(inheritable, in fd order, named); a refusal must name the fd and its name and leave
every fd open and ours. `from_systemd` runs under the real `systemd-socket-activate`.
`drop_privileges` runs in forked children, which report back over a pipe.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import socket
import stat
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest

from broker.daemon.activation import (
    CONTROL_MODE,
    BindSpec,
    Intake,
    bind_all,
    bind_control,
    from_systemd,
    intake_fds,
)
from broker.daemon.privileges import capabilities, drop_privileges
from broker.errors import IntakeError, PrivilegeError
from broker.messages import SocketInfo
from broker.sockets import format_address
from tests.harness.processes import Processes, run_in_child, wait_for

CHILD_TIMEOUT: Final = 30.0
"""Seconds a forked child or systemd-socket-activate gets to report: they take well
under one; a hang should fail the test rather than stall the run."""
SEQPACKET: Final = 5
AF_NETLINK_NUMBER: Final = 16
WWW_DATA: Final = pwd.getpwnam("www-data")

# --- fds as systemd passes them ----------------------------------------------------------


class Fds:
    """Raw fds a test made; closed at the end unless an `Intake` took them."""

    def __init__(self) -> None:
        self.owned: list[int] = []
        self.intakes: list[Intake] = []

    def add(self, thing: socket.socket | int) -> int:
        fd = thing.detach() if isinstance(thing, socket.socket) else thing
        os.set_inheritable(fd, True)  # as systemd passes them
        self.owned.append(fd)
        return fd

    def take(self, fds: Mapping[int, str], *, control: socket.socket | None = None) -> Intake:
        """intake_fds(); on success the Intake owns the fds (closed at the end)."""
        intake = intake_fds(fds, control=control)
        self.intakes.append(intake)
        self.owned = [fd for fd in self.owned if fd not in fds]
        return intake

    def close(self) -> None:
        for intake in self.intakes:
            intake.close()
        for fd in self.owned:
            os.close(fd)


@pytest.fixture
def fds() -> Iterator[Fds]:
    made = Fds()
    try:
        yield made
    finally:
        made.close()


def listening(family: int = socket.AF_INET, address: Any = ("127.0.0.1", 0)) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    return sock


def bound(family: int, address: Any, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.bind(address)
    return sock


def port_of(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as view:
        port: int = view.getsockname()[1]
        return port


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def control_socket(fds: Fds, tmp_path: Path) -> int:
    return fds.add(listening(socket.AF_UNIX, str(tmp_path / "control.sock")))


def refused(fds: Fds, mapping: Mapping[int, str], control: socket.socket | None = None) -> str:
    """Assert intake_fds refuses `mapping` and leaves every fd open and unchanged."""
    before = {fd: identity(fd) for fd in mapping}
    blocking = {fd: os.get_blocking(fd) for fd in mapping}
    with pytest.raises(IntakeError) as caught:
        fds.take(mapping, control=control)
    assert {fd: identity(fd) for fd in mapping} == before  # none closed (or replaced)
    assert {fd: os.get_blocking(fd) for fd in mapping} == blocking
    return caught.value.message


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A port nothing listens on (the session has a network namespace of its own)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# --- intake_fds: refusals ----------------------------------------------------------------


def test_a_pipe_is_refused(fds: Fds, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    fds.add(write_end)
    pipe = fds.add(read_end)
    control = control_socket(fds, tmp_path)
    message = refused(fds, {pipe: "http", control: "control"})
    assert message == (
        f"fd {pipe} (named 'http') is not a socket; check the .socket unit that names it"
    )


def test_a_regular_file_is_refused(fds: Fds, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    fd = fds.add(os.open(path, os.O_RDONLY))
    control = control_socket(fds, tmp_path)
    assert "is not a socket" in refused(fds, {fd: "http", control: "control"})


def test_an_fd_that_is_not_open_is_refused(fds: Fds, tmp_path: Path) -> None:
    control = control_socket(fds, tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nothing opens an fd in between
    os.close(write_end)
    with pytest.raises(IntakeError) as caught:
        fds.take({read_end: "http", control: "control"})
    assert caught.value.message == (
        f"fd {read_end} (named 'http'): not an open file descriptor (Bad file descriptor)"
    )
    os.fstat(control)


def test_an_unbound_tcp_socket_is_refused(fds: Fds, tmp_path: Path) -> None:
    tcp = fds.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    control = control_socket(fds, tmp_path)
    assert refused(fds, {tcp: "http", control: "control"}) == (
        f"fd {tcp} (named 'http') (0.0.0.0:0) is a stream socket that is not listening"
    )


def test_a_bound_tcp_socket_that_does_not_listen_is_refused(fds: Fds, tmp_path: Path) -> None:
    tcp = fds.add(bound(socket.AF_INET6, ("::1", 0), socket.SOCK_STREAM))
    control = control_socket(fds, tmp_path)
    assert refused(fds, {control: "control", tcp: "http"}) == (
        f"fd {tcp} (named 'http') ([::1]:{port_of(tcp)}) is a stream socket that is not listening"
    )


@pytest.mark.parametrize(
    "family", [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX], ids=["inet", "inet6", "unix"]
)
def test_an_unbound_datagram_socket_is_refused(fds: Fds, tmp_path: Path, family: int) -> None:
    udp = fds.add(socket.socket(family, socket.SOCK_DGRAM))
    control = control_socket(fds, tmp_path)
    assert refused(fds, {udp: "dns", control: "control"}) == (
        f"fd {udp} (named 'dns') is a datagram socket that is not bound to a port"
    )


def test_a_seqpacket_socket_is_refused(fds: Fds, tmp_path: Path) -> None:
    seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seq.bind(str(tmp_path / "seq.sock"))
    seq.listen()
    fd = fds.add(seq)
    control = control_socket(fds, tmp_path)
    assert refused(fds, {fd: "http", control: "control"}) == (
        f"fd {fd} (named 'http') has socket type {SEQPACKET}; port-broker serves stream "
        "(ListenStream=) and datagram (ListenDatagram=) sockets"
    )


def test_a_socket_of_another_family_is_refused(fds: Fds, tmp_path: Path) -> None:
    netlink = fds.add(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
    control = control_socket(fds, tmp_path)
    assert refused(fds, {netlink: "nl", control: "control"}) == (
        f"fd {netlink} (named 'nl') has address family {AF_NETLINK_NUMBER}; port-broker "
        "serves IPv4, IPv6 and Unix sockets"
    )


def test_a_tcp_control_socket_is_refused(fds: Fds) -> None:
    tcp = fds.add(listening())
    assert refused(fds, {tcp: "control"}) == (
        f"fd {tcp} (named 'control'): the control socket must be a Unix stream socket "
        f"(ListenStream=/run/port-broker.sock), not inet stream 127.0.0.1:{port_of(tcp)}"
    )


def test_a_datagram_control_socket_is_refused(fds: Fds, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    dgram = fds.add(bound(socket.AF_UNIX, str(path)))
    assert refused(fds, {dgram: "control"}).endswith(f"not unix datagram {path}")


def test_no_control_socket_is_refused(fds: Fds) -> None:
    http, https = fds.add(listening()), fds.add(listening())
    assert refused(fds, {http: "http", https: "https"}) == (
        "no control socket: no fd is named 'control'; start port-broker.socket "
        "(FileDescriptorName=control) with the broker, or pass --control PATH"
    )
    assert refused(fds, {}).startswith("no control socket")


def test_two_control_sockets_are_refused(fds: Fds, tmp_path: Path) -> None:
    first = control_socket(fds, tmp_path)
    second = fds.add(listening(socket.AF_UNIX, str(tmp_path / "other.sock")))
    http = fds.add(listening())
    assert refused(fds, {first: "control", http: "http", second: "control"}) == (
        f"fd {second}: more than one socket is named 'control'; only port-broker.socket may be"
    )


def test_a_control_fd_as_well_as_a_bound_control_is_refused(fds: Fds, tmp_path: Path) -> None:
    passed = control_socket(fds, tmp_path)
    with listening(socket.AF_UNIX, str(tmp_path / "ours.sock")) as ours:
        message = refused(fds, {passed: "control"}, control=ours)
        assert ours.fileno() >= 0
    assert message.startswith(f"fd {passed}: more than one socket is named 'control'")


@pytest.mark.parametrize("name", ["unknown", ""])
def test_an_unnamed_fd_is_refused(fds: Fds, tmp_path: Path, name: str) -> None:
    http = fds.add(listening())
    control = control_socket(fds, tmp_path)
    assert refused(fds, {control: "control", http: name}) == (
        f"fd {http} has no name: set FileDescriptorName= in the .socket unit that passes "
        "it (e.g. FileDescriptorName=http)"
    )


@pytest.mark.parametrize("name", ["a b", "-http", "h" * 65, "caf\u00e9", "a,b"])
def test_an_invalid_name_is_refused(fds: Fds, tmp_path: Path, name: str) -> None:
    http = fds.add(listening())
    control = control_socket(fds, tmp_path)
    assert refused(fds, {control: "control", http: name}) == (
        f"fd {http} is named {name!r}, which is not a valid socket name (letters, digits, "
        "'_.@-', up to 64 characters)"
    )


def test_good_sockets_checked_before_a_bad_one_stay_open_and_ours(fds: Fds, tmp_path: Path) -> None:
    http = fds.add(listening())
    control = control_socket(fds, tmp_path)
    read_end, write_end = os.pipe()
    fds.add(write_end)
    pipe = fds.add(read_end)
    message = refused(fds, {http: "http", control: "control", pipe: "https"})
    assert message.startswith(f"fd {pipe} (named 'https') is not a socket")
    # Still listening sockets we can use: connect to one and accept on it.
    with (
        socket.socket(fileno=os.dup(http)) as view,
        socket.create_connection(("127.0.0.1", port_of(http))),
    ):
        conn, _ = view.accept()
        conn.close()


# --- intake_fds: what it takes ----------------------------------------------------------


def test_stream_sockets_of_every_family_are_taken(fds: Fds, tmp_path: Path) -> None:
    inet = fds.add(listening())
    inet6 = fds.add(listening(socket.AF_INET6, ("::1", 0)))
    path = tmp_path / "web.sock"
    unix = fds.add(listening(socket.AF_UNIX, str(path)))
    abstract = fds.add(listening(socket.AF_UNIX, f"\0pbtest-{os.getpid()}"))
    control = control_socket(fds, tmp_path)
    intake = fds.take({inet: "a", inet6: "b", unix: "c", abstract: "d@x", control: "control"})
    assert intake.control.fileno() == control  # the very fd, not a copy
    assert {
        name: [(h.sock.fileno(), h.info) for h in held] for name, held in intake.held.items()
    } == {
        "a": [(inet, SocketInfo("a", "inet", "stream", f"127.0.0.1:{port_of(inet)}"))],
        "b": [(inet6, SocketInfo("b", "inet6", "stream", f"[::1]:{port_of(inet6)}"))],
        "c": [(unix, SocketInfo("c", "unix", "stream", str(path)))],
        "d@x": [(abstract, SocketInfo("d@x", "unix", "stream", f"@pbtest-{os.getpid()}"))],
    }
    assert all(h.name == name for name, held in intake.held.items() for h in held)


def test_bound_datagram_sockets_are_taken(fds: Fds, tmp_path: Path) -> None:
    udp = fds.add(bound(socket.AF_INET, ("127.0.0.1", 0)))
    udp6 = fds.add(bound(socket.AF_INET6, ("::1", 0)))
    path = tmp_path / "dns:0"  # a path may end in ":0" and still be bound
    unix = fds.add(bound(socket.AF_UNIX, str(path)))
    control = control_socket(fds, tmp_path)
    intake = fds.take({udp: "dns", udp6: "dns6", unix: "local", control: "control"})
    assert [h.info for held in intake.held.values() for h in held] == [
        SocketInfo("dns", "inet", "datagram", f"127.0.0.1:{port_of(udp)}"),
        SocketInfo("dns6", "inet6", "datagram", f"[::1]:{port_of(udp6)}"),
        SocketInfo("local", "unix", "datagram", str(path)),
    ]


def test_fds_sharing_a_name_are_grouped_in_fd_order(fds: Fds, tmp_path: Path) -> None:
    control = control_socket(fds, tmp_path)
    inet6 = fds.add(listening(socket.AF_INET6, ("::1", 0)))
    inet = fds.add(listening())
    other = fds.add(listening())
    intake = fds.take({control: "control", inet6: "http", other: "https", inet: "http"})
    assert [h.sock.fileno() for h in intake.held["http"]] == [inet6, inet]
    assert [h.info.family for h in intake.held["http"]] == ["inet6", "inet"]
    assert [h.sock.fileno() for h in intake.held["https"]] == [other]


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "non-blocking"])
def test_blocking_mode_is_left_as_it_was(fds: Fds, tmp_path: Path, blocking: bool) -> None:
    # The open file description is shared with systemd and every worker: hands off.
    sockets = [fds.add(listening()), fds.add(bound(socket.AF_INET, ("127.0.0.1", 0)))]
    control = control_socket(fds, tmp_path)
    for fd in [*sockets, control]:
        os.set_blocking(fd, blocking)
    fds.take({sockets[0]: "http", sockets[1]: "dns", control: "control"})
    assert [os.get_blocking(fd) for fd in [*sockets, control]] == [blocking] * 3


def test_taken_fds_become_close_on_exec(fds: Fds, tmp_path: Path) -> None:
    http = fds.add(listening())
    control = control_socket(fds, tmp_path)
    assert os.get_inheritable(http)
    assert os.get_inheritable(control)
    fds.take({http: "http", control: "control"})
    assert not os.get_inheritable(http)
    assert not os.get_inheritable(control)


def test_a_control_socket_bound_by_us_may_stand_in(fds: Fds, tmp_path: Path) -> None:
    http = fds.add(listening())
    ours = listening(socket.AF_UNIX, str(tmp_path / "ours.sock"))
    intake = fds.take({http: "http"}, control=ours)
    assert intake.control is ours
    assert list(intake.held) == ["http"]


def test_closing_an_intake_closes_every_socket(fds: Fds, tmp_path: Path) -> None:
    http, dns = fds.add(listening()), fds.add(bound(socket.AF_INET, ("127.0.0.1", 0)))
    control = control_socket(fds, tmp_path)
    intake = fds.take({http: "http", dns: "dns", control: "control"})
    fds.intakes.remove(intake)
    intake.close()
    for fd in (http, dns, control):
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


# --- format_address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "address", "text"),
    [
        (socket.AF_INET, ("127.0.0.1", 80), "127.0.0.1:80"),
        (socket.AF_INET, ("0.0.0.0", 0), "0.0.0.0:0"),
        (socket.AF_INET6, ("::", 443, 0, 0), "[::]:443"),
        (socket.AF_INET6, ("fe80::1%lo", 8080, 0, 1), "[fe80::1%lo]:8080"),
        (socket.AF_UNIX, "/run/port-broker.sock", "/run/port-broker.sock"),
        (socket.AF_UNIX, b"\0port-broker", "@port-broker"),
        (socket.AF_UNIX, b"\0\xff", "@\ufffd"),
        (socket.AF_UNIX, "", "(unnamed)"),
    ],
)
def test_format_address(family: int, address: object, text: str) -> None:
    assert format_address(family, address) == text


# --- BindSpec.parse ----------------------------------------------------------------------

STREAM, DGRAM = socket.SOCK_STREAM, socket.SOCK_DGRAM
INET, INET6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("http=80", BindSpec("http", INET6, STREAM, ("::", 80))),
        ("http=[::]:80", BindSpec("http", INET6, STREAM, ("::", 80))),
        ("http=[::1]:8080", BindSpec("http", INET6, STREAM, ("::1", 8080))),
        ("http=0.0.0.0:80", BindSpec("http", INET, STREAM, ("0.0.0.0", 80))),
        ("http=127.0.0.1:65535", BindSpec("http", INET, STREAM, ("127.0.0.1", 65535))),
        ("http=tcp:127.0.0.1:1", BindSpec("http", INET, STREAM, ("127.0.0.1", 1))),
        ("quic=udp:[::]:443", BindSpec("quic", INET6, DGRAM, ("::", 443))),
        ("dns=udp:53", BindSpec("dns", INET6, DGRAM, ("::", 53))),
        ("dns=udp:127.0.0.1:53", BindSpec("dns", INET, DGRAM, ("127.0.0.1", 53))),
        ("web=/run/web.sock", BindSpec("web", UNIX, STREAM, "/run/web.sock")),
        ("web=@web", BindSpec("web", UNIX, STREAM, "\0web")),
        ("log=udp:/run/log.sock", BindSpec("log", UNIX, DGRAM, "/run/log.sock")),
        ("a.b_c@d-e=80", BindSpec("a.b_c@d-e", INET6, STREAM, ("::", 80))),
    ],
)
def test_bind_spec_parse(spec: str, parsed: BindSpec) -> None:
    assert BindSpec.parse(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    ["http", "=80", "control=80", "a b=80", "-x=80", "caf\u00e9=80", ""],
)
def test_bind_spec_needs_a_grantable_name(spec: str) -> None:
    with pytest.raises(IntakeError) as caught:
        BindSpec.parse(spec)
    assert caught.value.message == (
        f"--bind {spec!r}: expected NAME=ADDRESS with a socket name other than 'control', "
        "e.g. http=[::]:80"
    )


@pytest.mark.parametrize(
    ("spec", "address"),
    [
        ("http=", ""),
        ("http=0", "0"),
        ("http=65536", "65536"),
        ("http=127.0.0.1:0", "127.0.0.1:0"),
        ("http=127.0.0.1:-1", "127.0.0.1:-1"),
        ("http=127.0.0.1:http", "127.0.0.1:http"),
        ("http=localhost:80", "localhost:80"),
        ("http=:80", ":80"),
        ("http=[::1]", "[::1]"),
        ("http=::1:80", "::1:80"),
        ("http=[127.0.0.1]:80", "[127.0.0.1]:80"),
        ("http=256.0.0.1:80", "256.0.0.1:80"),
        ("quic=udp:", ""),
        ("quic=udp:[::]", "[::]"),
    ],
)
def test_bind_spec_needs_a_valid_address(spec: str, address: str) -> None:
    with pytest.raises(IntakeError) as caught:
        BindSpec.parse(spec)
    assert caught.value.message == (
        f"--bind {spec!r}: {address!r} is not HOST:PORT, [HOST]:PORT, PORT or a /path "
        "(add udp: for a datagram socket)"
    )


# --- binding without systemd -------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bind_all_binds_every_kind_and_the_control_socket(tmp_path: Path) -> None:
    port, udp_port = free_port(), free_port()
    specs = [
        BindSpec.parse(f"http=127.0.0.1:{port}"),
        BindSpec.parse(f"http=[::1]:{port}"),
        BindSpec.parse(f"dns=udp:127.0.0.1:{udp_port}"),
        BindSpec.parse(f"web={tmp_path / 'web.sock'}"),
    ]
    control_path = tmp_path / "control.sock"
    intake = bind_all(specs, str(control_path))
    try:
        assert {name: [h.info for h in held] for name, held in intake.held.items()} == {
            "http": [
                SocketInfo("http", "inet", "stream", f"127.0.0.1:{port}"),
                SocketInfo("http", "inet6", "stream", f"[::1]:{port}"),
            ],
            "dns": [SocketInfo("dns", "inet", "datagram", f"127.0.0.1:{udp_port}")],
            "web": [SocketInfo("web", "unix", "stream", str(tmp_path / "web.sock"))],
        }
        assert stat.S_IMODE(control_path.stat().st_mode) == CONTROL_MODE == 0o666
        for held in (h for hs in intake.held.values() for h in hs):  # as NonBlocking=yes
            assert fcntl.fcntl(held.sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK, held.info
        for held in intake.held["http"]:
            host = "::1" if held.info.family == "inet6" else "127.0.0.1"
            with socket.create_connection((host, port)):
                conn, _ = held.sock.accept()
                conn.close()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(control_path))
            conn, _ = intake.control.accept()
            conn.close()
    finally:
        intake.close()


@pytest.mark.needs_root
def test_a_bare_port_is_dual_stack_and_may_be_privileged(tmp_path: Path) -> None:
    intake = bind_all([BindSpec.parse("http=80")], str(tmp_path / "control.sock"))
    try:
        [held] = intake.held["http"]
        assert held.info == SocketInfo("http", "inet6", "stream", "[::]:80")
        for host in ("127.0.0.1", "::1"):  # IPv4 too: IPV6_V6ONLY is off, as systemd's
            with socket.create_connection((host, 80)):
                conn, _ = held.sock.accept()
                conn.close()
    finally:
        intake.close()


def test_bind_all_closes_what_it_bound_when_a_later_spec_fails(tmp_path: Path) -> None:
    first_port, taken_port = free_port(), free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken_port))
        squatter.listen()
        before = fd_count()
        specs = [
            BindSpec.parse(f"a=127.0.0.1:{first_port}"),
            BindSpec.parse(f"b=127.0.0.1:{taken_port}"),
        ]
        with pytest.raises(IntakeError) as caught:
            bind_all(specs, str(tmp_path / "control.sock"))
        assert caught.value.message == (
            f"--bind b=127.0.0.1:{taken_port}: Address already in use: something else "
            "holds it (see ss -ltnp)"
        )
        assert fd_count() == before
        assert not (tmp_path / "control.sock").exists()
    with socket.socket() as again:  # the first port is free again: its socket was closed
        again.bind(("127.0.0.1", first_port))
        again.listen()


def test_bind_all_closes_everything_when_the_control_socket_fails(tmp_path: Path) -> None:
    port = free_port()
    blocker = tmp_path / "control.sock"
    blocker.write_text("not a socket")
    before = fd_count()
    with pytest.raises(IntakeError, match="exists and is not a socket"):
        bind_all([BindSpec.parse(f"http=127.0.0.1:{port}")], str(blocker))
    assert fd_count() == before
    assert blocker.read_text() == "not a socket"
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_binding_a_unix_path_that_exists_fails_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    path.write_text("")
    with pytest.raises(IntakeError) as caught:
        BindSpec.parse(f"web={path}").bind()
    assert caught.value.message == f"--bind web={path}: Address already in use: something " + (
        "else holds it (see ss -ltnp)"
    )


# --- bind_control ------------------------------------------------------------------------


def test_bind_control_listens_with_mode_0666(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    old_umask = os.umask(0o077)
    try:
        sock = bind_control(str(path))
    finally:
        os.umask(old_umask)
    with sock:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert (sock.family, sock.type) == (socket.AF_UNIX, socket.SOCK_STREAM)


def test_bind_control_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # left behind by a broker that is gone
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
        client.connect(str(path))
    with bind_control(str(path)) as sock, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        conn, _ = sock.accept()
        conn.close()


def test_bind_control_refuses_a_live_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with listening(socket.AF_UNIX, str(path)) as live:
        inode = path.stat().st_ino
        with pytest.raises(IntakeError) as caught:
            bind_control(str(path))
        assert caught.value.message == f"--control {path}: another broker is listening there"
        assert path.stat().st_ino == inode  # left alone, and still serving
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            conn, _ = live.accept()
            conn.close()


@pytest.mark.parametrize("kind", ["file", "directory", "fifo"])
def test_bind_control_refuses_to_replace_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "control.sock"
    if kind == "file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(IntakeError) as caught:
        bind_control(str(path))
    assert caught.value.message == (
        f"--control {path}: exists and is not a socket; refusing to replace it"
    )
    assert path.exists()
    if kind == "file":
        assert path.read_text() == "keep me"


def test_bind_control_in_a_missing_directory_fails(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "control.sock"
    with pytest.raises(IntakeError) as caught:
        bind_control(str(path))
    assert caught.value.message == f"--control {path}: cannot bind: No such file or directory"


# --- leaving root ------------------------------------------------------------------------


def report_after_dropping(user: str) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        entry = drop_privileges(user)
        try:
            os.setuid(0)
            back_to_root = True
        except PermissionError:
            back_to_root = False
        try:
            socket.socket().bind(("127.0.0.1", 80))
            bind_80 = 0
        except OSError as e:
            bind_80 = e.errno or 0
        status = Path("/proc/self/status").read_text()
        no_new_privs = re.search(r"^NoNewPrivs:\s*(\d)$", status, re.MULTILINE)
        return {
            "name": entry.name,
            "uids": list(os.getresuid()),
            "gids": list(os.getresgid()),
            "groups": sorted(os.getgroups()),
            "caps": capabilities(),
            "no_new_privs": no_new_privs.group(1) if no_new_privs else None,
            "back_to_root": back_to_root,
            "bind_80": bind_80,
        }

    return run


@pytest.mark.needs_root
@pytest.mark.parametrize("user", ["www-data", str(WWW_DATA.pw_uid)], ids=["name", "uid"])
def test_drop_privileges_leaves_root_for_good(user: str) -> None:
    report = run_in_child(report_after_dropping(user))
    uid, gid = WWW_DATA.pw_uid, WWW_DATA.pw_gid
    assert report == {
        "result": {
            "name": "www-data",
            "uids": [uid] * 3,
            "gids": [gid] * 3,
            "groups": sorted(set(os.getgrouplist("www-data", gid))),
            "caps": {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0},
            "no_new_privs": "1",
            "back_to_root": False,
            "bind_80": errno.EACCES,
        }
    }


@pytest.mark.needs_root
@pytest.mark.parametrize(
    ("user", "gid"), [("65532", 65532), ("65532:65533", 65533)], ids=["uid", "uid:gid"]
)
def test_drop_privileges_to_a_uid_the_user_database_does_not_know(user: str, gid: int) -> None:
    # A container's user (distroless's nonroot is 65532): ids as given, no groups.
    with pytest.raises(KeyError):
        pwd.getpwuid(65532)
    report = run_in_child(report_after_dropping(user))
    assert report["result"]["name"] == "65532"
    assert report["result"]["uids"] == [65532] * 3
    assert report["result"]["gids"] == [gid] * 3
    assert report["result"]["groups"] == []
    assert report["result"]["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
    assert (report["result"]["back_to_root"], report["result"]["bind_80"]) == (
        False,
        errno.EACCES,
    )


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("pbtest-no-such-user", "--user pbtest-no-such-user: no such user"),
        ("4294967295", "--user 4294967295: ids go from 0 to 4294967294"),
        ("99999999999999999999", "--user 99999999999999999999: ids go from 0 to 4294967294"),
        ("65532:x", "--user 65532:x: give NAME, UID or UID:GID"),
        ("0:65534", "--user 0:65534: is root; give an unprivileged user"),
        ("\u00b2", "--user \u00b2: no such user"),
        ("root", "--user root: is root; give an unprivileged user"),
        ("0", "--user 0: is root; give an unprivileged user"),
    ],
)
def test_drop_privileges_refuses_before_changing_anything(user: str, message: str) -> None:
    report = run_in_child(report_after_dropping(user))
    assert report == {"error": "PrivilegeError", "message": message}
    ids = (os.getresuid(), os.getresgid(), os.getgroups())
    with pytest.raises(PrivilegeError, match=re.escape(message)):
        drop_privileges(user)  # here in the test process too: nothing changed
    assert (os.getresuid(), os.getresgid(), os.getgroups()) == ids


@pytest.mark.needs_root
def test_drop_privileges_needs_root() -> None:
    def run() -> Any:
        os.setresuid(65534, 65534, 65534)
        return report_after_dropping("www-data")()

    assert run_in_child(run) == {
        "error": "PrivilegeError",
        "message": "--user www-data: only root can change user; run serve as root",
    }


# --- from systemd ------------------------------------------------------------------------

REPORT_SCRIPT = textwrap.dedent("""
    import ctypes, json, os, sys
    from broker.daemon.activation import from_systemd
    from broker.errors import IntakeError
    try:
        intake = from_systemd()
    except IntakeError as e:
        print(json.dumps({"error": e.message}))
        sys.exit(78)
    def describe(sock):
        return [sock.fileno(), os.get_inheritable(sock.fileno()), os.get_blocking(sock.fileno())]
    print(json.dumps({
        "held": {name: [[*describe(h.sock), h.info.family, h.info.type, h.info.address]
                        for h in held] for name, held in intake.held.items()},
        "control": [*describe(intake.control), intake.control.getsockname()],
        "env": [k for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
                if ctypes.CDLL(None).getenv(k.encode())],
    }))
""")


def socket_activate(
    processes: Processes,
    listen: list[str],
    trigger: Path,
    options: tuple[str, ...] = (),
    trigger_type: int = socket.SOCK_STREAM,
) -> tuple[int, dict[str, Any]]:
    """Run REPORT_SCRIPT under systemd-socket-activate; connect to `trigger` to start it."""
    argv = ["systemd-socket-activate", *options]
    for address in listen:
        argv += ["-l", address]
    proc = processes.start([*argv, sys.executable, "-c", REPORT_SCRIPT])
    wait_for(trigger.exists, f"{trigger} to appear", CHILD_TIMEOUT)
    with socket.socket(socket.AF_UNIX, trigger_type) as client:
        client.connect(str(trigger))  # systemd-socket-activate execs on the first one
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert out, err
    report: dict[str, Any] = json.loads(out)
    return proc.returncode, report


def test_from_systemd_takes_what_systemd_socket_activate_passes(
    processes: Processes, tmp_path: Path
) -> None:
    port = free_port()
    control = tmp_path / "control.sock"
    status, report = socket_activate(
        processes,
        [f"127.0.0.1:{port}", f"[::1]:{port}", str(control)],
        control,
        ("--fdname=http:http:control",),
    )
    assert status == 0
    assert report == {
        "held": {
            "http": [
                [3, False, True, "inet", "stream", f"127.0.0.1:{port}"],
                [4, False, True, "inet6", "stream", f"[::1]:{port}"],
            ]
        },
        "control": [5, False, True, str(control)],
        "env": [],  # LISTEN_* unset (in the C environment children inherit)
    }


def test_from_systemd_refuses_a_socket_of_the_wrong_type(
    processes: Processes, tmp_path: Path
) -> None:
    http, control = tmp_path / "http.sock", tmp_path / "control.sock"
    status, report = socket_activate(
        processes,
        [str(http), str(control)],
        http,
        ("--seqpacket", "--fdname=http:control"),
        socket.SOCK_SEQPACKET,
    )
    assert (status, report) == (
        78,
        {
            "error": f"fd 3 (named 'http') has socket type {SEQPACKET}; port-broker serves "
            "stream (ListenStream=) and datagram (ListenDatagram=) sockets"
        },
    )


def test_from_systemd_refuses_unnamed_sockets(processes: Processes, tmp_path: Path) -> None:
    http, control = tmp_path / "http.sock", tmp_path / "control.sock"
    status, report = socket_activate(processes, [str(http), str(control)], control)
    assert status == 78
    assert report["error"].startswith("fd 3 has no name: set FileDescriptorName=")


NO_SOCKETS = (
    "systemd passed no sockets (LISTEN_FDS is unset or 0): start the broker through its "
    ".socket units (systemctl start port-broker.socket), or give --bind NAME=ADDR and "
    "--control PATH"
)


def from_systemd_with(environ: dict[str, str]) -> Callable[[], Any]:
    """For a child (whose fd flags sd_listen_fds may change): set LISTEN_*, take."""

    def run() -> Any:
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        for name, value in environ.items():
            os.environ[name] = str(os.getpid()) if value == "self" else value
        return sorted(from_systemd().held)

    return run


@pytest.mark.parametrize(
    "environ",
    [{}, {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "http"}],
    ids=["unset", "for-another-pid"],
)
def test_from_systemd_without_sockets_says_how_to_start_the_broker(
    environ: dict[str, str],
) -> None:
    report = run_in_child(from_systemd_with(environ))
    assert report == {"error": "IntakeError", "message": NO_SOCKETS}


@pytest.mark.parametrize(
    ("environ", "strerror"),
    [
        ({"LISTEN_FDS": "0", "LISTEN_PID": "self"}, "Invalid argument"),
        ({"LISTEN_FDS": "two", "LISTEN_PID": "self"}, "Invalid argument"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "self", "LISTEN_FDNAMES": "http"}, "Invalid argument"),
    ],
    ids=["zero", "not-a-number", "names-miscounted"],
)
def test_from_systemd_refuses_malformed_variables(environ: dict[str, str], strerror: str) -> None:
    report = run_in_child(from_systemd_with(environ))
    assert report == {
        "error": "IntakeError",
        "message": f"systemd passed LISTEN_FDS={environ['LISTEN_FDS']!r} and "
        f"LISTEN_FDNAMES={environ.get('LISTEN_FDNAMES')!r}, which are not valid "
        f"({strerror}): start the broker through its .socket units",
    }
