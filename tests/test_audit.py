"""Tests for `broker.audit`: where the broker's records go and what a line holds.

The journal is detected from JOURNAL_STREAM as systemd sets it; lines written to stderr
are checked as a reader (or a log shipper) parses them.
"""

from __future__ import annotations

import io
import os
import sys

import pytest

from broker.audit import Audit
from broker.identity import Peer
from broker.names import Level
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
    assert fields["reason"] == ('said "hi"\nand ' + "x" * 1000)[:512]
    assert "message_id" not in fields


def test_audit_never_raises_into_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    Audit(journal=False).log(Level.ERROR, "nobody hears this", DETAIL="x")
