"""An unmodified rootless container on ports 80 and 443: `port-broker exec --intercept
http,https -- podman run -p 80:80 -p 443:443 IMAGE`, run as uid 65534 with no
capability anywhere (docs/containers.md, "Rootless podman and Docker, unmodified").

Rootless podman's port forwarder, rootlessport, binds the host's ports 80 and 443 in the
host's network namespace: under --intercept it receives the broker's sockets. The
container's own server binds port 80 in the container's network namespace, where the
broker's rule leaves it to the kernel (docs/intercept.md): rootlessport forwards to it.

The image is built here from busybox-static (no registry is reachable). Two things that
a normal host has are arranged in the test's private mount namespace: a /dev/net/tun
that every user may open (slirp4netns needs it; this machine's is mode 0600), and a pid
namespace of its own, so that everything podman starts (conmon, slirp4netns,
rootlessport, the pause process) ends with the test.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Final

import pytest

from tests.harness.processes import (
    NOBODY,
    START_TIMEOUT,
    Processes,
    http_get,
    interception_unsupported,
    proc_status,
    start_broker,
    wait_for,
)

REQUESTS: Final = {"127.0.0.1": 40, "::1": 20}
"""Requests per port and client family; the issue's failure answered about half."""

PODMAN: Final = ("podman", "--storage-driver=vfs", "--runtime=runc")
"""vfs: no fuse-overlayfs needed; runc: the runtime .ci/debian-packages installs."""

SERVE: Final = "httpd -p 443 -h /www && exec httpd -f -p 80 -h /www"
"""What the container runs: busybox httpd on 80 and 443, both bound in its own
network namespace (plain HTTP on 443 too: the test is about the ports)."""

PEER_CGI: Final = b"""#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' "$REMOTE_ADDR"
"""
"""/cgi-bin/peer: the client address the server in the container sees."""

SUBORDINATE: Final = "nobody:200000:65536\n"
"""The user's /etc/subuid and /etc/subgid line, as `adduser` writes one for every user."""

_SETUP: Final = """\
set -e
mount -t tmpfs -o mode=755 tmpfs /dev/net
mknod -m 666 /dev/net/tun c 10 200
mount -t tmpfs -o mode=700,uid=65534,gid=65534 tmpfs /mnt
mount --bind "$1" /etc/subuid
mount --bind "$1" /etc/subgid
shift
exec "$@"
"""
"""Run as root at the start of the test's mount namespace, with the subordinate-id file
as $1, then exec the rest. /mnt becomes XDG_RUNTIME_DIR, a tmpfs of the user's at a
short path as logind's /run/user/UID is: podman's sockets are there, and Unix socket
paths end at 107 bytes."""

LOGIN: Final = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
"""As uid 65534 logged in: no capability, and the full bounding set a login keeps, with
which the setuid newuidmap and newgidmap can map the subordinate ids."""


FORWARDER: Final = {"slirp4netns": "rootlessport", "pasta": "pasta"}
"""The process that binds the host's ports for `-p`, by podman's --network (pasta is
podman 5's default; its process may be pasta.avx2)."""


PEER: Final = {
    "slirp4netns": {"127.0.0.1": "[::ffff:10.0.2.100]", "::1": "[::ffff:10.0.2.100]"},
    "pasta": {"127.0.0.1": "[::ffff:169.254.2.1]", "::1": "[::1]"},
}
"""Whom the server in the container sees for a client on 127.0.0.1 and on ::1."""


def unavailable(network: str) -> str | None:
    """Why this podman cannot use `network`, if it cannot."""
    if shutil.which(network) is None:
        return f"no {network} installed"
    version = subprocess.run(["podman", "--version"], capture_output=True, text=True,
                             check=True).stdout.split()[-1]  # fmt: skip
    if network == "pasta" and tuple(map(int, version.split(".")[:2])) < (4, 4):
        return f"podman {version} has no --network=pasta (4.4 and later)"
    return None


def _reason() -> str | None:
    if (reason := interception_unsupported()) is not None:
        return reason
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (the tun module): slirp4netns needs it"
    return None


_REASON = _reason()
pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


def image_tar(path: Path) -> None:
    """A one-binary image: busybox (static) with sh and httpd, and /www/index.html."""
    with tarfile.open(path, "w") as tar:

        def add(name: str, kind: bytes = tarfile.DIRTYPE, data: bytes = b"",
                link: str = "", mode: int = 0o755) -> None:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            tar.addfile(info, io.BytesIO(data) if data else None)

        for directory in ("bin", "www", "www/cgi-bin", "tmp"):
            add(directory)
        add("bin/busybox", tarfile.REGTYPE, Path("/bin/busybox").read_bytes())
        for applet in ("sh", "httpd"):
            add(f"bin/{applet}", tarfile.SYMTYPE, link="busybox")
        add("www/index.html", tarfile.REGTYPE, b"hello from a rootless container\n", mode=0o644)
        add("www/cgi-bin/peer", tarfile.REGTYPE, PEER_CGI)


@pytest.fixture
def home(rundir: Path) -> Path:
    """uid 65534's HOME, where podman keeps its images, and the image to import."""
    path = rundir / "home"
    path.mkdir()
    image_tar(path / "image.tar")
    for item in [path, *path.rglob("*")]:
        os.lchown(item, NOBODY, NOBODY)
    return path


