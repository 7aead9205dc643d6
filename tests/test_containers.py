"""Container workers and UDP, under a real systemd (tests/harness/installed.py).

A socket handed over by the broker belongs to the host's network namespace: a worker in
a container with a private network and private users accepts on the host's port 80
directly — IPv4, IPv6 and loopback, client address intact. The broker sees the
container's processes with their host-side uid (SO_PEERCRED is translated) and their
systemd unit (machine-NAME.scope for systemd-nspawn).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest

from tests.harness.box import Box
from tests.harness.installed import configure, curl, installed_box, show, start_sockets, uid
from tests.harness.processes import REQUEST_TIMEOUT

pytestmark = pytest.mark.needs_root

WEB_UID: Final = 2_000_000
"""Host uid of root in container "web" (--private-users=WEB_UID:65536)."""
OTHER_UID: Final = 2_100_000
"""Host uid of root in container "other"."""

UDP_ECHO: Final = """\
import select, socket, sys
sock = socket.socket(fileno=3)  # the datagram socket `port-broker exec quic` passed
print(sock.family.name, sock.type.name, sock.getsockname()[1], flush=True)
while True:
    select.select([sock], [], [])  # non-blocking, as every socket handed over
    try:
        data, peer = sock.recvfrom(2048)
    except BlockingIOError:  # another holder took it
        continue
    sock.sendto(b"echo " + data + f" from {peer[0]}".encode(), peer)
"""

UDP_CLIENT: Final = """\
import socket, sys
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as sock:
    sock.settimeout(5)
    for _ in range(50):  # the worker may still be starting: datagrams are not queued
        sock.sendto(b"ping", (host, 443))
        try:
            print(sock.recv(2048).decode())
            break
        except TimeoutError:
            continue
"""


@pytest.fixture
def box(launcher: Path) -> Iterator[Box]:
    files = {"/srv/udp-echo.py": UDP_ECHO, "/srv/udp-client.py": UDP_CLIENT}
    with installed_box(launcher, files) as machine:
        yield machine


def nspawn(name: str, uid_base: int, *command: str, bind_control: bool = True) -> list[str]:
    """An unprivileged container on a volatile copy of the box's /usr, with its own
    network and user namespaces, the broker's control socket bound in (as a NixOS
    container's bindMounts would), running `command`."""
    argv = ["systemd-nspawn", "--quiet", "--directory=/", "--volatile=yes",
            "--private-network", f"--private-users={uid_base}:65536",
            "--private-users-ownership=off", f"--machine={name}", "--console=pipe",
            "--bind-ro=/srv",
            "--bind-ro=/opt/port-broker"]  # fmt: skip
    if bind_control:
        argv.append("--bind=/run/port-broker.sock")
    # The test box keeps /proc/sys read-only by mounts over it, which the kernel counts
    # as hiding part of /proc: a new user namespace may then mount no proc of its own.
    # In a mount namespace of its own, the container's launcher drops those mounts (the
    # container's root has no power over the kernel's sysctls anyway).
    unmask = ["unshare", "--mount", "--propagation=private", "sh", "-c",
              'umount /proc/sys/net /proc/sys && exec "$@"', "sh"]  # fmt: skip
    return [*unmask, *argv, "--", *command]


def start_container(box: Box, unit: str, argv: Sequence[str]) -> None:
    box.run(["systemd-run", f"--unit={unit}", "--quiet", "--collect", *argv])


def run_container(box: Box, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return box.run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect", *argv],
                   check=False)  # fmt: skip


def test_container_with_private_network_and_users_serves_the_hosts_port_80(box: Box) -> None:
    configure(box, f"[sockets.http]\nusers = [{WEB_UID}]\n")
    start_sockets(box)
    start_container(box, "web-container.service", nspawn(
        "web", WEB_UID, "/usr/local/bin/port-broker", "exec", "http", "--",
        "/usr/bin/node", "/srv/hello.js"))  # fmt: skip
    # Inside, node is pid 1 and uid 0; the kernel's view of the clients is the real one.
    assert curl(box) == "hello from node: pid 1, uid 0, client ::ffff:127.0.0.1\n"
    assert curl(box, "http://[::1]/") == "hello from node: pid 1, uid 0, client ::1\n"
    leader = int(box.run(["machinectl", "show", "web", "-p", "Leader", "--value"]).stdout)
    uid_map = box.read_file(f"/proc/{leader}/uid_map").split()
    assert uid_map == ["0", str(WEB_UID), "65536"]

    refused = run_container(box, nspawn("other", OTHER_UID, "/usr/local/bin/port-broker",
                                        "exec", "http", "--", "true"))  # fmt: skip
    assert refused.returncode == 77
    assert re.search(rf"\(uid {OTHER_UID}, pid \d+, unit machine-other\.scope\) may not "
                     r"acquire socket 'http'", refused.stderr), refused.stderr  # fmt: skip


