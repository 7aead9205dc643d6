"""Smoke tests of the systemd test box (tests/harness/box.py) against the real systemd.

One box serves the module; two tests boot their own to check start-up failure reporting
and that stopping leaves nothing behind on the host.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.box import (
    KILL_TIMEOUT,
    STAGING_PARENT,
    Box,
    BoxCommandError,
    BoxError,
    box_unavailable_reason,
    host_mounts,
    iter_box_cgroups,
)
from tests.harness.processes import wait_for

#: A box reaches `running` in ~0.25 s here; 15 s still flags a box that got slow
#: (a unit waiting on a device or network) without flaking on a loaded machine.
BOOT_BUDGET = 15.0
#: journald reads service stdout asynchronously; `journalctl --sync` usually settles it
#: at once, this bounds the polling in case it does not.
JOURNAL_TIMEOUT = 10.0
JOURNAL_POLL_INTERVAL = 0.1
#: curl's own limit for one request to a socket-activated service on loopback.
CURL_MAX_TIME = "10"

HTTP_SERVER = """\
import os
import socket
import sys

assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not ours"
names = os.environ["LISTEN_FDNAMES"]
listener = socket.socket(fileno=3)
print(f"smoke-http serving {names} as uid {os.getuid()}", flush=True)
while True:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        body = f"uid={os.getuid()} fdnames={names}\\n".encode()
        head = f"HTTP/1.0 200 OK\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n".encode()
        conn.sendall(head + body)
"""

HTTP_SOCKET = """\
[Socket]
ListenStream=80
FileDescriptorName=http
"""

HTTP_SERVICE = """\
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/smoke/http.py
DynamicUser=yes
"""

WHOAMI_SERVICE = """\
[Service]
Type=oneshot
DynamicUser=yes
StateDirectory=smoke-whoami
ExecStart=/bin/sh -c 'echo "whoami: $(id -un) $(id -u) state=$STATE_DIRECTORY"'
ExecStart=/bin/sh -c 'touch "$STATE_DIRECTORY/written"'
"""


def _skip_unless_box_possible() -> None:
    reason = box_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    _skip_unless_box_possible()
    with Box() as booted:
        yield booted


def _journal_json(box: Box, unit: str, needle: str) -> list[dict[str, str]]:
    """Return the unit's journal entries as JSON once one of them contains `needle`."""
    deadline = time.monotonic() + JOURNAL_TIMEOUT
    while True:
        box.run(["journalctl", "--sync"])
        out = box.run(["journalctl", "--no-pager", "-o", "json", "-u", unit]).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        if any(needle in str(e.get("MESSAGE", "")) for e in entries):
            return entries
        if time.monotonic() > deadline:
            pytest.fail(f"{needle!r} not in the journal of {unit}:\n{box.journal(unit)}")
        time.sleep(JOURNAL_POLL_INTERVAL)


def test_boots_running_quickly(box: Box) -> None:
    assert box.run(["systemctl", "is-system-running"]).stdout.strip() == "running"
    assert box.failed_units() == []
    assert box.boot_seconds is not None
    assert box.boot_seconds < BOOT_BUDGET