def descendants(pid: int) -> list[int]:
    """Every living process under `pid` (orphans stay under the pid namespace's init)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except FileNotFoundError:
                continue
            found += map(int, children)
            stack += map(int, children)
    return found


def listeners(port: int) -> str:
    """`ss`'s processes holding a listening TCP socket on `port`, in our namespace."""
    return subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


@pytest.mark.parametrize("network", ["slirp4netns", "pasta"])
def test_rootless_podman_publishes_80_and_443_through_the_broker(
    processes: Processes, launcher: Path, rundir: Path, home: Path, network: str
) -> None:
    if (reason := unavailable(network)) is not None:
        pytest.skip(reason)
    policy = '[sockets.http]\nusers = ["nobody"]\n[sockets.https]\nusers = ["nobody"]\n'
    broker = start_broker(processes, launcher, rundir, policy,
                          sockets=(("http", "80"), ("https", "443")))  # fmt: skip
    run = [*PODMAN, "run", "--rm", f"--network={network}", "-p", "80:80", "-p", "443:443",
           "localhost/web", "sh", "-c", SERVE]  # fmt: skip
    exec_ = [str(launcher), "exec", "--socket", str(broker.control), "--intercept",
             "http,https", "--", *run]  # fmt: skip
    # The import leaves podman's pause process holding the user namespace it made; the
    # user's first podman command of a boot runs under the launcher, so it goes, and
    # the podman under the launcher makes the namespace anew (with newuidmap).
    user = (
        f"{shlex.join([*PODMAN, 'import', str(home / 'image.tar'), 'localhost/web'])}"
        " >/dev/null && kill $(cat /mnt/libpod/tmp/pause.pid)"
        f" && exec {shlex.join(exec_)}"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": "/mnt"}
    subordinate = rundir / "subid"
    subordinate.write_text(SUBORDINATE)
    subordinate.chmod(0o644)
    log = rundir / "podman.log"
    with log.open("w") as output:
        unshare = processes.start(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation=private", "sh", "-c", _SETUP, "setup", str(subordinate),
             *LOGIN, "--", "sh", "-c", user],
            log=output, env=env,
        )  # fmt: skip

    waiting = {(port, host) for port in (80, 443) for host in REQUESTS}

    def answered() -> bool:  # once on each port from each family: the container is up
        if unshare.poll() is not None:
            raise AssertionError(f"podman exited ({unshare.returncode}):\n{log.read_text()}")
        waiting.difference_update({(port, host) for port, host in waiting if ok(host, port)})
        return not waiting

    try:
        wait_for(answered, "the container on ports 80 and 443", timeout=START_TIMEOUT * 3)
    except AssertionError as e:
        raise AssertionError(f"{e}; not {waiting}; podman's output:\n{log.read_text()}") from None
    answers = {
        (port, host): sum(ok(host, port) for _ in range(count))
        for port in (80, 443)
        for host, count in REQUESTS.items()
    }
    assert answers == {(port, host): n for port in (80, 443) for host, n in REQUESTS.items()}
    # What the forwarder costs: the server no longer sees the client's address.
    peers = {host: http_get(host, 80, "/cgi-bin/peer").strip() for host in REQUESTS}
    assert peers == PEER[network]

    # No capability anywhere: every process the user's command started runs as 65534
    # and has none in the host's user namespace; those with capabilities (podman's
    # forwarder, conmon, the container) have them only in the user namespace podman made.
    host_userns = os.readlink("/proc/self/ns/user")
    seen: dict[str, set[str]] = {"host": set(), "own": set()}
    container_map: list[str] = []
    for pid in descendants(unshare.pid):
        try:
            status = proc_status(pid)
            userns = os.readlink(f"/proc/{pid}/ns/user")
        except FileNotFoundError:
            continue
        assert status["Uid"].split() == [str(NOBODY)] * 4, status
        if userns == host_userns:
            assert int(status["CapEff"], 16) == 0, status
            seen["host"].add(status["Name"])
        else:
            seen["own"].add(status["Name"])
            if status["Name"] == "httpd":
                container_map = Path(f"/proc/{pid}/uid_map").read_text().split()
    forwarder = FORWARDER[network]
    # The host's user namespace holds the launcher and the podman that made podman's.
    assert "port-broker" in seen["host"] and seen["host"] <= {"port-broker", "podman"}
    assert {"podman", "conmon", "httpd"} <= seen["own"]
    # newuidmap mapped the subordinate ids (the launcher ran it: under the filter's
    # no_new_privs, its setuid bit counts for nothing).
    assert container_map == ["0", "65534", "1", "1", "200000", "65536"]
    assert any(name.startswith(forwarder) for name in seen["own"]), seen

    # The broker's sockets went to the forwarder; the container's httpd bound its own,
    # in its network namespace, so it holds nothing in ours.
    for port in (80, 443):
        holders = set(re.findall(r'\("([^"]+)",pid=', listeners(port)))
        assert "port-broker" in holders, listeners(port)
        assert {h for h in holders - {"port-broker"} if not h.startswith(forwarder)} == set()
    assert "granted socket 'https' to user nobody" in broker.output()


def ok(host: str, port: int) -> bool:
    try:
        return http_get(host, port) == "hello from a rootless container\n"
    except OSError:
        return False
