"""The budgets: each measured figure against its target, PASS or MISS, and by how much.

Every budget is checked against the medians of this run (the RSS peak and the refusal
count against their worst case). What users feel is budgeted, not what no user needs:
`exec` against an interpreter's start, a named worker's acquisitions alone and under
attack, the broker's CPU per grant and grants per second against a baseline commit
(`bench/run --baseline COMMIT`, run by run), cold start, memory, fds.

Must never: measure anything (the sections do), or pass a budget whose figure is
missing (it is left out, and the report says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from bench.attack import AUDIT_LINES_BUDGET, P99_BUDGET_MS, SUCCESS_BUDGET
from bench.stats import Spread

RATIO_BUDGET: Final = 0.98
"""The data path through port-broker against a program binding the port itself."""
EXEC_RATIO_BUDGET: Final = 2.0
"""`port-broker exec NAME -- true` against `python3 -I -c pass`, pair by pair: an
interpreter's start, a connect and a recvmsg, and the exec."""
ALONE_P99_BUDGET_MS: Final = 10.0
"""A named worker's acquisition with nobody else about: a grant costs the broker a few
hundred microseconds; ten milliseconds leave room for a shared machine's scheduling."""
HANDOFF_BUDGET_CLIENTS: Final = 64
"""The concurrency grants/s and CPU per grant are held to (a busy host)."""
BASELINE_RATIO_BUDGET: Final = 1.0
"""Grants/s at least, and CPU per grant at most, the baseline's (median of the ratios
of runs taken side by side)."""
COLD_BUDGET_MS: Final = 500.0
RSS_IDLE_BUDGET_MIB: Final = 25.0
RSS_LOAD_BUDGET_MIB: Final = 40.0
RSS_LOAD_CLIENTS: Final = 512

EXEC_KEY: Final = "setpriv port-broker exec http -- true"
PYTHON_KEY: Final = "setpriv python3 -I -c pass"
SETPRIV_KEY: Final = "setpriv true"


@dataclass(frozen=True)
class Budget:
    """One budget's verdict.

    Attributes:
        key: Which measurement it is about (the profiler picks by it).
        name: What is budgeted.
        target: The budget, in words.
        measured: What this run measured.
        passed: Whether the budget holds.
        shortfall: For a MISS, by how much.
    """

    key: str
    name: str
    target: str
    measured: str
    passed: bool
    shortfall: str = ""

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"


def mib(kib: float) -> float:
    return kib / 1024


def _datapath_budgets(data: dict[str, Any]) -> list[Budget]:
    budgets = []
    for key, label in (("broker", "port-broker exec"), ("intercept", "exec --intercept")):
        if key not in data["ratios"]:
            continue
        ratio = Spread.of(data["ratios"][key])
        budgets.append(
            Budget(
                f"datapath:{key}",
                f"data path via {label}",
                f"≥ {RATIO_BUDGET} × direct (median ratio)",
                f"{ratio.show('{:.3f}')} × direct",
                ratio.median >= RATIO_BUDGET,
                f"{(RATIO_BUDGET - ratio.median) * 100:.1f} points under",
            )
        )
    return budgets


def paired(current: list[float], baseline: list[float]) -> Spread:
    """The ratios of runs taken side by side (current / baseline)."""
    return Spread.of([a / b for a, b in zip(current, baseline, strict=True) if b])


def _exec_budget(data: dict[str, Any]) -> Budget:
    exec_ms = Spread.of(data["exec_ms"][EXEC_KEY])
    python_ms = Spread.of(data["exec_ms"][PYTHON_KEY])
    ratio = paired(data["exec_ms"][EXEC_KEY], data["exec_ms"][PYTHON_KEY])
    return Budget(
        "exec",
        "`port-broker exec NAME -- true` against `python3 -I -c pass`",
        f"≤ {EXEC_RATIO_BUDGET:g} × (median of the ratios, run by run)",
        f"{ratio.show('{:.2f}')} × ({exec_ms.median:.1f} ms against {python_ms.median:.1f} ms, "
        "both under setpriv)",
        ratio.median <= EXEC_RATIO_BUDGET,
        f"{ratio.median / EXEC_RATIO_BUDGET:.2f} × the budget",
    )


