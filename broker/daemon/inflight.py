"""Granted fds in flight: passed to a client, not yet read by it.

The kernel charges every fd passed with SCM_RIGHTS to the sending user (the broker's)
until the receiver reads it or closes its end, and refuses further SCM_RIGHTS with
ETOOMANYREFS once that count passes the sender's RLIMIT_NOFILE. A client that asks and
never reads would so park the broker's fds in its own receive queue, for as long as it
keeps the connection open, and make every later grant to everyone fail.

The rules that bound it (docs/security.md, "V6"):

1. A connection has at most one reply whose fds its peer has not read: the next grant
   on it waits until the peer has read (SIOCOUTQ on our end is 0: nothing we sent is
   left in its queue), within the reply's deadline; past it the peer is not reading,
   and the connection is done.
2. A connection whose fds are unread keeps its slot (and its uid's) after the broker is
   done with it, until the peer reads them or closes: slots bound what is in flight.

So one uid has at most `max_connections_per_user` replies unread, and the broker at
most `max_connections`, each carrying at most every socket it holds:
max_connections times the held sockets in flight at worst, which the start-up fits
RLIMIT_NOFILE to (broker/daemon/start.py) and the unit's LimitNOFILE= covers.

Must never: forget fds it counted (every `sent` is matched by a `taken` when the peer
reads, closes or the connection ends), or block: it asks the kernel, it never waits on
the peer itself.
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios
from collections import Counter
from typing import Final

import trio

from broker.status import Holder, Unread

SIOCOUTQ: Final = termios.TIOCOUTQ
"""Bytes we sent on a socket that its peer has not read yet (for AF_UNIX, what is still
charged to our side: a reply, and its fds, are unread until this is 0)."""

POLL_FIRST: Final = 0.001
POLL_MOST: Final = 0.5
"""Seconds between looks at a connection whose peer has not read its fds: from 1 ms (a
client about to read) doubling to half a second (a hoarder, or a client that is gone
for good; its slot comes back within that of its reading)."""

HOLDERS_SHOWN: Final = 10
"""uids with the most unread fds named by `status` and the log."""


def unread_bytes(conn: socket.socket) -> int:
    """What we sent on `conn` that its peer has not read (0 once it closed, too)."""
    count = array.array("i", [0])
    fcntl.ioctl(conn.fileno(), SIOCOUTQ, count, True)
    return count[0]


class InFlight:
    """fds passed to clients and not yet read, per uid (what `status` shows)."""

    def __init__(self) -> None:
        self.by_uid: Counter[int] = Counter()

    @property
    def total(self) -> int:
        return self.by_uid.total()

    def holders(self) -> list[Holder]:
        """The uids holding the most unread fds, most first."""
        return [{"uid": uid, "fds": n} for uid, n in self.by_uid.most_common(HOLDERS_SHOWN)]

    def report(self) -> Unread:
        """The status report's `unread`."""
        return {"fds": self.total, "holders": self.holders()}

    def refused(self) -> str:
        """Why the kernel refused to pass fds (ETOOMANYREFS), naming who holds them."""
        if not self.by_uid:
            return (
                "the kernel refuses to pass more sockets now (too many references), and "
                "none of those in flight were granted by this broker: another process of "
                "the broker's uid holds them (docs/security.md, V7); retry shortly"
            )
        shown = ", ".join(f"uid {h['uid']} holds {h['fds']}" for h in self.holders())
        return (
            f"the kernel refuses to pass more sockets now (too many references): "
            f"{self.total} granted earlier are still unread by their receivers ({shown}); "
            "retry shortly"
        )


class Delivery:
    """The fds sent on one connection that its peer may not have read yet (rule 1).

    Args:
        conn: The connection (the caller's; only asked, never closed here).
        uid: Its peer's uid, for `InFlight`.
        inflight: Where unread fds are counted.
    """

    def __init__(self, conn: socket.socket, uid: int, inflight: InFlight) -> None:
        self._conn = conn
        self._uid = uid
        self.inflight = inflight
        self.fds = 0

    def sent(self, fds: int) -> None:
        """`fds` went to the peer with a reply."""
        self.fds += fds
        self.inflight.by_uid[self._uid] += fds

    def taken(self) -> bool:
        """Whether the peer has read every fd sent to it (asks the kernel if not known)."""
        if self.fds and unread_bytes(self._conn) == 0:
            self._forget()
        return not self.fds

    def abandon(self) -> None:
        """The connection is closed now, whatever the peer read: count nothing more."""
        if self.fds:
            self._forget()

    async def wait_taken(self) -> None:
        """Wait until the peer has read its fds (the caller bounds the wait)."""
        delay = POLL_FIRST
        while not self.taken():
            await trio.sleep(delay)
            delay = min(delay * 2, POLL_MOST)

    def _forget(self) -> None:
        self.inflight.by_uid[self._uid] -= self.fds
        if self.inflight.by_uid[self._uid] <= 0:
            del self.inflight.by_uid[self._uid]
        self.fds = 0
