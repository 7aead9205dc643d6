"""The accept loop on the control socket (trio's _highlevel_serve_listeners.py is the
model): take connections in batches, and know what each accept() error means.

Must never: spin on an error that retrying at once cannot fix, or die of one that a
single client caused.
"""

from __future__ import annotations

import enum
import errno
import socket
from collections.abc import Callable
from typing import Final

import trio

from broker.daemon.audit import Audit, Level

ACCEPT_BACKOFF: Final = 0.1
"""Seconds to pause accepting when out of fds or memory, as trio does: retrying at once
would spin; the pause lets finishing clients free resources."""

ACCEPT_BATCH: Final = 8
"""Connections admitted per wakeup of the accept loop before it yields: fewer wakeups
under a burst of clients (measured: +25 % grants/s), while larger batches let new
clients overtake connected ones (at 64 per batch the p99 latency doubled)."""

ACCEPT_MOST: Final = 256
"""Connections accepted per wakeup in all, refused ones included: a refusal at accept
starts no task and costs microseconds, so a flood of them is drained in long runs (the
queue empties faster than a flooder fills it), yet not for ever."""


class _Then(enum.Enum):
    SKIP = "skip"
    BACK_OFF = "back off"


ACCEPT_ERRORS: Final[dict[int, _Then]] = {
    # This one connection is bad, the next may be fine: the client reset before we took
    # it, its handshake failed, or a security module refused it.
    errno.ECONNABORTED: _Then.SKIP,
    errno.EPROTO: _Then.SKIP,
    errno.EPERM: _Then.SKIP,
    # Out of a resource that finishing clients give back: pause, then retry. At once,
    # the loop would spin (the pending connection stays pending).
    errno.EMFILE: _Then.BACK_OFF,
    errno.ENFILE: _Then.BACK_OFF,
    errno.ENOMEM: _Then.BACK_OFF,
    errno.ENOBUFS: _Then.BACK_OFF,
    # Anything else (EBADF, EINVAL, ENOTSOCK…) means the control socket itself is
    # broken: the error propagates, the broker exits, systemd restarts it.
}


async def accept_loop(
    listener: socket.socket, admit: Callable[[socket.socket], bool], audit: Audit
) -> None:
    """Accept on `listener` (non-blocking) for ever, passing each non-blocking
    connection to `admit`, which owns it from then on and says whether it started
    serving it (False: refused at once)."""
    paused_since: float | None = None  # logged once when it pauses, once when it resumes
    while True:
        await trio.lowlevel.wait_readable(listener)
        admitted = 0
        for _ in range(ACCEPT_MOST):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                then = ACCEPT_ERRORS.get(e.errno or 0)
                if then is None:
                    raise
                if then is _Then.SKIP:
                    continue
                if paused_since is None:
                    paused_since = trio.current_time()
                    audit.log(
                        Level.WARNING,
                        f"accept on the control socket: {e.strerror}; retrying every "
                        f"{ACCEPT_BACKOFF:g}s (raise LimitNOFILE= or lower max_connections)",
                    )
                await trio.sleep(ACCEPT_BACKOFF)
                break
            if paused_since is not None:
                paused = trio.current_time() - paused_since
                audit.log(
                    Level.NOTICE,
                    f"accept on the control socket: accepting again after {paused:.1f}s",
                )
                paused_since = None
            conn.setblocking(False)
            admitted += admit(conn)
            if admitted >= ACCEPT_BATCH:
                break
