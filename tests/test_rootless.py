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

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.harness.processes import (
    EXIT_TIMEOUT,
    NOBODY,
    START_TIMEOUT,
    Processes,
    http_get,
    interception_unsupported,
    proc_status,
    start_broker,
    wait_for,
)
from tests.harness.runtime import ROOT

REQUESTS: Final = {"127.0.0.1": 40, "::1": 20}
"""Requests per port and client family; the issue's failure answered about half."""

PODMAN: Final = ("podman", "--storage-driver=vfs", "--runtime=runc")
"""vfs: no fuse-overlayfs needed; runc: the runtime .ci/debian-packages installs."""

SERVE: Final = "httpd -p 443 -h /www && httpd -f -p 80 -h /www & trap 'exit 0' TERM; wait"
"""What the container runs: busybox httpd on 80 and 443, both bound in its own
network namespace (plain HTTP on 443 too: the test is about the ports), under a shell
that ends the container on SIGTERM (as pid 1, it would ignore one it does not catch)."""

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
while [ "$1" != -- ]; do mount --bind /dev/null "$1"; shift; done
shift
exec "$@"
"""
"""Run as root at the start of the test's mount namespace, with the subordinate-id file
as $1 and the programs to hide up to a `--` (each becomes /dev/null, which exec refuses),
then exec the rest. /mnt becomes XDG_RUNTIME_DIR, a tmpfs of the user's at a short path
as logind's /run/user/UID is: podman's sockets are there, and Unix socket paths end at
107 bytes."""

LOGIN: Final = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
"""As uid 65534 logged in: no capability, and the full bounding set a login keeps, with
which the setuid newuidmap and newgidmap can map the subordinate ids."""


FORWARDER: Final = {"slirp4netns": "rootlessport", "pasta": "pasta"}
"""The process that binds the host's ports for `-p`, by podman's --network (pasta is
podman 5's default; its process may be pasta.avx2)."""


CATATONIT: Final = ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit")
"""Where podman looks for catatonit, in order, to exec as its rootless pause process
(pkg/rootless/rootless_linux.c); without it the pause process is podman itself, named
"podman pause". Debian's podman recommends catatonit: an ordinary install has it."""

PAUSE: Final = {"catatonit": "catatonit", "podman": "podman pause"}
"""The pause process's name, by which program podman found for it."""


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
        add("www/index.html", tarfile.REGTYPE, HELLO.encode(), mode=0o644)
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


HELLO: Final = "hello from a rootless container\n"


def children(pid: int) -> list[int]:
    """The child pids of `pid`, every thread's; none once it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    found: list[int] = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    """Every living process under `pid` (orphans stay under the pid namespace's init)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        below = children(stack.pop())
        found += below
        stack += below
    return found


def sandboxed(
    processes: Processes, rundir: Path, command: str, env: dict[str, str], hide: Sequence[str] = ()
) -> Sandbox:
    """Start the shell `command` as uid 65534 logged in, in the test's namespaces, where
    the programs `hide` names cannot be run (as on a host without them)."""
    subordinate = rundir / "subid"
    subordinate.write_text(SUBORDINATE)
    subordinate.chmod(0o644)
    log = rundir / "sandbox.log"
    with log.open("w") as output:
        proc = processes.start(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation=private", "sh", "-c", _SETUP, "setup", str(subordinate),
             *hide, "--", *LOGIN, "--", "sh", "-c", command],
            log=output, env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": "/mnt", **env},
        )  # fmt: skip
    return Sandbox(proc, log)


@dataclass
class Sandbox:
    proc: subprocess.Popen[str]
    log: Path

    def wait_until_served(self, targets: set[tuple[int, str]], body: str) -> None:
        """Until each (port, host) has answered `body` once: the server is up."""
        waiting = set(targets)

        def answered() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode})")
            waiting.difference_update({(p, h) for p, h in waiting if ok(h, p, body)})
            return not waiting

        try:
            wait_for(answered, f"answers on {sorted(targets)}", timeout=START_TIMEOUT * 3)
        except AssertionError as e:
            raise AssertionError(f"{e}; not {waiting}; output:\n{self.log.read_text()}") from None

    def processes(self) -> dict[str, dict[str, str]]:
        """Name → /proc status of every process under the sandbox, having checked that
        each runs as 65534 and has no capability in the host's user namespace (those in
        a user namespace of their own have theirs there only). `Userns` says which."""
        host_userns = os.readlink("/proc/self/ns/user")
        found: dict[str, dict[str, str]] = {}
        for pid in descendants(self.proc.pid):
            try:
                status = proc_status(pid)
                status["Userns"] = (
                    "host" if os.readlink(f"/proc/{pid}/ns/user") == host_userns else "own"
                )
                for ids in ("uid_map", "gid_map"):
                    status[ids] = " ".join(Path(f"/proc/{pid}/{ids}").read_text().split())
            except (FileNotFoundError, ProcessLookupError):  # it exited as we looked
                continue
            assert status["Uid"].split() == [str(NOBODY)] * 4, status
            if status["Userns"] == "host":
                assert int(status["CapEff"], 16) == 0, status
            found[status["Name"]] = status
        return found


