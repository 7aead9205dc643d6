"""broker/daemon/journal.py: records to journald's native socket, never waited on.

A real datagram socket stands for journald here, bound in the test's directory and read
(or not) by the test; the real journald, stopped under a real systemd, is in
tests/test_systemd.py.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import pytest

from broker.daemon.audit import Audit, Level
from broker.daemon.journal import Journal, native

SEND_BUDGET: Final = 0.05
"""Seconds one send may take, at most, whatever the journal does: it never waits."""


def parse(datagram: bytes) -> dict[str, str]:
    """The fields of one native-protocol record."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, tail = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = tail
        else:
            (size,) = struct.unpack("<Q", tail[:8])
            fields[line.decode()] = tail[8 : 8 + size].decode()
            assert tail[8 + size : 9 + size] == b"\n"
            rest = tail[9 + size :]
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[socket.socket]:
    """A socket where journald's would be, read only when the test says so."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.socket"))
    try:
        yield sock
    finally:
        sock.close()


def records(sock: socket.socket, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
    sock.settimeout(timeout)
    return [parse(sock.recv(1 << 20)) for _ in range(count)]


def summary(lost: int, seconds: float) -> Mapping[str, object]:
    return {"MESSAGE": f"{lost} lost in {seconds:.0f} s", "LOST": lost}


def test_a_record_is_sent_in_the_native_format(journald: socket.socket) -> None:
    journal = Journal(summary, journald.getsockname())
    journal.send({"MESSAGE": "granted", "PRIORITY": 6, "EXCEPTION": "Traceback\n  line\n"})
    assert records(journald, 1) == [
        {"MESSAGE": "granted", "PRIORITY": "6", "EXCEPTION": "Traceback\n  line\n"}
    ]
    assert native({"A": "b\n"}) == b"A\n" + struct.pack("<Q", 2) + b"b\n\n"
    assert journal.lost == 0
    journal.close()


def test_a_journal_that_takes_nothing_costs_records_never_time(journald: socket.socket) -> None:
    # Its queue (net.unix.max_dgram_qlen) fills, then the backlog; what comes after is
    # lost, counted, and said once the journal reads again, after everything kept.
    journal = Journal(summary, journald.getsockname(), backlog=10)
    slowest = 0.0
    sent = 0
    while journal.waiting < 10:  # the kernel's queue is full once the backlog grows
        began = time.monotonic()
        journal.send({"MESSAGE": f"record {sent}"})
        slowest = max(slowest, time.monotonic() - began)
        sent += 1
        assert sent < 100_000, "the journal's socket never filled"
    for n in range(50):
        began = time.monotonic()
        journal.send({"MESSAGE": f"lost {n}"})
        slowest = max(slowest, time.monotonic() - began)
    assert slowest < SEND_BUDGET
    assert journal.lost == 50
    got = records(journald, sent + 1)
    assert [r["MESSAGE"] for r in got[:sent]] == [f"record {n}" for n in range(sent)]
    assert got[-1]["LOST"] == "50"
    journal.close()
    assert journal.waiting == 0
    assert journal.lost == 50  # the summary went


def test_no_journal_there_is_a_lost_record_not_an_error(tmp_path: Path) -> None:
    journal = Journal(summary, str(tmp_path / "absent"))
    journal.send({"MESSAGE": "nobody hears this"})
    assert journal.lost == 1
    assert journal.waiting == 0
    journal.close()


def test_audit_writes_to_the_journal_with_its_identifier_and_counts_what_is_lost(
    journald: socket.socket, tmp_path: Path
) -> None:
    audit = Audit(journal=True, socket=journald.getsockname())
    audit.log(Level.NOTICE, "refused\x1b[2J", PEER_UID=7)
    audit.close()
    (record,) = records(journald, 1)
    assert record == {
        "MESSAGE": "refused\\x1b[2J",
        "PRIORITY": "5",
        "SYSLOG_IDENTIFIER": "port-broker",
        "PEER_UID": "7",
    }
    gone = Audit(journal=True, socket=str(tmp_path / "absent"))
    assert gone.lost == 0
    gone.log(Level.INFO, "x")
    assert gone.lost == 1
    gone.close()
