"""`port-broker exec`: acquire sockets, hand them to a program the way systemd does.

The sockets are placed at fd 3, 4, … in request order; LISTEN_FDS, LISTEN_FDNAMES and
LISTEN_PID are set (sd_listen_fds(3)), and LISTEN_PIDFDID where the kernel gives
processes a pidfd of their own (as systemd 256+ does); every other LISTEN_* inherited
is removed, so nothing stale (another process's LISTEN_PIDFDID, which would make
sd_listen_fds() refuse the sockets) reaches the program. Then the program replaces this
process, so the pid stays the same and nothing of port-broker remains running. Node
serves with `server.listen({fd: 3})`, gunicorn by itself (it reads LISTEN_FDS; adding
`--bind fd://3` would make it close fd 3 twice), uvicorn with `--fd 3`.

Must never: import a module a bare interpreter has not already loaded but C ones
(`fcntl`): this runs before every worker starts (broker/names.py says why).
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Final, NoReturn

LISTEN_FDS_START: Final = 3  # SD_LISTEN_FDS_START


class CannotPlace(OSError):
    """The granted sockets could not be moved to fd 3.. (out of fds, most likely): the
    command was not run."""


def place_fds(fds: Sequence[int]) -> None:
    """Move `fds` to 3, 4, … (in order), inheritable; the originals are closed.

    Whatever was at those numbers before is replaced, as systemd does. Safe whatever
    numbers the fds have now, including ones inside the target range.
    """
    target_end = LISTEN_FDS_START + len(fds)
    # First move every fd out of the target range, so no dup2 clobbers a source.
    moved = []
    for fd in fds:
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, target_end))
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        os.close(fd)


def pidfd_id() -> int | None:
    """This process's pidfd inode number, which systemd 256+ puts in LISTEN_PIDFDID: a
    number no other process shares for the boot where pidfds have a file system of their
    own (pidfs, Linux 6.9+); None before that, where every pidfd shares the anonymous
    inode of eventfds and the like, and so its st_dev."""
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:
        return None
    try:
        anonymous = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            shared = os.fstat(anonymous).st_dev
        finally:
            os.close(anonymous)
        own = os.fstat(pidfd)
    except OSError:  # out of fds, say: no LISTEN_PIDFDID, as on an older kernel
        return None
    finally:
        os.close(pidfd)
    return None if own.st_dev == shared else own.st_ino


def listen_environment(names: Sequence[str], base: Mapping[str, str]) -> dict[str, str]:
    """Return `base` without any LISTEN_* of its own, plus LISTEN_FDS, LISTEN_FDNAMES,
    LISTEN_PID and (where the kernel has it) LISTEN_PIDFDID for this process."""
    env = {key: value for key, value in base.items() if not key.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(len(names))
    env["LISTEN_FDNAMES"] = ":".join(names)
    env["LISTEN_PID"] = str(os.getpid())
    pidfdid = pidfd_id()
    if pidfdid is not None:
        env["LISTEN_PIDFDID"] = str(pidfdid)
    return env


def exec_with(
    grants: Sequence[tuple[str, int]],
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> NoReturn:
    """Place the granted sockets (name, fd) at fd 3.. and replace this process with
    `argv`; the fds given are closed (each is at its new number).

    Raises:
        CannotPlace: the sockets could not be moved (this process's open-file limit).
        OSError: if `argv[0]` cannot be executed (FileNotFoundError, PermissionError…);
            the sockets are closed by then only when this process exits.
    """
    names = [name for name, _ in grants]
    try:
        place_fds([fd for _, fd in grants])
    except OSError as e:
        raise CannotPlace(e.errno, e.strerror) from None
    env = listen_environment(names, os.environ if environ is None else environ)
    os.execvpe(argv[0], list(argv), env)
