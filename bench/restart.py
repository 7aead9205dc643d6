"""Worker restart under load: a paced request loop on loopback while the worker is
stopped (SIGTERM) and started again N times; every request that did not get its 200 is
counted, by cause.

- broker: `port-broker exec http -- node hello.js` on :80. The broker and
  systemd-socket-activate keep the socket listening while no worker runs, so new
  connections wait in the kernel's backlog for the next worker.
- direct: node binds :8080 itself. Between the old worker's exit and the new one's
  listen() nothing listens, and connections are refused.

The setups alternate round by round. The loop is bounded twice: it runs only while the
restarts do, and never sends more than MAX_REQUESTS.
"""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from bench.datapath import BROKER_PORT, DIRECT_PORT
from bench.stage import Stage, wait_http
from bench.stats import percentile
from tests.harness.processes import http_get

LOAD_THREADS: Final = 4
"""Requests in flight at once, as a small site sees; threads, as each request blocks."""
REQUEST_RATE: Final = 800.0
"""Requests per second over all threads: bounded and steady, so a refusal count reads
as time without a listener (count / rate), and Python clients keep pace easily."""
RESTART_GAP: Final = 1.0
"""Seconds between restarts: the new worker (up in ≈0.2 s) serves a while before the
next stop, and the loop runs ≈(N+1) s in all."""
MAX_REQUESTS: Final = 20_000
"""A hard bound on the loop whatever the knobs say."""


@dataclass
class Tally:
    """What happened to the requests of one run."""

    ok: int = 0
    refused: int = 0
    reset: int = 0
    timeout: int = 0
    other: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sent(self) -> int:
        return self.ok + self.refused + self.reset + self.timeout + self.other

    def record(self, outcome: str, latency_ms: float) -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome == "ok":
                self.latencies_ms.append(latency_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "refused": self.refused,
            "reset": self.reset,
            "timeout": self.timeout,
            "other": self.other,
            "failed": self.sent - self.ok,
            "p99_ms": percentile(self.latencies_ms, 99),
            "max_ms": max(self.latencies_ms, default=float("nan")),
        }


def _outcome(port: int) -> str:
    """Send one GET; name what happened."""
    try:
        http_get("127.0.0.1", port)
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):  # incl. RemoteDisconnected
        return "reset"
    except TimeoutError:
        return "timeout"
    except (OSError, http.client.HTTPException, AssertionError):  # AssertionError: not 200
        return "other"
    return "ok"


def _load(port: int, stop: threading.Event, tally: Tally, offset: float) -> None:
    """Send requests to `port` on a fixed schedule until `stop` (or MAX_REQUESTS)."""
    period = LOAD_THREADS / REQUEST_RATE
    began = time.monotonic() + offset * period
    for index in range(MAX_REQUESTS // LOAD_THREADS):
        wait = began + index * period - time.monotonic()
        if stop.wait(wait) if wait > 0 else stop.is_set():
            return
        started = time.monotonic()
        tally.record(_outcome(port), (time.monotonic() - started) * 1000)


@dataclass(frozen=True)
class Setup:
    """A worker that can be restarted, and where it serves."""

    key: str
    label: str
    port: int
    start: Callable[[Stage], subprocess.Popen[str]]


def _broker_worker(stage: Stage) -> subprocess.Popen[str]:
    return stage.start(
        "exec", [str(stage.launcher), "exec", "http", "--", "node", str(stage.hello)]
    )


def _direct_worker(stage: Stage) -> subprocess.Popen[str]:
    return stage.start("node", ["node", str(stage.hello)], env=stage.env(PORT=str(DIRECT_PORT)))


SETUPS: Final = (
    Setup("broker", "port-broker exec (socket held by the broker)", BROKER_PORT, _broker_worker),
    Setup("direct", "node binds :8080 itself", DIRECT_PORT, _direct_worker),
)


def run_once(stage: Stage, setup: Setup, restarts: int) -> Tally:
    """Restart `setup`'s worker `restarts` times under the request loop."""
    tally = Tally()
    stop = threading.Event()
    worker = setup.start(stage)
    try:
        wait_http(setup.port, f"the {setup.key} worker to answer")
        threads = [
            threading.Thread(target=_load, args=(setup.port, stop, tally, i / LOAD_THREADS))
            for i in range(LOAD_THREADS)
        ]
        for thread in threads:
            thread.start()
        try:
            for _ in range(restarts):
                time.sleep(RESTART_GAP)
                stage.stop(worker)
                worker = setup.start(stage)
            time.sleep(RESTART_GAP)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    finally:
        stage.stop(worker)
    return tally


def run(
    stage: Stage, rounds: int, restarts: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Alternate the setups `rounds` times; return each run's tally."""
    runs: dict[str, list[dict[str, Any]]] = {setup.key: [] for setup in SETUPS}
    for index in range(rounds):
        for setup in SETUPS:
            tally = run_once(stage, setup, restarts)
            runs[setup.key].append(tally.to_json())
            progress(
                f"restart round {index + 1}/{rounds}: {setup.key:6} {restarts} restarts, "
                f"{tally.sent} requests: {tally.refused} refused, "
                f"{tally.sent - tally.ok - tally.refused} other failures"
            )
    return {
        "setups": {setup.key: setup.label for setup in SETUPS},
        "restarts": restarts,
        "rate": REQUEST_RATE,
        "runs": runs,
    }
