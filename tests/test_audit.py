"""Tests for `broker.audit`: where the broker's records go and what a line holds.

The journal is detected from JOURNAL_STREAM as systemd sets it; lines written to stderr
are checked as a reader (or a log shipper) parses them.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Final

import pytest

from broker.daemon.audit import Audit, Level
from broker.daemon.identity import Peer
from tests.harness.inprocess import audit_fields


def test_audit_detects_the_journal_from_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert Audit().journal is True
    for other in (f"{st.st_dev}:{st.st_ino + 1}", "garbage", ""):
        monkeypatch.setenv("JOURNAL_STREAM", other)
        assert Audit().journal is False
    monkeypatch.delenv("JOURNAL_STREAM")
    assert Audit().journal is False
    assert Audit(journal=False).journal is False


def test_audit_quotes_values_and_bounds_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    audit = Audit(journal=False)
    peer = Peer(pid=7, uid=1000, gid=1000, user=None, unit="web.service")
    audit.decision(False, peer, "http", 'said "hi"\nand ' + "x" * 1000, "denied")
    (line,) = capsys.readouterr().err.splitlines()  # one line, whatever the reason holds
    assert line.startswith(
        "port-broker: notice: denied socket 'http' to unnamed user (uid 1000, pid 7, "
        "unit web.service) "
    )
    fields = audit_fields(line)
    assert fields["peer_user"] == ""
    assert fields["peer_unit"] == "web.service"
    assert fields["reason"] == 'said "hi"\\nand ' + "x" * (512 - 14)  # the newline, escaped
    assert "message_id" not in fields


HOSTILE: Final = [
    "\n", "\r", "\x1b[2J", "\x00", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u200b",
    "\ufeff", "\udcff",
]  # fmt: skip
"""What a client or a cgroup name can carry that would end, hide or restyle a log line."""


@pytest.mark.parametrize("bad", HOSTILE, ids=ascii)
def test_every_event_is_one_printable_line_whatever_its_parts_hold(
    capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    audit = Audit(journal=False)
    forged = f"{bad}port-broker: info: granted socket 'http' to user root (uid 0, pid 1)"
    peer = Peer(pid=7, uid=1000, gid=1000, user=f"u{bad}", unit=f"w{bad}.service",
                cgroup=f"/x{bad}.slice/w{bad}.service")  # fmt: skip
    audit.decision(True, peer, f"http{bad}", f"reason{forged}")
    audit.log(Level.NOTICE, f"refused: key x{forged}", DETAIL=f"d{forged}")
    audit.log(Level.ERROR, "a bug", EXCEPTION=f"Traceback\n  line{bad}\nError")
    lines = capsys.readouterr().err.split("\n")
    assert lines[-1] == ""
    assert len(lines[:-1]) == 3
    escaped = ascii(bad)[1:-1]
    for line in lines[:-1]:
        assert line.isprintable()
        assert bad not in line
        assert line.startswith("port-broker: ")
    assert f"user u{escaped} (" in lines[0]
    assert audit_fields(lines[0])["peer_cgroup"] == f"/x{escaped}.slice/w{escaped}.service"
    if bad != "\n":  # a traceback keeps its own line breaks, as a field of its own
        assert audit_fields(lines[2])["exception"] == f"Traceback\n  line{escaped}\nError"


def test_audit_never_raises_into_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    Audit(journal=False).log(Level.ERROR, "nobody hears this", DETAIL="x")
