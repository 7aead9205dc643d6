"""chart.png: the data-path and hand-off figures of a run, medians with min–max bars.

Four panels: data-path throughput (with each contender's ratio to direct) and p99
latency; hand-off grants/s and latency (p50, p99) per number of concurrent clients,
with the budgets drawn as dashed lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

# matplotlib comes with the bench lock (.ci/requirements/bench.txt), which .ci/setup does
# not install: where it is missing, mypy checks this module against Any rather than
# failing the whole run.
import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
from matplotlib.axes import Axes  # type: ignore[import-not-found, unused-ignore]
from matplotlib.ticker import FuncFormatter  # type: ignore[import-not-found, unused-ignore]

from bench.budgets import RATIO_BUDGET
from bench.stats import Spread, thousands

BROKER_COLOUR: Final = "#2a7ab0"
OTHER_COLOUR: Final = "#b0b0b0"
BUDGET_COLOUR: Final = "#c0392b"


def _budget_line(axes: Axes, value: float, label: str) -> None:
    axes.axhline(
        value, color=BUDGET_COLOUR, linestyle="--", linewidth=1, alpha=0.8, zorder=0, label=label
    )


def _two_and_five(value: float, _: object) -> str:
    """Label the minor log ticks 2 and 5 (0.2, 50, …) only: the rest would crowd."""
    text = f"{value:g}"
    return text if text.lstrip("0.")[:1] in ("2", "5") else ""


def _plain_log(axes: Axes) -> None:
    """A log y axis labelled 0.5, 1, 2, 10 … rather than 10⁰, 2×10⁰ …"""
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    axes.tick_params(axis="y", which="minor", labelsize=7)


def _bars(axes: Axes, labels: list[str], spreads: list[Spread], colours: list[str]) -> None:
    medians = [s.median for s in spreads]
    below = [s.median - s.low for s in spreads]
    above = [s.high - s.median for s in spreads]
    axes.bar(labels, medians, color=colours, yerr=[below, above], capsize=4)
    axes.tick_params(axis="x", labelsize=8)
    axes.grid(axis="y", alpha=0.3)


def _datapath(rps_axes: Axes, p99_axes: Axes, data: dict[str, Any]) -> None:
    keys = list(data["contenders"])
    colours = [
        BROKER_COLOUR if k in ("direct", "broker", "intercept") else OTHER_COLOUR for k in keys
    ]
    rps = [Spread.of([r["rps"] for r in data["rounds"][k]]) for k in keys]
    _bars(rps_axes, keys, rps, colours)
    for index, key in enumerate(keys):
        ratio = Spread.of(data["ratios"][key]).median
        rps_axes.annotate(
            f"{thousands(rps[index].median)}\n{ratio:.2f}×",
            (index, rps[index].high),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    _budget_line(rps_axes, rps[0].median * RATIO_BUDGET, f"{RATIO_BUDGET} × {keys[0]}")
    rps_axes.legend(fontsize=8, loc="upper right")
    rps_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    rps_axes.set_ylim(0, max(s.high for s in rps) * 1.3)
    rps_axes.set_title("Data path: requests/s (wrk, median, min–max)", fontsize=10)
    p99 = [Spread.of([r["p99_ms"] for r in data["rounds"][k]]) for k in keys]
    _bars(p99_axes, keys, p99, colours)
    _plain_log(p99_axes)
    p99_axes.set_ylabel("ms (log)")
    p99_axes.set_title("Data path: p99 latency", fontsize=10)


def _handoff(rate_axes: Axes, latency_axes: Axes, data: dict[str, Any]) -> None:
    levels = sorted({load["clients"] for load in data["loads"]})
    labels = [f"{n} client{'s' if n > 1 else ''}" for n in levels]

    def spread(clients: int, key: str, build: str = "current") -> Spread:
        loads = [ld for ld in data["loads"] if ld.get("build", "current") == build]
        return Spread.of([ld[key] for ld in loads if ld["clients"] == clients])

    rates = [spread(n, "rate") for n in levels]
    _bars(rate_axes, labels, rates, [BROKER_COLOUR] * len(levels))
    if any(ld.get("build") == "baseline" for ld in data["loads"]):
        for index, n in enumerate(levels):  # the baseline's median, across each bar
            level = spread(n, "rate", "baseline").median
            label = str(data.get("baseline", "baseline")) if index == 0 else None
            rate_axes.plot([index - 0.4, index + 0.4], [level, level], color=BUDGET_COLOUR,
                           linestyle="--", label=label)  # fmt: skip
    for index, rate in enumerate(rates):
        rate_axes.annotate(
            f"{rate.median:,.0f}", (index, rate.high), ha="center", va="bottom", fontsize=8
        )
    rate_axes.set_ylim(0, max(r.high for r in rates) * 1.3)
    rate_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    rate_axes.legend(fontsize=8)
    rate_axes.set_title("Hand-off: grants/s (trio clients, one process)", fontsize=10)
    width = 0.38
    for offset, key, colour in (
        (-width / 2, "p50_ms", "#7fb3d5"),
        (width / 2, "p99_ms", BROKER_COLOUR),
    ):
        spreads = [spread(n, key) for n in levels]
        positions = [i + offset for i in range(len(levels))]
        errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
        latency_axes.bar(
            positions, [s.median for s in spreads], width, yerr=errors, capsize=3,
            color=colour, label=key.removesuffix("_ms"),
        )  # fmt: skip
    latency_axes.set_xticks(range(len(levels)), labels, fontsize=8)
    _plain_log(latency_axes)
    latency_axes.set_ylabel("ms (log)")
    latency_axes.grid(axis="y", alpha=0.3)
    latency_axes.legend(fontsize=8)
    latency_axes.set_title("Hand-off: latency per grant", fontsize=10)


def draw(results: dict[str, Any], path: Path) -> None:
    """Write the chart of `results` to `path` (panels without data are left out)."""
    meta = results["meta"]
    plt.switch_backend("Agg")  # files only: no display here
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    if "datapath" in results:
        _datapath(axes[0][0], axes[0][1], results["datapath"])
    else:
        axes[0][0].set_visible(False)
        axes[0][1].set_visible(False)
    if "handoff" in results:
        _handoff(axes[1][0], axes[1][1], results["handoff"])
    else:
        axes[1][0].set_visible(False)
        axes[1][1].set_visible(False)
    figure.suptitle(
        f"port-broker benchmarks — {meta['date']}, {meta['cpu']}, {meta['cores']} cores, "
        f"Linux {meta['kernel']}",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