def _baseline_budgets(data: dict[str, Any]) -> list[Budget]:
    """Grants/s and CPU per grant at HANDOFF_BUDGET_CLIENTS, against the baseline."""
    mine = [x for x in data["loads"] if x["clients"] == HANDOFF_BUDGET_CLIENTS
            and x["build"] == "current"]  # fmt: skip
    theirs = [x for x in data["loads"] if x["clients"] == HANDOFF_BUDGET_CLIENTS
              and x["build"] == "baseline"]  # fmt: skip
    if not theirs:
        return []
    rate = paired([x["rate"] for x in mine], [x["rate"] for x in theirs])
    cpu = paired([x["cpu_per_grant_us"] for x in mine], [x["cpu_per_grant_us"] for x in theirs])
    baseline = data.get("baseline", "the baseline")
    rates = Spread.of([x["rate"] for x in mine]), Spread.of([x["rate"] for x in theirs])
    cpus = (Spread.of([x["cpu_per_grant_us"] for x in mine]),
            Spread.of([x["cpu_per_grant_us"] for x in theirs]))  # fmt: skip
    return [
        Budget(
            "handoff",
            f"grants/s at {HANDOFF_BUDGET_CLIENTS} clients, against {baseline}",
            f"≥ {BASELINE_RATIO_BUDGET:g} × (median of the ratios, run by run)",
            f"{rate.show('{:.3f}')} × ({rates[0].median:,.0f} against {rates[1].median:,.0f})",
            rate.median >= BASELINE_RATIO_BUDGET,
            f"{(1 - rate.median) * 100:.1f} % fewer",
        ),
        Budget(
            "handoff",
            f"broker CPU per grant at {HANDOFF_BUDGET_CLIENTS} clients, against {baseline}",
            f"≤ {BASELINE_RATIO_BUDGET:g} × (median of the ratios, run by run)",
            f"{cpu.show('{:.3f}')} × ({cpus[0].median:.0f} µs against {cpus[1].median:.0f} µs)",
            cpu.median <= BASELINE_RATIO_BUDGET,
            f"{(cpu.median - 1) * 100:.1f} % more",
        ),
    ]


def _handoff_budgets(data: dict[str, Any]) -> list[Budget]:
    current = [load for load in data["loads"] if load.get("build", "current") == "current"]
    cold = Spread.of(data["cold_ms"])
    peaks = [load["peak_rss_kib"] for load in current if load["clients"] == RSS_LOAD_CLIENTS]
    peak = mib(max(peaks, default=0))
    idle = mib(data["rss_idle_kib"])
    growth = data["fds_after"] - data["fds_before"]
    gone_after = data.get("idle_exit_s", 0.0)
    gone = f"; none {gone_after:.1f} s after its last client (idle_exit = 1)" if gone_after else ""
    return [
        _exec_budget(data),
        *_baseline_budgets(data),
        Budget(
            "cold",
            "cold start (activation → first fd)",
            f"≤ {COLD_BUDGET_MS:.0f} ms (median)",
            f"{cold.show('{:.0f}')} ms",
            cold.median <= COLD_BUDGET_MS,
            f"{cold.median - COLD_BUDGET_MS:.0f} ms over",
        ),
        Budget(
            "rss",
            "broker RSS idle",
            f"≤ {RSS_IDLE_BUDGET_MIB:.0f} MiB, or none (idle_exit)",
            f"{idle:.1f} MiB while it runs idle{gone}",
            idle <= RSS_IDLE_BUDGET_MIB or bool(gone_after),
            f"{idle - RSS_IDLE_BUDGET_MIB:.1f} MiB over ({idle / RSS_IDLE_BUDGET_MIB:.1f} ×)",
        ),
        Budget(
            "rss",
            f"broker RSS at {RSS_LOAD_CLIENTS} clients (peak)",
            f"≤ {RSS_LOAD_BUDGET_MIB:.0f} MiB",
            f"{peak:.1f} MiB",
            peak <= RSS_LOAD_BUDGET_MIB,
            f"{peak - RSS_LOAD_BUDGET_MIB:.1f} MiB over",
        ),
        Budget(
            "fds",
            "broker fds after the load",
            "= before (zero growth)",
            f"{data['fds_before']} before, {data['fds_after']} after",
            growth == 0,
            f"{growth:+d} fds",
        ),
    ]


