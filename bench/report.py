"""The machine, and the Markdown report of a run with its budgets (bench/budgets.py).

Must never: judge a figure (bench/budgets.py does), or show one without its spread.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from typing import Any

from bench.attack import WORKER_INTERVAL
from bench.budgets import Budget, mib
from bench.stats import Spread

# --- the machine ------------------------------------------------------------------


def _version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "?"


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    """A read-only git command in the checkout (no index refresh: GIT_OPTIONAL_LOCKS=0)."""
    env = os.environ | {"GIT_OPTIONAL_LOCKS": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, env=env, check=False
    )


def provenance() -> str:
    """Which broker was measured: the commit, and whether broker/ differs from it."""
    try:
        commit = _git("rev-parse", "--short", "HEAD").stdout.strip() or "no commit"
        changed = _git("diff", "--quiet", "HEAD", "--", "broker").returncode != 0
        changed |= bool(_git("ls-files", "--others", "--exclude-standard", "broker").stdout)
    except OSError:
        return "not a git checkout"
    return commit + (" + uncommitted changes in broker/" if changed else "")


def proc_status_like(path: str) -> dict[str, str]:
    """A 'Key:   value' file of /proc as a dict."""
    with open(path, encoding="ascii") as f:
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in f)}


def machine() -> dict[str, Any]:
    """Date, processor, memory, kernel, OS and tool versions of this run."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        models = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
    memory_kib = int(proc_status_like("/proc/meminfo")["MemTotal"].split()[0])
    os_name = "?"
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release", encoding="utf-8") as f:
            found = re.search(r'^PRETTY_NAME="?([^"\n]+)', f.read(), re.MULTILINE)
            os_name = found.group(1) if found else "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": models[0] if models else platform.processor() or "?",
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": _version(["/usr/bin/python3", "--version"], r"Python (\S+)"),
        "node": _version(["node", "--version"], r"v(\S+)"),
        "wrk": _version(["wrk", "--version"], r"wrk (\S+)"),
        "socat": _version(["socat", "-V"], r"socat version (\S+)"),
        "systemd": _version(["systemd-socket-activate", "--version"], r"systemd (\d+)"),
        "broker": provenance(),
    }


# --- Markdown -----------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _datapath_section(data: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    from bench.datapath import WRK_CONNECTIONS, WRK_THREADS  # noqa: PLC0415

    lines = [
        f"## Data path: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}, {settings['seconds']:g} s "
        f"× {settings['rounds']} rounds, alternating",
        "",
        "Median (min–max) over rounds; × direct is the ratio within each round.",
        "",
    ]
    rows = []
    for key, label in data["contenders"].items():
        rounds = data["rounds"][key]
        rows.append(
            [
                label,
                Spread.of([r["rps"] for r in rounds]).show("{:,.0f}"),
                Spread.of(data["ratios"][key]).show("{:.3f}"),
                Spread.of([r["p50_ms"] for r in rounds]).show("{:.2f}"),
                Spread.of([r["p99_ms"] for r in rounds]).show("{:.2f}"),
                str(sum(r["errors"] for r in rounds)),
            ]
        )
    header = ["contender", "req/s", "× direct", "p50 ms", "p99 ms", "errors"]
    return lines + _table(header, rows) + [""]


