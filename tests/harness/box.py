"""A throw-away machine for integration tests: real systemd as PID 1 in fresh namespaces.

What it is for: tests that need the real thing — `.socket` units, `DynamicUser=`,
journald, `systemd-analyze security`, ordinary users, curl to 127.0.0.1 — without a VM.
A *box* is `/usr/lib/systemd/systemd --system` (env `container=other`) running as PID 1
in fresh pid, mount, uts, ipc, net and cgroup namespaces, on an overlay of the host's
root file system whose upper layer is a tmpfs, with its own /dev, /run, /tmp, /var/tmp,
/var/log, proc (with /proc/sys read-only except /proc/sys/net), sysfs (read-only) and
cgroup2. It boots to `running` in about 0.25 s here::

    with Box() as box:
        box.run(["systemctl", "start", "foo.socket"])

What it must never do:

- boot systemd on the host's own root, /run or /tmp: its tmpfiles rules would empty the
  host's /tmp and PID 1 would take over /run. Every mount happens in a private mount
  namespace, and nothing is written into the box before checking, from inside, that its
  root is an overlay and /run, /tmp, /var/tmp and /var/log are private tmpfs mounts;
- touch the host's /tmp, /run or service manager. Its only host footprint is a staging
  directory under /var/tmp and a cgroup, both removed by `Box.stop`;
- signal a process it did not start: it kills the box's PID 1 through a pidfd, the
  launcher it spawned, and only processes found inside the box's own cgroup;
- leave anything behind: `Box.stop` checks that no mount, process, cgroup or file of
  the box survives, and raises `BoxError` naming whatever did.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self

# --- Programs (the box runs the host's own binaries, through the overlay) --------------

SYSTEMD = "/usr/lib/systemd/systemd"
#: Programs the harness runs on the host or in the box; all from systemd / util-linux /
#: iproute2 / coreutils / tar, which a Debian system with systemd has.
REQUIRED_PROGRAMS = (
    "nsenter",
    "unshare",
    "setpriv",
    "pivot_root",
    "mount",
    "umount",
    "mknod",
    "stat",
    "ip",
    "systemctl",
    "systemd-run",
    "journalctl",
    "runuser",
    "tar",
)
#: PATH for everything the harness starts: never the caller's (pyenv, venvs, ~/bin).
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME = "port-broker-box"
#: Prefix of the staging directory under /var/tmp and of the cgroup; stale ones whose
#: owner process is gone are swept by the next `Box.start`.
NAME_PREFIX = "port-broker-box."
STAGING_PARENT = Path("/var/tmp")

# --- Timeouts (seconds) ---------------------------------------------------------------

#: Namespaces, mounts and pivot_root take ~50 ms; only a hung mount gets near this.
SETUP_TIMEOUT = 30.0
#: Boot reaches `running` in ~0.25 s here; generous for a loaded 2-core machine, and
#: below systemd's own 90 s start timeout so a hung unit shows up as *our* timeout.
BOOT_TIMEOUT = 60.0
#: Default for `Box.run`: tests run short commands; a hang should fail, not stall CI.
RUN_TIMEOUT = 60.0
#: File writes, systemctl queries, journal reads: each is a few milliseconds.
HELPER_TIMEOUT = 30.0
#: A clean `systemctl poweroff` of the box takes ~0.2 s; after this we SIGKILL PID 1.
POWEROFF_TIMEOUT = 30.0
#: After SIGKILL of PID 1 the kernel tears the pid namespace down at once; this only
#: bounds waiting for the reaping (and for cgroups to become removable).
KILL_TIMEOUT = 10.0
#: Pause between `is-system-running` attempts while PID 1 has no bus socket yet.
BOOT_POLL_INTERVAL = 0.05
#: Pause between attempts to remove a cgroup whose last process is still being reaped.
CGROUP_POLL_INTERVAL = 0.02

# --- What the box does not run --------------------------------------------------------

#: Units masked in every box, each with the reason. Found by booting here: without these
#: masks a box still reaches `running` (nothing *fails* on this machine), but it would
#: spend time on pointless work or reach into the host's shared kernel. Units the host's
#: administrator enabled (postgresql, apt timers, fstrim, getty@tty1, ...) are not
#: masked but disabled wholesale: see `_PREPARE_SCRIPT`.
MASKED_UNITS: Mapping[str, str] = {
    "getty.target": "no consoles to log in on",
    "console-getty.service": "would run agetty on /dev/console, which is /dev/null here",
    "systemd-networkd-wait-online.service": "waits up to 2 min for a network the box lacks",
    "modprobe@.service": "would load modules into the host's kernel",
    "systemd-modules-load.service": "would load modules into the host's kernel",
    "kmod-static-nodes.service": "device nodes of host modules are not wanted here",
    "systemd-sysctl.service": "would set host-wide kernel.* sysctls",
    "systemd-binfmt.service": "would register binfmt handlers in the host's kernel",
    "proc-sys-fs-binfmt_misc.automount": "host-wide binfmt_misc is not the box's",
    "sys-kernel-debug.mount": "would expose the host kernel's debugfs writable",
    "sys-kernel-tracing.mount": "would expose the host kernel's tracefs writable",
    "sys-kernel-config.mount": "would expose the host kernel's configfs writable",
    "sys-fs-fuse-connections.mount": "host FUSE connections are not the box's",
    "dev-hugepages.mount": "huge pages are pointless in a test box",
    "systemd-udevd.service": "udev belongs to the host",
    "systemd-udevd-control.socket": "udev belongs to the host",
    "systemd-udevd-kernel.socket": "udev belongs to the host",
    "systemd-udev-trigger.service": "would replay uevents for every host device",
    "systemd-timesyncd.service": "would set the host's clock",
}

# Runs as PID 1 of the new pid namespace, in the new mount namespace, before systemd.
# $1: host staging dir (its `layers` subdir is the mount point), $2: machine id.
# stdout is the readiness pipe ("ready"); stdin carries "go" once Python has written
# the box's files; stderr is the console log on the host.
_INIT_SCRIPT = r"""
set -eu
stage=$1 machine_id=$2
layers=$stage/layers
mount -t tmpfs -o mode=0755 box-layers "$layers"
mkdir "$layers/upper" "$layers/work" "$layers/root"
root=$layers/root
mount -t overlay -o "lowerdir=/,upperdir=$layers/upper,workdir=$layers/work" \
    box-root "$root"