def answered_all(requests: dict[tuple[int, str], int], body: str) -> dict[tuple[int, str], int]:
    """How many of `requests` (count per (port, host)) were answered `body`."""
    return {
        (port, host): sum(ok(host, port, body) for _ in range(count))
        for (port, host), count in requests.items()
    }


def holders(port: int) -> set[str]:
    """The processes holding a listening TCP socket on `port` in our namespace."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return set(re.findall(r'\("([^"]+)",pid=', out))


def ok(host: str, port: int, body: str) -> bool:
    try:
        return http_get(host, port) == body
    except OSError:
        return False


PASTA_RESETS_FOR: Final = 10.0
"""Seconds a request from ::1 through pasta is tried again while pasta resets it. pasta
itself (passt 2025-05-03, Debian 13) resets connections from ::1 on a busy machine, on
ports without port-broker too (docs/containers.md): in bursts, or (beside two busy loops)
every one for a minute and more, after it had answered. What pasta does with them is
not port-broker's to test: the IPv4 ones, through the same held sockets, are counted."""

PASTA_RESETS: Final = (
    "pasta reset every connection from ::1 for {:g} s (its own resets on a busy machine, "
    "docs/containers.md): that a client on ::1 is answered through pasta, and what the "
    "server sees of it, were not checked; everything else was"
)


def get_through(network: str, host: str, port: int, path: str = "/") -> str | None:
    """GET http://host:port/path through the forwarder of `network`: the body, or None if
    pasta reset every connection from ::1 for PASTA_RESETS_FOR seconds. Any other failure,
    and a reset anywhere else, fails at once."""
    if (network, host) != ("pasta", "::1"):
        return http_get(host, port, path)
    deadline = time.monotonic() + PASTA_RESETS_FOR
    while time.monotonic() < deadline:
        try:
            return http_get(host, port, path)
        except ConnectionResetError:  # http.client's RemoteDisconnected too
            time.sleep(0.1)
    return None


TIME_LIMIT: Final = 3 * START_TIMEOUT + 3 * PASTA_RESETS_FOR + START_TIMEOUT + 2 * EXIT_TIMEOUT
"""The podman test's time limit, the sum of its own waits (it takes 35 s at most, busy):
the first answers (3 START_TIMEOUT), three requests from ::1 through pasta
(PASTA_RESETS_FOR each), the launcher's note (START_TIMEOUT), and stopping the processes it
started (EXIT_TIMEOUT, then again after SIGKILL)."""


MAPPED: Final = "0 65534 1 1 200000 65536"
"""uid_map of a user namespace made with newuidmap: the user as root, then the
subordinate ids (the launcher ran it: under the filter's no_new_privs, its setuid bit
counts for nothing)."""