def _handoff_section(data: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = [
        f"## Hand-off: concurrent trio clients in one process, {settings['handoff_seconds']:g} s "
        f"× {settings['handoff_rounds']} rounds, alternating",
        "",
    ]
    rows = []
    builds = sorted({load.get("build", "current") for load in data["loads"]}, reverse=True)
    for clients in sorted({load["clients"] for load in data["loads"]}):
        for build in builds:
            loads = [load for load in data["loads"] if load["clients"] == clients]
            loads = [load for load in loads if load.get("build", "current") == build]
            errors = sum(sum(load["errors"].values()) for load in loads)
            shown = data.get("baseline", build) if build == "baseline" else "this tree"
            rows.append(
                [
                    str(clients),
                    str(shown),
                    Spread.of([load["rate"] for load in loads]).show("{:,.0f}"),
                    Spread.of([load["cpu_per_grant_us"] for load in loads]).show("{:.0f}"),
                    Spread.of([load["p50_ms"] for load in loads]).show("{:.2f}"),
                    Spread.of([load["p99_ms"] for load in loads]).show("{:.2f}"),
                    f"{mib(max(load['peak_rss_kib'] for load in loads)):.1f}",
                    f"{max(load['fds_peak'] for load in loads)}",
                    str(errors),
                ]
            )
    header = ["clients", "broker", "grants/s", "CPU µs/grant", "p50 ms", "p99 ms",
              "peak RSS MiB", "peak fds", "errors"]  # fmt: skip
    lines += _table(header, rows)
    lines += [
        "",
        f"Broker RSS: {mib(data['rss_idle_kib']):.1f} MiB idle before the load, "
        f"{mib(data['rss_after_kib']):.1f} MiB idle after. Broker fds: {data['fds_before']} "
        f"before, {data['fds_after']} after. Broker fd limit while serving (soft:hard): "
        f"{data['nofile_limit']} (started at systemd's default soft limit of 1024, the "
        "broker raises it to fit max_connections).",
        "",
        f"### `port-broker exec` as a whole process ({settings['exec_runs']} runs each, "
        "alternating, as uid 65534)",
        "",
    ]
    exec_rows = [[f"`{key}`", Spread.of(ms).show()] for key, ms in data["exec_ms"].items()]
    lines += _table(["command", "wall ms"], exec_rows)
    cold = Spread.of(data["cold_ms"])
    lines += [
        "",
        f"### Cold start ({settings['cold_runs']} runs)",
        "",
        f"systemd-socket-activate listening → first client connect starts the broker → fd "
        f"in the client's hand: **{cold.show('{:.0f}')} ms**. That is what the first "
        "acquisition after an idle exit costs: a broker started as systemd starts one, "
        "with `idle_exit = 1`, exited "
        + (f"{data['idle_exit_s']:.1f} s" if data.get("idle_exit_s") else "**never**")
        + " after its last client (at least 10 s, whatever idle_exit says).",
        "",
    ]
    return lines


def _restart_section(data: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = [
        f"## Worker restart under load: {data['restarts']} restarts (SIGTERM, start again) "
        f"per run, {data['rate']:.0f} requests/s, {settings['restart_rounds']} rounds",
        "",
    ]
    rows = []
    for key, label in data["setups"].items():
        runs = data["runs"][key]
        rows.append(
            [
                label,
                f"{sum(r['sent'] for r in runs):,}",
                f"{sum(r['refused'] for r in runs):,}",
                f"{sum(r['failed'] - r['refused'] for r in runs):,}",
                Spread.of([r["p99_ms"] for r in runs]).show("{:.1f}"),
                Spread.of([r["max_ms"] for r in runs]).show("{:.0f}"),
            ]
        )
    header = ["setup", "requests", "refused", "other failures", "p99 ms", "max ms"]
    return lines + _table(header, rows) + [""]


def _attack_section(data: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = [
        f"## Under attack: a named worker acquiring every {WORKER_INTERVAL * 1000:.0f} ms "
        f"for {settings['attack_seconds']:g} s, side by side with no attack",
        "",
        "flood: one uid in connect, list, close loops; slow: 16 uids with 64 connections "
        "each, a byte a second: uids no rule names. hoard: an allowed uid asking on up to "
        "4,000 connections and never reading its grants. The shipped limits.",
        "",
    ]
    rows = []
    for outcome in data["scenarios"]:
        worker = outcome["worker"]
        lines_per_uid = max(outcome["audit_lines_per_10s"].values(), default=0)
        rows.append(
            [
                outcome["scenario"],
                f"{worker['granted']:,} / {worker['attempts']:,}",
                f"{outcome['success']:.1%}",
                f"{worker['p50_ms']:.1f}",
                f"{worker['p99_ms']:.1f}",
                f"{worker['max_ms']:.0f}",
                f"{lines_per_uid:.0f}",
                f"{outcome['grants_logged']:,}",
            ]
        )
    header = ["attack", "granted", "success", "p50 ms", "p99 ms", "max ms",
              "audit lines per attacking uid per 10 s", "grants in the log"]  # fmt: skip
    fuzz = data["fuzz"]
    outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(fuzz["outcomes"].items()))
    return [
        *lines,
        *_table(header, rows),
        "",
        f"Live fuzz: {fuzz['cases']:,} hostile requests (random bytes, mutated and split "
        f"requests, JSON edge cases), one connection each, in {fuzz['seconds']:g} s: "
        f"{outcomes}. Broker {'alive' if fuzz['broker_alive'] else 'DEAD'}, "
        f"{fuzz['internal_errors']} internal errors, fds {fuzz['fds_before']} before, "
        f"{fuzz['fds_after']} after.",
        "",
    ]


def markdown(results: dict[str, Any], budgets: list[Budget]) -> str:
    """The whole report."""
    meta = results["meta"]
    settings = meta["settings"]
    lines = [
        "# port-broker benchmarks",
        "",
        f"{meta['date']} · {meta['cpu']} · {meta['cores']} cores · {meta['memory_gib']} GiB · "
        f"Linux {meta['kernel']} · {meta['os']} · Python {meta['python']} · node "
        f"{meta['node']} · wrk {meta['wrk']} · socat {meta['socat']} · systemd "
        f"{meta['systemd']} · run took {meta['wall_seconds'] / 60:.1f} min",
        "",
        f"Broker measured: {meta['broker']}.",
        "",
        "## Budgets",
        "",
    ]
    rows = [[b.name, b.target, b.measured, f"**{b.verdict}**"] for b in budgets]
    lines += [*_table(["budget", "target", "measured", "verdict"], rows), ""]
    if "datapath" in results:
        lines += _datapath_section(results["datapath"], settings)
    if "intercept_skipped" in results:
        lines += [f"(--intercept not measured: {results['intercept_skipped']})", ""]
    if "handoff" in results:
        lines += _handoff_section(results["handoff"], settings)
    if "restart" in results:
        lines += _restart_section(results["restart"], settings)
    if "attack" in results:
        lines += _attack_section(results["attack"], settings)
    misses = [b for b in budgets if not b.passed]
    if misses:
        lines += ["## Closing note: budgets missed", ""]
        lines += [
            f"- **{b.name}**: {b.shortfall}. Target {b.target}; measured {b.measured}."
            for b in misses
        ]
        if results.get("profiles"):
            lines += ["", "What dominates, measured on the same stage after the run:"]
        lines += [""]
    for title, text in results.get("profiles", {}).items():
        lines += [f"### {title}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)