test "$(stat -f -c %T "$root")" = overlayfs

mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount --bind "$root/proc/sys/net" "$root/proc/sys/net"
mount -o remount,bind,ro,nosuid,nodev,noexec "$root/proc/sys"
if [ -e "$root/proc/sysrq-trigger" ]; then
    mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
    mount -o remount,bind,ro "$root/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

dev=$root/dev
mount -t tmpfs -o mode=0755,nosuid,noexec,size=4m box-dev "$dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    name=${node%%:*} numbers=${node#*:}
    mknod -m 0666 "$dev/$name" c "${numbers%%:*}" "${numbers#*:}"
done
mkdir -m 0755 "$dev/pts" "$dev/mqueue" "$dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$dev/pts"
ln -s pts/ptmx "$dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev box-shm "$dev/shm"
mount -t mqueue -o nosuid,nodev,noexec mqueue "$dev/mqueue"
ln -s /proc/self/fd "$dev/fd"
ln -s /proc/self/fd/0 "$dev/stdin"
ln -s /proc/self/fd/1 "$dev/stdout"
ln -s /proc/self/fd/2 "$dev/stderr"
: > "$dev/console"
mount --bind "$dev/null" "$dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev box-run "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev box-tmp "$root/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev box-var-tmp "$root/var/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev box-var-log "$root/var/log"

ip link set lo up

cd "$root"
pivot_root . .
umount -l .
cd /