@pytest.mark.timeout(TIME_LIMIT)
@pytest.mark.parametrize("pause", ["catatonit", "podman"], ids=["catatonit", "no-catatonit"])
@pytest.mark.parametrize("first", [True, False], ids=["first-podman", "podman-ran-before"])
@pytest.mark.parametrize("network", ["slirp4netns", "pasta"])
def test_rootless_podman_publishes_80_and_443_through_the_broker(
    processes: Processes,
    launcher: Path,
    rundir: Path,
    home: Path,
    *,
    network: str,
    first: bool,
    pause: str,
) -> None:
    if (reason := unavailable(network)) is not None:
        pytest.skip(reason)
    installed = [path for path in CATATONIT if os.path.exists(path)]
    if pause == "catatonit" and not installed:
        pytest.skip("no catatonit installed (podman's Recommends; .ci/debian-packages lists it)")
    hidden = installed if pause == "podman" else []
    policy = '[sockets.http]\nusers = ["nobody"]\n[sockets.https]\nusers = ["nobody"]\n'
    broker = start_broker(processes, launcher, rundir, policy,
                          sockets=(("http", "80"), ("https", "443")))  # fmt: skip
    run = [*PODMAN, "run", "--rm", f"--network={network}", "-p", "80:80", "-p", "443:443",
           "localhost/web", "sh", "-c", SERVE]  # fmt: skip
    exec_ = [str(launcher), "exec", "--socket", str(broker.control), "--intercept",
             "http,https", "--", *run]  # fmt: skip
    # The import leaves podman's pause process holding the user namespace it made. For
    # the user's first podman command of a boot run under the launcher, it goes, and
    # the podman under the launcher makes the namespace anew (with newuidmap). The
    # shell stays as the pid namespace's init, as the launcher is not one on a host.
    command = f"{shlex.join([*PODMAN, 'import', str(home / 'image.tar'), 'localhost/web'])}"
    if first:
        command += (
            " >/dev/null && pause=$(cat /mnt/libpod/tmp/pause.pid) && kill $pause"
            " && while kill -0 $pause 2>/dev/null; do sleep 0.1; done"
        )
    command += f" >/dev/null && {shlex.join(exec_)}; echo launcher exited $?"
    sandbox = sandboxed(processes, rundir, command, {"HOME": str(home)}, hide=hidden)
    requests = {(port, host): n for port in (80, 443) for host, n in REQUESTS.items()}
    if network == "pasta":  # pasta's own resets of ::1: asked below, and not counted
        requests = {(port, host): n for (port, host), n in requests.items() if host != "::1"}
    sandbox.wait_until_served(set(requests), HELLO)  # each port from each family, once
    assert answered_all(requests, HELLO) == requests
    # Through pasta, ::1 once on each port, within its resets (None: reset throughout).
    ipv6 = {port: get_through(network, "::1", port) for port in (80, 443)}
    assert {body for body in ipv6.values() if body is not None} <= {HELLO}
    # What the forwarder costs: the server no longer sees the client's address.
    peers = {host: get_through(network, host, 80, "/cgi-bin/peer") for host in REQUESTS}
    assert {h: p.strip() for h, p in peers.items() if p is not None} == {
        h: p for h, p in PEER[network].items() if peers[h] is not None
    }
    unchecked = None in (*ipv6.values(), *peers.values())

    found = sandbox.processes()
    forwarder = FORWARDER[network]
    # The host's user namespace holds the shell, the launcher and the podman that made
    # podman's.
    host = {n for n, s in found.items() if s["Userns"] == "host"}
    assert host <= {"sh", "port-broker", "podman"}
    assert found["port-broker"]["Userns"] == "host"
    assert found["httpd"]["uid_map"] == found["httpd"]["gid_map"] == MAPPED
    # podman's pause process holds that user namespace: made under the filter (so the
    # mappers ran through the launcher's stand-ins) when podman ran first there.
    assert found[PAUSE[pause]]["NoNewPrivs"] == ("1" if first else "0"), found.keys()
    assert found[PAUSE[pause]]["Userns"] == "own"
    assert any(name.startswith(forwarder) for name in found), found.keys()
    # The broker's sockets went to the forwarder; the container's httpd bound its own,
    # in its network namespace, so it holds nothing in ours.
    for port in (80, 443):
        assert "port-broker" in holders(port)
        assert {h for h in holders(port) if not h.startswith(forwarder)} == {"port-broker"}
    assert "granted socket 'https' to user nobody" in broker.output()

    # The container stops, and podman with it. The launcher ends then, unless it has
    # podman's pause process to serve: then it stays, and says so.
    launcher_pid = int(found["port-broker"]["Pid"])
    (container,) = children(int(found["conmon"]["Pid"]))
    os.kill(container, signal.SIGTERM)
    if first:
        wait_for(lambda: "still runs under the filter" in sandbox.log.read_text(), "the note")
        note = sandbox.log.read_text().split("the program exited (0)", 1)[1].splitlines()[0]
        # It names what keeps the launcher running, the pause process alone, by its name.
        assert re.fullmatch(rf".* a signal comes: pid \d+ \({PAUSE[pause]}\)", note), note
        assert Path(f"/proc/{launcher_pid}").exists()
    else:
        wait_for(lambda: "launcher exited 0" in sandbox.log.read_text(), "the launcher's end")
        assert "the program exited" not in sandbox.log.read_text()
    if unchecked:
        pytest.skip(PASTA_RESETS.format(PASTA_RESETS_FOR))


