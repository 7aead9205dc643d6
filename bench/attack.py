"""Under attack: a named worker's acquisitions while other local users flood the broker,
side by side with no attack; what the attackers cost the audit trail; a live fuzz run.

A broker of its own (bench/stage.py), with the shipped defaults (1024 connections, 64
per uid), systemd's default soft limit of 1024 open files, and one rule: `http` for
nobody, the worker, and for the hoarder. The other attackers are uids no rule names.
Each scenario runs the worker (bench/attack_client.py: the synchronous client, as
`port-broker exec` uses it, one acquisition every 20 ms) for the same time:

- none: nobody else.
- flood: one uid in connect, `list`, close loops (FLOODERS processes), never waiting
  for room in a full queue.
- slow: SLOW_UIDS uids with SLOW_CONNECTIONS connections each, a byte a second.
- hoard: an allowed uid asks for sockets and never reads them (HOARD_CONNECTIONS
  connections, pipelined or half-closed): they stay in flight, charged to the broker
  (docs/security.md, V6).

Then a fuzz run (FUZZ_CASES hostile requests, one connection each, as another unnamed
uid): the broker must still answer, with as many fds as before.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench.stage import Stage
from tests.harness.processes import (
    NOBODY,
    START_TIMEOUT,
    BrokerProcess,
    as_user,
    settled_fd_count,
)
from tests.harness.runtime import SYSTEM_PYTHON

HOARD_UID: Final = 61300
ATTACK_POLICY: Final = (
    f'[sockets.http]\nusers = ["nobody", {HOARD_UID}]\n[status]\nusers = [61200]\n'
)
"""The shipped limits (max_connections 1024, max_connections_per_user 64); the worker,
nobody, is named, and so are the hoarder (it is an allowed tenant) and the fuzzing uid
(by the status rule), so that its cases reach the parser instead of the connection rate
limit; the other attackers are not."""

ATTACK_PORT: Final = 8091
FLOOD_UID: Final = 61000
SLOW_UIDS: Final = range(61100, 61116)
SLOW_CONNECTIONS: Final = 64
HOARD_CONNECTIONS: Final = 4000
"""Connections of the hoarder: 4,000 unread grants, if the broker sent them, would pass
the open-file limit it raises itself to here (about 1,100) several times over; it must
keep the hoarder to its own 64 slots."""
FUZZ_UID: Final = 61200
FLOODERS: Final = 2
"""Processes of the flooding uid: two keep the queue full on two cores."""
WORKER_INTERVAL: Final = 0.02
"""Seconds between the worker's acquisitions: 50 a second, far more than a worker
restarting needs, enough to measure a p99."""
WARMUP: Final = 1.0
"""Seconds the attackers run before the worker starts."""

SUCCESS_BUDGET: Final = 0.99
P99_BUDGET_MS: Final = 100.0
AUDIT_LINES_BUDGET: Final = 100
"""Audit lines one attacking uid may cause per 10 s."""


def _client(stage: Stage, uid: int, *args: str) -> list[str]:
    return [*as_user(uid), SYSTEM_PYTHON, "-s", str(stage.attack_client), *args]


def _lines_for(log: str, uid: int) -> int:
    """Audit lines naming `uid` (its notices, and the summaries of them)."""
    return len(re.findall(rf"\bpeer_uid={uid}\b", log))


def _granted_lines(log: str) -> int:
    return log.count("granted socket 'http' to user nobody")


def _run_worker(stage: Stage, control: Path, seconds: float) -> dict[str, Any]:
    argv = _client(stage, NOBODY, "worker", "--socket", str(control),
                   "--seconds", str(seconds), "--interval", str(WORKER_INTERVAL))  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=stage.env(
        PYTHONPATH=str(stage.site)), timeout=seconds + START_TIMEOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the attack worker failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _scenario(
    stage: Stage, broker: BrokerProcess, name: str, attackers: list[list[str]], seconds: float
) -> dict[str, Any]:
    env = stage.env(PYTHONPATH=str(stage.site))
    control, log = broker.control, broker.log
    before = log.read_text()
    started = [stage.run_piped(argv, env=env) for argv in attackers]
    began = time.monotonic()
    try:
        time.sleep(WARMUP if attackers else 0)
        worker = _run_worker(stage, control, seconds)
    finally:
        for proc in started:
            stage.stop(proc)
    elapsed = time.monotonic() - began
    time.sleep(1.5)  # the broker sums up what it left out at its next flush
    added = log.read_text()[len(before) :]
    uids = sorted({int(u) for u in re.findall(r"\bpeer_uid=(\d+)\b", added)} - {NOBODY})
    per_uid = {uid: _lines_for(added, uid) * 10 / elapsed for uid in uids}
    return {
        "scenario": name,
        "seconds": round(elapsed, 2),
        "worker": worker,
        "success": worker["granted"] / max(worker["attempts"], 1),
        "audit_lines_per_10s": {str(uid): round(n, 1) for uid, n in per_uid.items()},
        "grants_logged": _granted_lines(added),
    }


def run(
    stage: Stage, seconds: float, fuzz_cases: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Run the scenarios and the fuzz run; return what they measured."""
    broker = stage.spawn_broker("attack", [("http", str(ATTACK_PORT))], policy=ATTACK_POLICY)
    stage.activate(broker)
    control = broker.control
    results: dict[str, Any] = {"scenarios": []}
    flood = [_client(stage, FLOOD_UID, "flood", "--socket", str(control), "--seconds",
                     str(seconds + WARMUP + 5)) for _ in range(FLOODERS)]  # fmt: skip
    slow = [_client(stage, uid, "slow", "--socket", str(control), "--seconds",
                    str(seconds + WARMUP + 5), "--connections", str(SLOW_CONNECTIONS))
            for uid in SLOW_UIDS]  # fmt: skip
    hoard = [_client(stage, HOARD_UID, "hoard", "--socket", str(control), "--seconds",
                     str(seconds + WARMUP + 5), "--connections",
                     str(HOARD_CONNECTIONS))]  # fmt: skip
    scenarios: tuple[tuple[str, list[list[str]]], ...] = (
        ("none", []),
        ("flood", flood),
        ("slow", slow),
        ("hoard", hoard),
        ("none", []),
    )
    for name, attackers in scenarios:
        outcome = _scenario(stage, broker, name, attackers, seconds)
        results["scenarios"].append(outcome)
        worker = outcome["worker"]
        progress(
            f"{name}: {worker['granted']}/{worker['attempts']} granted, "
            f"p99 {worker['p99_ms']:.1f} ms, audit lines per uid per 10 s "
            f"{max(outcome['audit_lines_per_10s'].values(), default=0):.0f}"
        )
    fds_before = settled_fd_count(broker.pid)
    argv = _client(stage, FUZZ_UID, "fuzz", "--socket", str(control), "--cases",
                   str(fuzz_cases), "--seed", "1")  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=stage.env(
        PYTHONPATH=str(stage.site)), timeout=3600, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the fuzz client failed:\n{done.stderr}")
    fuzz = json.loads(done.stdout)
    alive = broker.proc.poll() is None and stage.answers(broker)
    fuzz |= {
        "seconds": round(time.monotonic() - began, 1),
        "broker_alive": alive,
        "fds_before": fds_before,
        "fds_after": settled_fd_count(broker.pid) if alive else None,
        "internal_errors": broker.output().count("internal error"),
    }
    results["fuzz"] = fuzz
    progress(f"fuzz: {fuzz['cases']} cases in {fuzz['seconds']} s, broker alive: {alive}, "
             f"fds {fuzz['fds_before']} -> {fuzz['fds_after']}")  # fmt: skip
    stage.stop(broker.proc)
    return results
