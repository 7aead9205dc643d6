"""newuidmap and newgidmap for programs under `exec --intercept`.

The bind() filter needs no_new_privs, under which a setuid program runs without its
privilege. Rootless podman and rootlesskit (rootless Docker) set up their user namespace
with the setuid newuidmap and newgidmap, which then fail ("write to uid_map failed:
Operation not permitted") on any host that gives the user subordinate ids.

So the launcher, which runs without no_new_privs, runs them on the program's behalf:
the program's PATH starts with a private directory (mode 0700, the user's own) holding a
`newuidmap` and a `newgidmap` that pass their arguments to the launcher over a Unix
socket in that directory; the launcher runs the real one (found on the PATH it was
given) with those arguments and passes back its output and exit status. Nothing is
gained that the user lacks: the request must come from the launcher's own uid and pid
namespace (where the PID argument means the same process), and the mapper itself checks
the user's /etc/subuid and /etc/subgid as always.

The supervisor's loop serves the relay (`services()`: one fd, an epoll of the relay's
own, readable when a stand-in connects or sends): never waiting on a peer. Who connects
is checked from the kernel (SO_PEERCRED) as it is accepted, before anything is read, and
refused at once if it is not ours; a request comes in as it arrives, without a wait,
and one not whole within READ_TIMEOUT is dropped. Only the real mapper, run for the
program itself, holds the loop (a few milliseconds; at most TIMEOUT).

Must never: run a mapper for a process the launcher did not start, or from another
pid namespace (its PID argument would name another process), or wait on a peer.
Standard library only: this runs on a worker's start-up path (only with --intercept).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, NoReturn

MAPPERS: Final = ("newuidmap", "newgidmap")
SOCKET_NAME: Final = "socket"
MAX_REQUEST: Final = 64 * 1024
"""Bytes of arguments a request may carry (a mapping is a few dozen)."""
READ_TIMEOUT: Final = 1.0
"""Seconds for a whole request: a stand-in sends it at once; one not done by then (a
silent peer) is dropped when the relay next wakes."""
MAX_PENDING: Final = 16
"""Requests read at once: a program runs one mapper per namespace it makes (two); past
this a stand-in is refused, not queued."""
TIMEOUT: Final = 10.0
"""Seconds for the real mapper to run, and for a stand-in to wait for its answer."""
_SHIM: Final = """\
#!{python} -I
import sys
sys.path.insert(0, {package!r})
from broker.intercept.idmap import shim
shim()
"""
_PEERCRED: Final = struct.Struct("3i")


class _Request:
    """A stand-in's request as it comes in."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.data = b""
        self.deadline = time.monotonic() + READ_TIMEOUT


