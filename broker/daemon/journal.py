"""Writing records to the journal without ever waiting for it.

journald reads its native socket (/run/systemd/journal/socket, datagrams) at its own
pace; once its queue is full (net.unix.max_dgram_qlen, 512 by default) a blocking send
waits until it reads again, and a stopped or overloaded journald (a full disk, a flood
elsewhere) would stop every grant with it. So each record is sent without waiting
(MSG_DONTWAIT, in the journal's native format); one the socket will not take now goes
to a backlog of at most BACKLOG records, which a thread of its own sends, in order,
waiting as long as journald makes it. Past that bound records are lost and counted; once
journald takes records again, one more says how many were lost
(systemd.io/JOURNAL_NATIVE_PROTOCOL).

Must never: block the caller, reorder records, or grow past BACKLOG.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

SOCKET: Final = "/run/systemd/journal/socket"
"""journald's native socket (sd_journal_sendv(3) writes there)."""

BACKLOG: Final = 1024
"""Records kept while journald takes none, on top of its own queue (512 datagrams): a
few seconds of grants at the broker's full rate, hours at a worker's pace; about 1 MiB
at most (a record is under 1 KiB). Past it, records are counted as lost, not kept: the
broker's memory stays bounded whatever journald does."""

CLOSE_WAIT: Final = 1.0
"""Seconds `close` waits for the backlog to go at exit: enough for journald that is only
slow, not for one that is stopped."""

Summary = Callable[[int, float], Mapping[str, object]]
"""(records lost, seconds since the first of them) → the fields of the record saying so."""


def native(fields: Mapping[str, object]) -> bytes:
    """`fields` in the journal's native format: KEY=VALUE lines, or, for a value holding
    a newline, KEY, its length as a little-endian 64-bit number, and the value."""
    values = [str(value) for value in fields.values()]
    if not any("\n" in value for value in values):  # every record but a traceback
        text = "".join(f"{key}={value}\n" for key, value in zip(fields, values, strict=True))
        return text.encode("utf-8", "backslashreplace")
    parts = []
    for key, value in fields.items():
        data = str(value).encode("utf-8", "backslashreplace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class Journal:
    """journald's native socket, never waited on by the caller.

    Args:
        summary: Makes the record that says how many were lost.
        path: The socket (tests point it elsewhere).
        backlog: Most records kept while the socket takes none.
    """

    def __init__(self, summary: Summary, path: str = SOCKET, backlog: int = BACKLOG) -> None:
        self.path = path
        self.lost = 0  # records not written: past the backlog, or refused by journald
        self._summary = summary
        self._limit = backlog
        self._socket: socket.socket | None = None  # made by the first record
        self._backlog: collections.deque[bytes] = collections.deque()
        self._dropped = 0  # lost since the last summary
        self._dropped_since = 0.0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits for records
        self._drained = threading.Condition(self._lock)  # close() waits for the writer
        self._writer: threading.Thread | None = None

    def send(self, fields: Mapping[str, object]) -> None:
        """Send one record now if journald takes it, else keep it for the writer."""
        payload = native(fields)
        with self._lock:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
            if not self._backlog:
                try:
                    self._socket.sendto(payload, socket.MSG_DONTWAIT, self.path)
                except BlockingIOError:
                    pass  # journald's queue is full: the writer waits for it
                except OSError:
                    self.lost += 1  # no journald there (or too large): nothing to wait for
                    return
                else:
                    return
            if len(self._backlog) >= self._limit:
                self.lost += 1
                if not self._dropped:
                    self._dropped_since = time.monotonic()
                self._dropped += 1
                return
            self._backlog.append(payload)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write, name="journal writer", daemon=True
                )
                self._writer.start()
            self._work.notify()

    @property
    def waiting(self) -> int:
        """Records kept for the writer."""
        return len(self._backlog)

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Give the backlog up to `wait` seconds to go, then close the socket unless the
        writer still waits on it (at exit: the process ends it then)."""
        deadline = time.monotonic() + wait
        with self._lock:
            while self._backlog and time.monotonic() < deadline:
                self._drained.wait(max(deadline - time.monotonic(), 0))
            if not self._backlog and self._socket is not None:
                self._socket.close()
                self._socket = None

    def _write(self) -> None:
        """The writer thread: send the backlog in order, waiting on journald; once it is
        all sent, say how many records were lost meanwhile, if any."""
        while True:
            with self._lock:
                while not self._backlog:
                    self._work.wait()
                payload = self._backlog[0]
            sent = self._send_waiting(payload)
            with self._lock:
                self._backlog.popleft()
                self.lost += not sent
                dropped = 0
                if not self._backlog:
                    dropped, self._dropped = self._dropped, 0
                    self._drained.notify_all()
                since = self._dropped_since
            if dropped:
                summary = native(self._summary(dropped, time.monotonic() - since))
                sent = self._send_waiting(summary)
                with self._lock:
                    self.lost += not sent

    def _send_waiting(self, payload: bytes) -> bool:
        """Send `payload`, waiting for journald as long as it takes (the writer only,
        while records wait: `close` leaves the socket open then)."""
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.sendto(payload, self.path)
        except OSError:
            return False
        return True