def _restart_budgets(data: dict[str, Any]) -> list[Budget]:
    broker = data["runs"]["broker"]
    direct = data["runs"]["direct"]
    refused = sum(run["refused"] for run in broker)
    failed = sum(run["failed"] for run in broker)
    sent = sum(run["sent"] for run in broker)
    direct_refused = sum(run["refused"] for run in direct)
    direct_sent = sum(run["sent"] for run in direct)
    return [
        Budget(
            "restart",
            "worker restart under load",
            "0 refused requests",
            f"{refused} refused, {failed - refused} other failures of {sent:,} "
            f"(direct bind: {direct_refused:,} refused of {direct_sent:,})",
            refused == 0,
            f"{refused} refused",
        )
    ]


def _worker_budget(name: str, outcome: dict[str, Any], p99_ms: float) -> Budget:
    worker = outcome["worker"]
    what = "alone" if name == "none" else f"under the {name} attack"
    return Budget(
        "attack",
        f"named worker's acquisitions {what}",
        f"≥ {SUCCESS_BUDGET:.0%} succeed, p99 ≤ {p99_ms:.0f} ms",
        f"{outcome['success']:.1%} of {worker['attempts']}, p99 {worker['p99_ms']:.1f} ms",
        outcome["success"] >= SUCCESS_BUDGET and worker["p99_ms"] <= p99_ms,
        f"{outcome['success']:.1%} succeeded, p99 {worker['p99_ms']:.1f} ms",
    )


def _attack_budgets(data: dict[str, Any]) -> list[Budget]:
    budgets = []
    for outcome in data["scenarios"]:
        name = outcome["scenario"]
        if name == "none":
            budgets.append(_worker_budget(name, outcome, ALONE_P99_BUDGET_MS))
            continue
        worker = outcome["worker"]
        most = max(outcome["audit_lines_per_10s"].values(), default=0)
        budgets += [
            _worker_budget(name, outcome, P99_BUDGET_MS),
            Budget(
                "attack",
                f"audit lines per attacking uid ({name})",
                f"≤ {AUDIT_LINES_BUDGET} per 10 s",
                f"{most:.0f} at most",
                most <= AUDIT_LINES_BUDGET,
                "over",
            ),
            Budget(
                "attack",
                f"grants logged during the {name} attack",
                "every one",
                f"{outcome['grants_logged']} of {worker['granted']}",
                outcome["grants_logged"] == worker["granted"],
                f"{worker['granted'] - outcome['grants_logged']} missing",
            ),
        ]
    fuzz = data["fuzz"]
    growth = (fuzz["fds_after"] or 0) - fuzz["fds_before"]
    budgets.append(
        Budget(
            "attack",
            f"live fuzz ({fuzz['cases']:,} cases)",
            "0 crashes, 0 internal errors, 0 fd growth",
            f"broker {'alive' if fuzz['broker_alive'] else 'DEAD'}, "
            f"{fuzz['internal_errors']} internal errors, fds {fuzz['fds_before']} → "
            f"{fuzz['fds_after']}",
            fuzz["broker_alive"] and fuzz["internal_errors"] == 0 and growth == 0,
            "see the broker's log",
        )
    )
    return budgets


def check_budgets(results: dict[str, Any]) -> list[Budget]:
    """Every budget the measured sections allow checking."""
    checks: dict[str, Callable[[dict[str, Any]], list[Budget]]] = {
        "datapath": _datapath_budgets,
        "handoff": _handoff_budgets,
        "restart": _restart_budgets,
        "attack": _attack_budgets,
    }
    return [
        b
        for section, check in checks.items()
        if section in results
        for b in check(results[section])
    ]