def test_is_a_separate_machine(box: Box) -> None:
    assert box.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    virt = box.run(["systemd-detect-virt", "--container"]).stdout.strip()
    assert virt == "container-other"
    assert box.run(["hostname"]).stdout.strip() == "port-broker-box"
    links = box.run(["ip", "-o", "link", "show"]).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert "127.0.0.1/8" in box.run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
    for path, fstype in [
        ("/", "overlayfs"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
        ("/var/tmp", "tmpfs"),
        ("/var/log", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2fs"),
    ]:
        assert box.run(["stat", "-f", "-c", "%T", path]).stdout.strip() == fstype, path
    # Commands run in a scope unit of the box's systemd, so they have a cgroup in it.
    cgroup = box.run(["cat", "/proc/self/cgroup"]).stdout
    assert "0::/system.slice/box-run-" in cgroup


def test_run_reports_failures_and_feeds_input(box: Box) -> None:
    assert box.run(["cat"], input="fed through stdin").stdout == "fed through stdin"
    script = "echo to-stdout; echo to-stderr >&2; exit 3"
    with pytest.raises(BoxCommandError) as caught:
        box.run(["sh", "-c", script])
    assert caught.value.returncode == 3
    assert "to-stdout" in str(caught.value)
    assert "to-stderr" in str(caught.value)
    assert box.run(["sh", "-c", script], check=False).returncode == 3


def test_run_timeout_kills_the_command(box: Box) -> None:
    with pytest.raises(BoxError, match="did not finish"):
        box.run(["sleep", "1234"], timeout=0.5)

    def gone() -> bool:
        return box.run(["pgrep", "-x", "sleep"], check=False).returncode == 1

    # SIGKILLed: gone once the kernel has ended it and its parent reaped it, which on a
    # busy machine may be a moment after systemctl kill returns.
    wait_for(gone, "the sleep killed at its timeout to end", timeout=KILL_TIMEOUT)


def test_run_as_ordinary_user_who_cannot_bind_low_ports(box: Box) -> None:
    assert box.run(["id", "-un"], user="nobody").stdout.strip() == "nobody"
    bind = "import socket; socket.socket().bind(('127.0.0.1', 81))"
    result = box.run(["/usr/bin/python3", "-c", bind], user="nobody", check=False)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr


def test_files_before_boot_after_boot_and_copy_in(box: Box) -> None:
    box.write_file("/etc/smoke/hello.txt", "hello\n", mode=0o600, owner="nobody")
    assert box.read_file("/etc/smoke/hello.txt") == "hello\n"
    assert box.run(["stat", "-c", "%a %U", "/etc/smoke/hello.txt"]).stdout == "600 nobody\n"
    here = Path(__file__).parent / "harness"
    box.copy_in(here, "/opt/smoke-tests", exclude=["__pycache__"])
    assert box.read_file("/opt/smoke-tests/box.py") == (here / "box.py").read_text()
    # The host never sees what the box writes.
    assert not Path("/etc/smoke").exists()
    assert not Path("/opt/smoke-tests").exists()


def test_dynamic_user_service_and_its_journal(box: Box) -> None:
    box.install_unit("smoke-whoami.service", WHOAMI_SERVICE)
    box.run(["systemctl", "start", "smoke-whoami.service"])
    entries = _journal_json(box, "smoke-whoami.service", "whoami:")
    entry = next(e for e in entries if "whoami:" in str(e.get("MESSAGE")))
    _, name, uid, state = entry["MESSAGE"].split()
    assert name == "smoke-whoami"
    assert 61184 <= int(uid) <= 65519  # systemd's DynamicUser= range
    assert state == "state=/var/lib/smoke-whoami"
    assert entry["_SYSTEMD_UNIT"] == "smoke-whoami.service"
    assert entry["_UID"] == uid
    assert box.run(["test", "-e", "/var/lib/private/smoke-whoami/written"]).returncode == 0


def test_socket_on_port_80_activates_a_dynamic_user_service(box: Box) -> None:
    box.write_file("/usr/local/lib/smoke/http.py", HTTP_SERVER)
    box.install_unit("smoke-http.socket", HTTP_SOCKET)
    box.install_unit("smoke-http.service", HTTP_SERVICE)
    box.run(["systemctl", "start", "smoke-http.socket"])
    state = box.run(["systemctl", "is-active", "smoke-http.service"], check=False)
    assert state.stdout.strip() == "inactive"  # nothing runs until a client connects
    curl = ["curl", "-sS", "--max-time", CURL_MAX_TIME, "http://127.0.0.1/"]
    body = box.run(curl, user="nobody").stdout
    uid, names = body.split()
    assert int(uid.removeprefix("uid=")) >= 61184
    assert names == "fdnames=http"
    assert box.run(["systemctl", "is-active", "smoke-http.service"]).stdout.strip() == "active"
    _journal_json(box, "smoke-http.service", "smoke-http serving http as uid")
    # systemd itself holds the listening socket, as the broker's design relies on.
    listeners = box.run(["ss", "-Htlnp", "sport = :80"]).stdout
    assert '"systemd",pid=1,' in listeners
    box.run(["systemctl", "stop", "smoke-http.socket", "smoke-http.service"])


def test_systemd_analyze_security_works(box: Box) -> None:
    out = box.run(["systemd-analyze", "security", "--no-pager", "systemd-journald.service"])
    assert "Overall exposure level" in out.stdout


def test_degraded_boot_raises_with_the_failed_units_journal() -> None:
    _skip_unless_box_possible()
    doomed = Box()
    doomed.write_file(
        "/etc/systemd/system/smoke-doomed.service",
        "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo doomed-marker; exit 7'\n",
    )
    doomed.write_file(
        "/etc/systemd/system/multi-user.target.d/smoke-doomed.conf",
        "[Unit]\nWants=smoke-doomed.service\n",
    )
    with pytest.raises(BoxError) as caught:
        doomed.start()
    message = str(caught.value)
    assert "smoke-doomed.service" in message
    assert "doomed-marker" in message
    assert doomed.name is not None
    assert not (STAGING_PARENT / doomed.name).exists()


def test_stop_leaves_nothing_behind() -> None:
    _skip_unless_box_possible()
    mounts_before = host_mounts()
    with Box() as fresh:
        pidfd = os.pidfd_open(fresh.pid)
        name = fresh.name
        assert name is not None
        assert (STAGING_PARENT / name).is_dir()
        assert name in {cgroup.name for cgroup in iter_box_cgroups()}
        # The box's systemd-tmpfiles has worked on *its* /tmp and /run, not the host's.
        for path in ("/tmp", "/run", "/var/tmp", "/var/log"):
            inside = fresh.run(["stat", "-c", "%d", path]).stdout.strip()
            assert int(inside) != os.stat(path).st_dev, path
    try:
        assert select.select([pidfd], [], [], 0)[0] == [pidfd], "box PID 1 still alive"
    finally:
        os.close(pidfd)
    assert host_mounts() == mounts_before
    assert not any(name in mount for mount in host_mounts())
    assert not (STAGING_PARENT / name).exists()
    assert name not in {cgroup.name for cgroup in iter_box_cgroups()}