echo ready
read -r go
test "$go" = go
exec </dev/null >&2
exec env -i container=other "$0" --system --machine-id="$machine_id"
"""

# Runs inside the box (entered with nsenter) after pivot_root, before systemd starts.
# Arguments: the units to mask. Refuses to write anything unless the box's root is an
# overlay and its /run, /tmp, /var/tmp, /var/log are tmpfs: the hazard guard.
_PREPARE_SCRIPT = r"""
set -eu
for check in /:overlayfs /run:tmpfs /tmp:tmpfs /var/tmp:tmpfs /var/log:tmpfs; do
    path=${check%%:*} want=${check#*:}
    got=$(stat -f -c %T "$path")
    if [ "$got" != "$want" ]; then
        echo "refusing to prepare the box: $path is $got, not $want" >&2
        exit 1
    fi
done
cd /etc/systemd/system
# Disable whatever the host's administrator enabled: the box boots vendor defaults only,
# so a service enabled on the host (a web server on :80, say) cannot surprise a test.
for dir in *.wants *.requires *.upholds; do
    if [ -e "$dir" ]; then rm -rf -- "$dir"; fi
done
ln -sfn /lib/systemd/system/multi-user.target default.target
for unit in "$@"; do ln -sfn /dev/null "$unit"; done
echo '# port-broker test box: no file systems from the host' > /etc/fstab
echo "$BOX_HOSTNAME" > /etc/hostname
"""

_WRITE_SCRIPT = r"""
set -eu
mkdir -p -- "$(dirname -- "$1")"
cat > "$1"
chmod -- "$2" "$1"
if [ -n "$3" ]; then chown -- "$3" "$1"; fi
"""

_UNPACK_SCRIPT = r"""
set -eu
mkdir -p -- "$1"
exec tar -C "$1" -xf -
"""


class BoxError(Exception):
    """The box could not be started, used or stopped; the message says why."""


class BoxCommandError(BoxError):
    """A command run in the box failed (non-zero exit status)."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{shlex.join(cmd)} exited with status {returncode} in the box\n"
            f"--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
        )


def box_unavailable_reason() -> str | None:
    """Say why this machine cannot boot a box, or return None if it can.

    Tests call ``pytest.skip(reason)`` on a non-None answer.
    """
    if not Path("/proc/self/mountinfo").exists():
        return "not Linux with /proc mounted"
    if os.geteuid() != 0:
        return "booting a systemd box needs root"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd at {SYSTEMD} (Debian package: systemd)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs (try: modprobe overlay)"
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=BOX_PATH) is None]
    if missing:
        return f"missing programs: {', '.join(missing)}"
    return _layout_unavailable_reason()


def _layout_unavailable_reason() -> str | None:
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted (need /sys/fs/cgroup or .../unified)"
    root_dev = os.stat("/").st_dev
    for path in ("/usr", "/etc"):
        if os.stat(path).st_dev != root_dev:
            return f"{path} is a separate file system; an overlay of / would not show it"
    if not STAGING_PARENT.is_dir():
        return f"no {STAGING_PARENT} for the staging directory"
    return None