def test_a_scope_rule_grants_one_container_and_refuses_another(box: Box) -> None:
    configure(box, '[sockets.http]\nunits = ["machine-web.scope"]\n')
    start_sockets(box)
    granted = run_container(box, nspawn("web", WEB_UID, "/usr/local/bin/port-broker", "exec",
                                        "http", "--", "true"))  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    refused = run_container(box, nspawn("other", OTHER_UID, "/usr/local/bin/port-broker",
                                        "exec", "http", "--", "true"))  # fmt: skip
    assert refused.returncode == 77
    assert "unit machine-other.scope) may not acquire socket 'http'" in refused.stderr
    journal = box.run(["journalctl", "-u", "port-broker", "-o", "cat", "--no-pager"]).stdout
    assert f"granted socket 'http' to user vu-web-0 (uid {WEB_UID}, pid" in journal


def test_user_and_network_namespace_of_an_ordinary_user(box: Box) -> None:
    configure(box, '[sockets.http]\nusers = ["alice"]\n')
    start_sockets(box)
    worker = ["unshare", "--user", "--map-root-user", "--net", "/usr/local/bin/port-broker",
              "exec", "http", "--", "/usr/bin/node", "/srv/hello.js"]  # fmt: skip
    with subprocess.Popen(box.command(worker, user="alice"), stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert b"listening on fd 3 (http)" in proc.stdout.readline()
            body = curl(box)
            assert re.fullmatch(r"hello from node: pid \d+, uid 0, client ::ffff:127\.0\.0\.1\n",
                                body)  # fmt: skip
            assert curl(box, "http://[::1]/").endswith("uid 0, client ::1\n")
        finally:
            box.run(["pkill", "-u", "alice", "-x", "node"], check=False)
            proc.wait(REQUEST_TIMEOUT)
    journal = box.run(["journalctl", "-u", "port-broker", "-o", "cat", "--no-pager"]).stdout
    assert f"granted socket 'http' to user alice (uid {uid(box, 'alice')}" in journal


def test_host_side_exec_passes_the_socket_into_a_container_without_python(box: Box) -> None:
    # The container needs no port-broker: root on the host acquires and nspawn passes
    # the fd on (LISTEN_FDS, LISTEN_PID=1; systemd 252's nspawn passes no names).
    configure(box, '[sockets.http]\nunits = ["web-container.service"]\n')
    start_sockets(box)
    start_container(box, "web-container.service", [
        "/usr/local/bin/port-broker", "exec", "http", "--",
        *nspawn("web", WEB_UID, "/usr/bin/node", "/srv/hello.js", bind_control=False)])  # fmt: skip
    assert curl(box) == "hello from node: pid 1, uid 0, client ::ffff:127.0.0.1\n"


def test_udp_443_datagrams_are_answered_by_the_worker(box: Box) -> None:
    configure(box, '[sockets.quic]\nusers = ["alice"]\n')
    start_sockets(box, "quic")
    status = box.run(["port-broker", "list"], user="alice").stdout.splitlines()
    assert status[1].split() == ["quic", "udp6", "[::]:443"]
    worker = ["/usr/local/bin/port-broker", "exec", "quic", "--", "/usr/bin/python3",
              "/srv/udp-echo.py"]  # fmt: skip
    with subprocess.Popen(box.command(worker, user="alice"), stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"AF_INET6 SOCK_DGRAM 443\n"
            client = ["/usr/bin/python3", "/srv/udp-client.py"]
            four = box.run([*client, "127.0.0.1"]).stdout
            assert four == "echo ping from ::ffff:127.0.0.1\n"
            six = box.run([*client, "::1"]).stdout
            assert six == "echo ping from ::1\n"
        finally:
            box.run(["pkill", "-u", "alice", "-f", "udp-echo.py"], check=False)
            proc.wait(REQUEST_TIMEOUT)
    assert show(box, "port-broker.service", "StatusText").startswith("Holding quic;")


def test_podman_container_without_network_gets_the_socket_from_the_host(box: Box) -> None:
    # The image needs no port-broker: podman passes LISTEN_FDS, LISTEN_FDNAMES and
    # LISTEN_PID=1 into the container. Here podman runs rootful with runc (crun cannot
    # raise RLIMIT_MEMLOCK on this machine) on a bind of the box's root as --rootfs.
    configure(box, '[sockets.http]\nunits = ["podman-web.service"]\n')
    start_sockets(box)
    box.run(["sh", "-c", "mkdir -p /mnt/root && mount --bind / /mnt/root"])
    podman = ["podman", "--storage-driver=vfs", "--runtime=runc", "run", "--rm",
              "--network=none", "--pids-limit=0", "--log-driver=none", "-v", "/srv:/srv:ro",
              "--rootfs", "/mnt/root", "/usr/bin/node", "/srv/hello.js"]  # fmt: skip
    start_container(box, "podman-web.service",
                    ["/usr/local/bin/port-broker", "exec", "http", "--", *podman])  # fmt: skip
    assert curl(box) == "hello from node: pid 1, uid 0, client ::ffff:127.0.0.1\n"
    assert curl(box, "http://[::1]/") == "hello from node: pid 1, uid 0, client ::1\n"
    journal = box.run(["journalctl", "-u", "podman-web.service", "-o", "cat"]).stdout
    assert "listening on fd 3 (http)" in journal  # LISTEN_FDNAMES made it inside