class Relay:
    """The directory of stand-ins and the socket they reach the launcher on.

    Nothing is made when no mapper is on PATH, nor when the directory cannot be (said on
    stderr): `services()` is then empty and `environment()` ours.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        path = environ.get("PATH", os.defpath)
        self.mappers = {name: real for name in MAPPERS if (real := shutil.which(name, path=path))}
        self.path = path
        self.directory: Path | None = None
        self.listener: socket.socket | None = None
        self._poll: select.epoll | None = None
        self._pending: dict[int, _Request] = {}
        if not self.mappers:
            return
        runtime = environ.get("XDG_RUNTIME_DIR")
        parent = runtime if runtime and os.access(runtime, os.W_OK | os.X_OK) else None
        try:
            self.directory = Path(tempfile.mkdtemp(prefix="port-broker-idmap.", dir=parent))
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(self.directory / SOCKET_NAME))
            self.listener.listen(MAX_PENDING)
            self.listener.setblocking(False)
            self._poll = select.epoll()
            self._poll.register(self.listener, select.EPOLLIN)
            package = str(Path(__file__).resolve().parents[2])  # holds broker/
            text = _SHIM.format(python=sys.executable, package=package)
            for name in self.mappers:
                shim_path = self.directory / name
                shim_path.write_text(text)
                shim_path.chmod(0o700)
        except OSError as e:
            self.close()
            sys.stderr.write(
                f"port-broker exec: cannot make the stand-ins for {', '.join(self.mappers)} "
                f"under {parent or tempfile.gettempdir()} ({e.strerror or e}): under "
                "--intercept they run without their setuid privilege\n"
            )
        except BaseException:
            self.close()
            raise

    def environment(self) -> dict[str, str]:
        """The program's environment: ours, with the stand-ins first on PATH."""
        env = dict(self.environ)
        if self.directory is not None:
            env["PATH"] = f"{self.directory}{os.pathsep}{self.path}"
        return env

    def services(self) -> dict[int, Callable[[], None]]:
        """For `run_intercepted`: the fd to watch, and what to run when it is readable."""
        return {} if self._poll is None else {self._poll.fileno(): self.serve}

    def serve(self) -> None:
        """Take what is ready now (new stand-ins, their requests), answer the requests
        that are whole, drop those past their time; never waits on a peer, never raises,
        so that no request can stall or stop the supervisor, and with it the program."""
        if self._poll is None:
            return
        with contextlib.suppress(OSError):
            for fd, _ in self._poll.poll(0):
                if self.listener is not None and fd == self.listener.fileno():
                    self._accept()
                elif fd in self._pending:
                    self._read(self._pending[fd])
        now = time.monotonic()
        for request in [r for r in self._pending.values() if r.deadline <= now]:
            self._finish(request, _reply(1, "the request did not arrive in time"))

    def _accept(self) -> None:
        listener, poll = self.listener, self._poll
        if listener is None or poll is None:
            return
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # none waiting (or out of fds: the stand-in fails, not the program)
                return
            conn.setblocking(False)
            pid, uid, _ = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            problem = self._refusal(pid, uid)
            if problem is None and len(self._pending) >= MAX_PENDING:
                problem = f"more than {MAX_PENDING} requests at once"
            request = _Request(conn, pid)
            if problem is not None:  # said at once, nothing read: it cannot hold us
                self._finish(request, _reply(1, problem), registered=False)
                continue
            self._pending[conn.fileno()] = request
            poll.register(conn, select.EPOLLIN)

    def _read(self, request: _Request) -> None:
        """Take what the stand-in sent; answer once it has sent all (end of stream)."""
        try:
            chunk = request.conn.recv(MAX_REQUEST + 1 - len(request.data))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        request.data += chunk
        if len(request.data) > MAX_REQUEST:
            self._finish(request, _reply(1, "request too long"))
        elif not chunk:
            self._finish(request, self._answer(request.data))

    def _answer(self, data: bytes) -> bytes:
        name, *args = os.fsdecode(data).split("\0")
        if name not in self.mappers:
            return _reply(1, f"{name!r} is not one of {', '.join(self.mappers)}")
        try:
            return _run(self.mappers[name], args)
        except Exception as e:  # said to the stand-in, which exits 1
            return _reply(1, f"cannot run it: {e!r}")

    def _finish(self, request: _Request, answer: bytes, *, registered: bool = True) -> None:
        """Send what fits of `answer` without waiting (a mapper says a line or two) and
        close."""
        conn = request.conn
        if registered and self._poll is not None:
            self._pending.pop(conn.fileno(), None)
            with contextlib.suppress(OSError):
                self._poll.unregister(conn)
        with conn, contextlib.suppress(OSError):
            conn.send(answer)
            conn.recv(MAX_REQUEST + 1)  # what it sent unread would reset the answer

    def _refusal(self, pid: int, uid: int) -> str | None:
        if uid != os.getuid():
            return f"asked by uid {uid}, not the launcher's uid {os.getuid()}"
        if not _descends_from_us(pid):
            return f"asked by pid {pid}, which the launcher did not start"
        if not _same_pid_namespace(pid):
            return (
                "asked from another pid namespace, where the PID it names is another "
                "process: run it outside port-broker exec --intercept"
            )
        return None

    def close(self) -> None:
        """Stop serving and remove the directory."""
        for request in list(self._pending.values()):
            self._finish(request, b"")
        if self._poll is not None:
            self._poll.close()
            self._poll = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _run(real: str, args: list[str]) -> bytes:
    """Run the real mapper; its status, then its output."""
    import subprocess  # noqa: PLC0415  (only here: most programs never ask)

    try:
        done = subprocess.run(
            [real, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return _reply(1, f"{real}: {e}")
    code = done.returncode if done.returncode >= 0 else 128 - done.returncode
    return struct.pack("!i", code) + done.stdout + done.stderr


def _descends_from_us(pid: int) -> bool:
    """Whether `pid` is a descendant of ours: the program or what it started (we are
    its subreaper: orphans stay ours). Another process of the same user, under
    no_new_privs of its own, must not get the mappers' privilege back through us."""
    ours = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])  # field 4: ppid
        except (OSError, ValueError, IndexError):
            return False
        if pid == ours:
            return True
    return False


def _same_pid_namespace(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _reply(status: int, message: str) -> bytes:
    return struct.pack("!i", status) + f"port-broker exec: {message}\n".encode(
        errors="backslashreplace"
    )


def shim() -> NoReturn:
    """The stand-in's main: ask the launcher to run the real mapper; exit as it did."""
    here = Path(sys.argv[0])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2 * TIMEOUT)
            sock.connect(str(here.parent / SOCKET_NAME))
            # A refusal comes at once, before the request is read: read it all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(os.fsencode("\0".join([here.name, *sys.argv[1:]])))
                sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    except OSError as e:
        sys.stderr.write(
            f"{here.name} (port-broker exec --intercept): cannot reach the launcher at "
            f"{here.parent / SOCKET_NAME}: {e.strerror or e}\n"
        )
        sys.exit(1)
    if len(reply) < 4:
        sys.stderr.write(f"{here.name} (port-broker exec --intercept): no answer\n")
        sys.exit(1)
    sys.stderr.buffer.write(reply[4:])
    sys.stderr.flush()
    sys.exit(struct.unpack("!i", reply[:4])[0])