class Box:
    """A systemd booted as PID 1 in fresh namespaces on an overlay of the host root.

    Files can be put in before `start` (they are written before systemd starts, so
    unit files and drop-ins take effect at boot) or after (then run
    ``systemctl daemon-reload`` yourself, or use `install_unit`).

    Use as a context manager (``with Box() as box:`` boots and stops it), or call
    `start` and `stop`. Not thread-safe; create and stop it from one thread. If the box
    is started from the main thread, it dies with the test process (PDEATHSIG).
    """

    def __init__(self, *, extra_masks: Iterable[str] = ()) -> None:
        """Prepare, but do not boot, a box.

        Args:
            extra_masks: units to mask in addition to `MASKED_UNITS`.
        """
        self.masks = [*MASKED_UNITS, *extra_masks]
        #: Seconds from `start` to `running`, once booted.
        self.boot_seconds: float | None = None
        #: Name of the staging dir under /var/tmp and of the cgroup (set by `start`).
        self.name: str | None = None
        self._token = f"{NAME_PREFIX}{uuid.uuid4().hex[:12]}"
        self._staging: Path | None = None
        self._cgroup: Path | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._systemd_started = False
        self._stopped = False
        self._pending: list[Callable[[], None]] = []
        self._run_counter = 0

    # --- life cycle -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The host PID of the box's PID 1 (for ``nsenter -t``).

        Raises:
            BoxError: the box is not running.
        """
        if self._pid is None or self._stopped:
            raise BoxError("the box is not running: call start() first")
        return self._pid

    def start(self, timeout: float = BOOT_TIMEOUT) -> Self:
        """Boot the box and wait until systemd says `running` with no failed unit.

        Args:
            timeout: seconds from launch to `running`.

        Returns:
            The box itself, booted.

        Raises:
            BoxError: the machine cannot boot a box, setup failed, boot timed out or
                ended `degraded`; the message carries failed units with their journal,
                and the box is stopped before raising.
        """
        if self._launcher is not None:
            raise BoxError("a Box can be started only once; make a new one")
        reason = box_unavailable_reason()
        if reason is not None:
            raise BoxError(f"cannot boot a box here: {reason}")
        _sweep_stale()
        began = time.monotonic()
        deadline = began + timeout
        try:
            launcher = self._launch()
            self._wait_ready(launcher, min(deadline, time.monotonic() + SETUP_TIMEOUT))
            self._prepare()
            assert launcher.stdin is not None
            launcher.stdin.write(b"go\n")
            launcher.stdin.close()
            self._systemd_started = True
            self._wait_booted(deadline)
        except BaseException as exc:
            try:
                self.stop()
            except BoxError as cleanup:
                exc.add_note(f"and stopping the box failed too: {cleanup}")
            raise
        self.boot_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Power the box off and remove every trace of it. Idempotent.

        Asks systemd to power off; if the box is not gone within `POWEROFF_TIMEOUT`
        seconds, SIGKILLs its PID 1 (which takes the whole pid namespace with it).

        Raises:
            BoxError: something of the box survived (mount, process, cgroup, file).
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            self._power_off()
        finally:
            self._remove_traces()

    def __enter__(self) -> Self:
        if self._launcher is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- running things inside ------------------------------------------------------

    def command(
        self,
        cmd: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        unit: str | None = None,
    ) -> list[str]:
        """Build the host command line that runs `cmd` inside the booted box.

        The command runs in all the box's namespaces, as a transient scope unit of the
        box's systemd (so its cgroup is the box's, like any process systemd knows of),
        with a clean environment (PATH without pyenv or venvs, ``LANG=C.UTF-8``) plus
        `env`. With `user`, it runs through ``runuser -u USER --``. Use this with
        `subprocess.Popen` for long-running processes; `run` for everything else.

        Args:
            cmd: program and arguments, as seen inside the box.
            user: user name (or DynamicUser name) to run as, resolved inside the box.
            env: extra environment variables.
            unit: scope unit name without ``.scope`` (default: a fresh ``box-run-N``).

        Returns:
            The argv to run on the host.

        Raises:
            BoxError: the box has not booted or is stopped.
        """
        if not self._systemd_started or self._stopped:
            raise BoxError("the box is not running: call start() first")
        if unit is None:
            unit = self._next_scope()
        inner = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}", "--"]
        if user is not None:
            inner += ["runuser", "-u", user, "--"]
        return self._enter_argv([*inner, *cmd], env=env)

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the booted box and wait for it (see `command`).

        Output is captured as text. A command that backgrounds a process which keeps
        stdout open makes this wait for that process too (as with `subprocess.run`).

        Args:
            cmd: program and arguments, as seen inside the box.
            check: raise `BoxCommandError` on a non-zero exit status.
            input: text fed to the command's stdin (default: stdin is /dev/null).
            user: run as this user, through ``runuser -u``.
            env: extra environment variables.
            timeout: seconds; on expiry the command's scope is SIGKILLed.

        Returns:
            The completed process; `args` is `cmd`, not the nsenter wrapper.

        Raises:
            BoxCommandError: non-zero exit status and `check`.
            BoxError: the box is not running, or the command timed out.
        """
        unit = self._next_scope()
        argv = self.command(cmd, user=user, env=env, unit=unit)
        data = None if input is None else input.encode()
        result = self._communicate(argv, data, timeout, what=shlex.join(cmd), scope=unit)
        out = result.stdout.decode(errors="replace")
        err = result.stderr.decode(errors="replace")
        if check and result.returncode != 0:
            raise BoxCommandError(cmd, result.returncode, out, err)
        return subprocess.CompletedProcess(list(cmd), result.returncode, out, err)

    # --- files ----------------------------------------------------------------------

    def write_file(
        self, path: str, content: str | bytes, *, mode: int = 0o644, owner: str = ""
    ) -> None:
        """Write a file in the box (parents created). Before `start`, at boot.

        Args:
            path: absolute path inside the box.
            content: text (UTF-8) or bytes.
            mode: permission bits.
            owner: optional ``user[:group]`` for chown, resolved inside the box.

        Raises:
            BoxError: the box is stopped or the write failed.
            ValueError: `path` is not absolute.
        """
        _require_absolute(path)
        data = content.encode() if isinstance(content, str) else content

        def write() -> None:
            self._helper(
                ["sh", "-c", _WRITE_SCRIPT, "write-file", path, f"{mode:o}", owner],
                input=data,
                what=f"writing {path}",
            )

        self._soon(write)

    def read_file(self, path: str) -> str:
        """Return the text of a file in the booted box.

        Raises:
            BoxError: the box is not running or the file cannot be read.
            ValueError: `path` is not absolute.
        """
        _require_absolute(path)
        return self._helper(["cat", "--", path], what=f"reading {path}").decode(errors="replace")

    def copy_in(
        self, host_path: str | os.PathLike[str], box_path: str, *, exclude: Sequence[str] = ()
    ) -> None:
        """Copy a host file or directory tree into the box, as a snapshot.

        A directory's *contents* land in `box_path` (created if needed), with owners
        and modes kept. Before `start`, the copy happens at boot.

        Args:
            host_path: file or directory on the host.
            box_path: absolute destination path inside the box.
            exclude: tar ``--exclude`` patterns, e.g. ``[".venv", ".git"]``.

        Raises:
            BoxError: the box is stopped or the copy failed.
            ValueError: `box_path` is not absolute.
            FileNotFoundError: `host_path` does not exist.
        """
        _require_absolute(box_path)
        source = Path(host_path)
        if source.is_file():
            st = source.stat()
            self.write_file(box_path, source.read_bytes(), mode=st.st_mode & 0o7777)
            return
        if not source.is_dir():
            raise FileNotFoundError(f"copy_in: no such file or directory: {source}")
        self._soon(lambda: self._unpack(source, box_path, exclude))

    def install_unit(self, name: str, text: str) -> None:
        """Write ``/etc/systemd/system/NAME`` and, once booted, daemon-reload.

        Raises:
            BoxError: the write or the reload failed.
        """
        if "/" in name:
            raise ValueError(f"unit name must not contain '/': {name!r}")
        self.write_file(f"/etc/systemd/system/{name}", text)
        if self._systemd_started:
            self._helper(["systemctl", "daemon-reload"], what="systemctl daemon-reload")

    # --- diagnostics ----------------------------------------------------------------

    def journal(self, unit: str | None = None, *, lines: int = 200) -> str:
        """Return the last `lines` journal lines, of `unit` or of the whole box.

        Raises:
            BoxError: the box is not running or journalctl failed.
        """
        cmd = ["journalctl", "--no-pager", "-q", "-o", "short-monotonic", "-n", str(lines)]
        if unit is not None:
            cmd += ["-u", unit]
        return self._helper(cmd, what="journalctl").decode(errors="replace")

    def failed_units(self) -> list[str]:
        """Return the names of units in the `failed` state.

        Raises:
            BoxError: the box is not running or systemctl failed.
        """
        out = self._helper(
            ["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"],
            what="systemctl --failed",
        ).decode(errors="replace")
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def diagnose(self) -> str:
        """Describe the box's state for an error message: failed units, their status and
        journal, queued jobs and the console log. Never raises."""
        parts: list[str] = []
        try:
            failed = self.failed_units()
        except BoxError as exc:
            failed = []
            parts.append(f"(could not list failed units: {exc})")
        parts.append(f"failed units: {', '.join(failed) or 'none'}")
        for unit in failed:
            for what, cmd in (
                ("status", ["systemctl", "status", "--no-pager", "-l", "--lines=0", unit]),
                ("journal", ["journalctl", "--no-pager", "-q", "-n", "50", "-u", unit]),
            ):
                parts.append(f"--- {what} of {unit} ---\n{self._try_helper(cmd)}")
        parts.append(f"--- queued jobs ---\n{self._try_helper(['systemctl', 'list-jobs'])}")
        tail = ["journalctl", "--no-pager", "-q", "-o", "short-monotonic", "-n", "60"]
        parts.append(f"--- last journal lines ---\n{self._try_helper(tail)}")
        parts.append(f"--- console ---\n{self._console_log() or '(empty)'}")
        return "\n".join(parts)

    # --- internals: launching -------------------------------------------------------

    def _launch(self) -> subprocess.Popen[bytes]:
        self._staging = Path(tempfile.mkdtemp(prefix=self._token + "-", dir=STAGING_PARENT))
        self.name = self._staging.name
        (self._staging / "layers").mkdir()
        (self._staging / "owner").write_text(f"{os.getpid()}\n")
        cgroup2 = _cgroup2_mount()
        assert cgroup2 is not None  # checked by box_unavailable_reason
        self._cgroup = cgroup2 / self._staging.name
        (self._cgroup / "payload").mkdir(parents=True)
        (self._cgroup / "supervisor").mkdir()
        # The launcher joins `payload` before unshare(CLONE_NEWCGROUP), so that cgroup
        # becomes the root of the box's cgroup namespace; once PID 1 exists, the
        # launcher itself moves out to `supervisor` so systemd owns a clean tree.
        pdeathsig = (
            ["setpriv", "--pdeathsig", "KILL", "--"]
            if threading.current_thread() is threading.main_thread()
            else []  # PDEATHSIG fires when the *thread* that forked exits
        )
        argv = [
            *pdeathsig,
            "sh",
            "-c",
            'echo $$ > "$1" && shift && exec "$@"',
            "box-launcher",
            str(self._cgroup / "payload" / "cgroup.procs"),
            "unshare",
            "--pid",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--cgroup",
            "--fork",
            "--kill-child",
            "--propagation=private",
            "--",
            # PID 1 of the new namespaces: $0 is the systemd it finally execs.
            "sh",
            "-c",
            _INIT_SCRIPT,
            SYSTEMD,
            str(self._staging),
            uuid.uuid4().hex,
        ]
        with (self._staging / "console.log").open("wb") as console:
            self._launcher = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=console,
                env={"PATH": BOX_PATH, "LANG": "C.UTF-8"},
                start_new_session=True,  # ^C to the test's process group is ours to handle
            )
        return self._launcher

    def _wait_ready(self, launcher: subprocess.Popen[bytes], deadline: float) -> None:
        assert launcher.stdout is not None
        wait = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([launcher.stdout], [], [], wait)
        line = launcher.stdout.readline() if ready else b""
        if line != b"ready\n":
            why = "did not get ready in time" if not ready else "failed"
            raise BoxError(
                f"box setup (namespaces, mounts, pivot_root) {why}; "
                f"launcher status {launcher.poll()}\n--- console ---\n{self._console_log()}"
            )
        children = _children(launcher.pid)
        if len(children) != 1:
            raise BoxError(f"expected one child of unshare (pid {launcher.pid}), got {children}")
        pid = children[0]
        pidfd = os.pidfd_open(pid)
        nspid = _status_field(pid, "NSpid").split()
        if nspid[-1] != "1":
            os.close(pidfd)
            raise BoxError(f"pid {pid} is not PID 1 of a new pid namespace (NSpid {nspid})")
        self._pid, self._pidfd = pid, pidfd
        assert self._cgroup is not None
        (self._cgroup / "supervisor" / "cgroup.procs").write_text(f"{launcher.pid}\n")

    def _prepare(self) -> None:
        self._helper(
            ["sh", "-c", _PREPARE_SCRIPT, "prepare-box", *self.masks],
            env={"BOX_HOSTNAME": HOSTNAME},
            what="preparing the box (masks, host units disabled, fstab, hostname)",
        )
        pending, self._pending = self._pending, []
        for action in pending:
            action()

    def _wait_booted(self, deadline: float) -> None:
        state = "(no answer yet)"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BoxError(
                    f"box did not finish booting in time (last state: {state})\n" + self.diagnose()
                )
            if self._launcher is not None and self._launcher.poll() is not None:
                raise BoxError(
                    f"box PID 1 exited during boot (status {self._launcher.returncode})\n"
                    f"--- console ---\n{self._console_log()}"
                )
            try:
                result = self._communicate(
                    self._enter_argv(["systemctl", "is-system-running", "--wait"]),
                    None,
                    remaining,
                    what="systemctl is-system-running --wait",
                )
            except BoxError:
                continue  # timed out: the loop reports it with diagnostics
            state = result.stdout.decode(errors="replace").strip() or "(empty)"
            if state in ("running", "degraded", "maintenance", "stopping"):
                break
            time.sleep(BOOT_POLL_INTERVAL)  # "offline": PID 1 has no bus socket yet
        failed = self.failed_units()
        if state != "running" or failed:
            raise BoxError(
                f"box did not boot cleanly: state {state!r} (want 'running'), "
                f"failed units: {', '.join(failed) or 'none'}\n" + self.diagnose()
            )

    # --- internals: running ---------------------------------------------------------

    def _enter_argv(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None) -> list[str]:
        if self._pid is None:
            raise BoxError("the box has no PID 1 yet: call start() first")
        variables = {
            "PATH": BOX_PATH,
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
            **(env or {}),
        }
        return [
            "nsenter",
            f"--target={self._pid}",
            "--all",
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in variables.items()),
            *cmd,
        ]

    def _communicate(
        self,
        argv: list[str],
        data: bytes | None,
        timeout: float,
        *,
        what: str,
        scope: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if data is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": BOX_PATH, "LANG": "C.UTF-8"},
        )
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            if scope is not None:
                self._try_helper(["systemctl", "kill", "--signal=SIGKILL", f"{scope}.scope"])
            proc.kill()  # our own nsenter; its child in the box was in the scope
            out, err = proc.communicate()
            raise BoxError(
                f"{what} did not finish within {timeout:.1f} s in the box"
                + (f"; killed {scope}.scope" if scope else "")
                + f"\n--- stdout ---\n{out.decode(errors='replace')}"
                f"--- stderr ---\n{err.decode(errors='replace')}"
            ) from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _helper(
        self,
        cmd: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        what: str,
    ) -> bytes:
        """Run a short harness command in the box (outside any scope); raise on failure."""
        result = self._communicate(self._enter_argv(cmd, env=env), input, HELPER_TIMEOUT, what=what)
        if result.returncode != 0:
            raise BoxError(
                f"{what} failed in the box (status {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout

    def _try_helper(self, cmd: Sequence[str]) -> str:
        try:
            result = self._communicate(
                self._enter_argv(cmd), None, HELPER_TIMEOUT, what=shlex.join(cmd)
            )
        except BoxError as exc:
            return f"({exc})"
        return (result.stdout + result.stderr).decode(errors="replace")

    def _unpack(self, source: Path, box_path: str, exclude: Sequence[str]) -> None:
        excludes = [f"--exclude={pattern}" for pattern in exclude]
        with subprocess.Popen(
            ["tar", "-C", str(source), *excludes, "-cf", "-", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as pack:
            try:
                unpack = subprocess.run(
                    self._enter_argv(["sh", "-c", _UNPACK_SCRIPT, "copy-in", box_path]),
                    stdin=pack.stdout,
                    capture_output=True,
                    timeout=HELPER_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                pack.kill()
                raise BoxError(
                    f"copying {source} to {box_path} took over {HELPER_TIMEOUT} s"
                ) from None
            assert pack.stderr is not None
            pack_err = pack.stderr.read()
        if pack.returncode != 0 or unpack.returncode != 0:
            raise BoxError(
                f"copying {source} to {box_path} in the box failed: "
                f"{(pack_err + unpack.stderr).decode(errors='replace').strip()}"
            )

    def _soon(self, action: Callable[[], None]) -> None:
        if self._stopped:
            raise BoxError("the box is stopped")
        if self._pid is None:
            self._pending.append(action)
        else:
            action()

    def _next_scope(self) -> str:
        self._run_counter += 1
        return f"box-run-{self._run_counter}"

    def _console_log(self) -> str:
        if self._staging is None:
            return ""
        try:
            return (self._staging / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- internals: stopping --------------------------------------------------------

    def _power_off(self) -> None:
        launcher = self._launcher
        if launcher is None or launcher.poll() is not None:
            return
        if self._systemd_started:
            self._try_helper(["systemctl", "poweroff", "--no-block"])
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(POWEROFF_TIMEOUT)
        if launcher.poll() is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(KILL_TIMEOUT)
        if launcher.poll() is None:
            launcher.kill()  # unshare's --kill-child then kills the box's PID 1
            launcher.wait(KILL_TIMEOUT)

    def _remove_traces(self) -> None:
        problems: list[str] = []
        launcher = self._launcher
        if launcher is not None:
            for stream in (launcher.stdin, launcher.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            if launcher.poll() is None:
                problems.append(f"launcher (pid {launcher.pid}) is still running")
        if self._pidfd is not None:
            if select.select([self._pidfd], [], [], KILL_TIMEOUT)[0] == []:
                problems.append(f"box PID 1 (pid {self._pid}) is still alive")
            os.close(self._pidfd)
            self._pidfd = None
        console = self._console_log()
        if self._cgroup is not None and self._cgroup.exists():
            problems += _remove_cgroup(self._cgroup)
        if self._staging is not None:
            problems += _remove_staging(self._staging)
        if problems:
            raise BoxError(
                "the box left things behind:\n  "
                + "\n  ".join(problems)
                + (f"\n--- console ---\n{console}" if console else "")
            )


# --- module helpers -------------------------------------------------------------------


def host_mounts() -> list[str]:
    """Return the mount points of this process's mount namespace (for leak checks)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [_unescape_mountinfo(line.split()[4]) for line in lines]


def _cgroup2_mount() -> Path | None:
    """Return the cgroup2 hierarchy's mount point, preferring /sys/fs/cgroup."""
    found: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype == "cgroup2":
            found.append(Path(_unescape_mountinfo(fields[4])))
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in found:
            return preferred
    return found[0] if found else None


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise BoxError(f"/proc/{pid}/status has no {name} field")


def _children(pid: int) -> list[int]:
    """Return the child pids of `pid` (from /proc; it is our launcher, so it cannot exit
    and have its pid reused while we look: we have not reaped it)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():  # needs CONFIG_PROC_CHILDREN
        return [int(p) for p in children.read_text().split()]
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, BoxError):
                if _status_field(int(entry.name), "PPid") == str(pid):
                    found.append(int(entry.name))
    return found


def _require_absolute(path: str) -> None:
    if not PurePosixPath(path).is_absolute():
        raise ValueError(f"box paths must be absolute: {path!r}")


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(FileNotFoundError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _kill_in_cgroup(pid: int, cgroup: Path) -> None:
    """SIGKILL `pid` if, pinned by a pidfd, it is still inside our `cgroup`."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        membership = Path(f"/proc/{pid}/cgroup").read_text()
        if f"/{cgroup.name}/" in membership or membership.rstrip().endswith(cgroup.name):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
    finally:
        os.close(pidfd)


def _remove_cgroup(cgroup: Path) -> list[str]:
    problems: list[str] = []
    leftover = _cgroup_pids(cgroup)
    if leftover:
        problems.append(f"processes {leftover} were still in {cgroup}; SIGKILLed them")
        for pid in leftover:
            _kill_in_cgroup(pid, cgroup)
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        dirs = sorted(
            (p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        try:
            for directory in [*dirs, cgroup]:
                directory.rmdir()
        except OSError as exc:
            if time.monotonic() > deadline:
                problems.append(f"cannot remove cgroup {exc.filename}: {exc.strerror}")
                return problems
            time.sleep(CGROUP_POLL_INTERVAL)  # dying tasks are still being reaped
            continue
        return problems


def _remove_staging(staging: Path) -> list[str]:
    inside = [m for m in host_mounts() if m == str(staging) or m.startswith(f"{staging}/")]
    if inside:
        # Never rmtree through a mount: it would delete the mounted file system's files.
        return [f"mounts under the staging dir survived: {inside}; not removing {staging}"]
    shutil.rmtree(staging)
    return []


def _sweep_stale() -> None:
    """Remove staging dirs and cgroups of boxes whose test process died uncleanly.

    Only directories with our prefix, only if the recorded owner pid is gone, only if
    nothing is mounted there and the cgroup holds no process. Never kills anything.
    """
    cgroup2 = _cgroup2_mount()
    for staging in STAGING_PARENT.glob(f"{NAME_PREFIX}*"):
        try:
            owner = int((staging / "owner").read_text())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{owner}").exists():
            continue
        if cgroup2 is not None:
            cgroup = cgroup2 / staging.name
            if cgroup.exists():
                if _cgroup_pids(cgroup):
                    continue
                with contextlib.suppress(OSError):
                    for directory in sorted(
                        (p for p in cgroup.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts),
                        reverse=True,
                    ):
                        directory.rmdir()
                    cgroup.rmdir()
        _remove_staging(staging)  # on problems, leave it: it is reported on next use


def iter_box_cgroups() -> Iterator[Path]:
    """Yield the cgroups of boxes that exist now (for leak checks in tests)."""
    cgroup2 = _cgroup2_mount()
    if cgroup2 is not None:
        yield from cgroup2.glob(f"{NAME_PREFIX}*")