def test_rootless_docker_port_driver_serves_80_through_the_broker(
    processes: Processes, launcher: Path, rundir: Path
) -> None:
    # Rootless Docker as docs/containers.md sets it up: dockerd-rootless.sh's rootlesskit
    # with the slirp4netns port driver, its slirp4netns the docs' stand-in, which runs
    # the real one under the launcher. `docker run -p 80:80` asks rootlesskit for
    # 0.0.0.0:80 (--publish here); busybox httpd stands in for the container's server.
    docs = (ROOT / "docs" / "containers.md").read_text()
    for line in DOCKER_UNIT:
        assert f"\n{line}\n" in docs, line
    stand_in = rundir / "bin" / "slirp4netns-port-broker"
    stand_in.parent.mkdir()
    stand_in.write_text(docs_script(docs, "slirp4netns-port-broker"))
    stand_in.chmod(0o755)
    www = rundir / "www"
    (www / "cgi-bin").mkdir(parents=True)
    (www / "index.html").write_text(HELLO)
    (www / "cgi-bin" / "peer").write_bytes(PEER_CGI)
    (www / "cgi-bin" / "peer").chmod(0o755)
    policy = '[sockets.http]\nusers = ["nobody"]\n[sockets.https]\nusers = ["nobody"]\n'
    broker = start_broker(processes, launcher, rundir, policy,
                          sockets=(("http", "0.0.0.0:80"), ("https", "0.0.0.0:443")))  # fmt: skip
    rootlesskit = ["rootlesskit", *DOCKERD_ROOTLESS_FLAGS, "--port-driver=slirp4netns",
                   f"--slirp4netns-binary={stand_in}", "--publish", "0.0.0.0:80:80/tcp",
                   "busybox", "httpd", "-f", "-p", "80", "-h", str(www)]  # fmt: skip
    env = {"HOME": str(rundir), "PORT_BROKER_SOCKET": str(broker.control),
           "PATH": f"{launcher.parent}:/usr/bin:/bin"}  # fmt: skip
    sandbox = sandboxed(processes, rundir, f"exec {shlex.join(rootlesskit)}", env)
    requests = {(80, "127.0.0.1"): REQUESTS["127.0.0.1"]}
    sandbox.wait_until_served(set(requests), HELLO)
    assert answered_all(requests, HELLO) == requests
    # slirp4netns's port driver keeps a client's address, but the host's own loopback,
    # which it gives as its gateway's.
    assert http_get("127.0.0.1", 80, "/cgi-bin/peer").strip() == "[::ffff:10.0.2.2]"
    if (address := global_ipv4()) is not None:
        assert http_get(address, 80, "/cgi-bin/peer").strip() == f"[::ffff:{address}]"

    found = sandbox.processes()
    assert found["busybox"]["uid_map"] == found["busybox"]["gid_map"] == MAPPED
    assert found["rootlesskit"]["NoNewPrivs"] == "0"  # it ran the mappers itself
    assert found["rootlesskit"]["Userns"] == "host"  # not under the launcher at all
    assert holders(80) == {"port-broker", "slirp4netns"}
    assert "granted socket 'http' to user nobody" in broker.output()


DOCKER_UNIT: Final = (
    "Environment=DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=slirp4netns",
    "Environment=DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS="
    "--slirp4netns-binary=%h/.local/bin/slirp4netns-port-broker",
)
"""The lines of docs/containers.md's user-unit drop-in for rootless Docker."""

DOCKERD_ROOTLESS_FLAGS: Final = (
    "--net=slirp4netns", "--mtu=65520", "--slirp4netns-sandbox=auto",
    "--slirp4netns-seccomp=auto", "--disable-host-loopback", "--copy-up=/etc",
    "--copy-up=/run", "--propagation=rslave",
)  # fmt: skip
"""What dockerd-rootless.sh (Docker's contrib/) gives rootlesskit, but the port driver."""


def docs_script(docs: str, name: str) -> str:
    """The shell script in `docs` whose comment names it `name`."""
    for block in docs.split("```sh\n")[1:]:
        script = block.split("```", 1)[0]
        if script.startswith("#!/bin/sh\n") and name in script.splitlines()[1]:
            return script
    raise AssertionError(f"docs/containers.md has no script {name}")


def global_ipv4() -> str | None:
    """An IPv4 address of this host's other than loopback, if it has one."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    match = re.search(r"inet (\S+)/", out)
    return match.group(1) if match else None
