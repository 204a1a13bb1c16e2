"""broadcaster against the classic ConnectionManager, scenario by scenario, in one run.

Each scenario runs ``broadcaster stress`` against a server it spawns, one server at a time on
this machine: the classic pattern (``benchmarks/classic.py``) and then broadcaster with its
default settings. The figures compare the two runs of the same invocation, so the machine's
speed cancels out. Prints a markdown table::

    .venv/bin/python benchmarks/run.py                  # every scenario, about 6 minutes
    .venv/bin/python benchmarks/run.py --only throughput --json results.json

Deliveries per second are the messages received by all clients over the time from the first
publish to the last receipt (the publisher's time plus the slowest message's latency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broadcaster.settings import Settings
from broadcaster.stress import Kind, Mode, Report, Scenario, run_scenario

if TYPE_CHECKING:
    from collections.abc import Callable

CLASSIC = (str(Path(__file__).with_name("classic.py")),)
BROADCASTER = Scenario().server_command
MIB = 1024 * 1024
# What the kernel and the event loop may hold per stalled socket beyond its outbox: the
# transport's write buffer up to its high-water mark plus one sender batch.
TRANSPORT_ALLOWANCE_MIB = 0.5


@dataclass(frozen=True)
class Row:
    """One figure of the table."""

    scenario: str
    figure: str
    classic: str
    broadcaster: str
    target: str
    met: bool


def fast(report: Report) -> Any:
    """The fast clients' part of a report."""
    return report.kinds[Kind.FAST]


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def deliveries_per_second(report: Report) -> float:
    kind = fast(report)
    window = report.publisher.seconds + (kind.latency.max / 1000 if kind.latency else 0)
    return float(kind.delivered / window) if window else 0.0


def delivery_row(scenario: str, figure: str, classic: Report, ours: Report) -> Row:
    """The fast clients' delivery in both servers; broadcaster's must be complete."""
    return Row(
        scenario,
        figure,
        percent(fast(classic).delivery),
        percent(fast(ours).delivery),
        "100%",
        fast(ours).delivery == 1,
    )


def run(label: str, server: tuple[str, ...], scenario: Scenario) -> Report:
    """Run one scenario against one server, saying so on stderr."""
    print(f"bench: {label}", file=sys.stderr, flush=True)
    return run_scenario(replace(scenario, server_command=server))


def isolation(reports: dict[str, Report]) -> list[Row]:
    """100 fast + 20 stalled clients, 200 msg/s of 4 KiB for 10 s."""
    base = Scenario(fast=100, rate=200, size=4096, duration=10, procs=2)
    clean = reports["isolation classic, no stalled"] = run(
        "isolation: classic, no stalled", CLASSIC, base
    )
    stalled = replace(base, stalled=20)
    classic = reports["isolation classic"] = run("isolation: classic", CLASSIC, stalled)
    ours = reports["isolation broadcaster"] = run("isolation: broadcaster", BROADCASTER, stalled)
    clean_p99 = fast(clean).latency.p99
    our_p99 = fast(ours).latency.p99
    return [
        delivery_row("isolation", "fast clients' delivery", classic, ours),
        Row(
            "isolation",
            "fast clients' p99 latency (ms)",
            f"{fast(classic).latency.p99:.1f} ({clean_p99:.1f} without stalled)",
            f"{our_p99:.1f}",
            f"<= 2 x {clean_p99:.1f}",
            our_p99 <= 2 * clean_p99,
        ),
    ]


def memory(reports: dict[str, Report]) -> list[Row]:
    """10 fast + 50 stalled clients, 20 msg/s of 64 KiB for 45 s."""
    scenario = Scenario(fast=10, stalled=50, rate=20, size=64 * 1024 - 512, duration=45, procs=2)
    classic = reports["memory classic"] = run("memory: classic", CLASSIC, scenario)
    ours = reports["memory broadcaster"] = run("memory: broadcaster", BROADCASTER, scenario)
    bound = 50 * (Settings().queue_max_bytes / MIB + TRANSPORT_ALLOWANCE_MIB)
    growth = ours.server.rss_growth_mib if ours.server else None
    return [
        Row(
            "memory",
            "publisher's achieved rate (msg/s)",
            f"{classic.publisher.achieved_rate:.1f}",
            f"{ours.publisher.achieved_rate:.1f}",
            ">= 19.8 (of 20)",
            ours.publisher.achieved_rate >= 19.8,
        ),
        delivery_row("memory", "fast clients' delivery", classic, ours),
        Row(
            "memory",
            "server RSS growth (MiB)",
            _growth(classic),
            _growth(ours),
            f"<= {bound:.0f} (50 x QUEUE_MAX_BYTES + transport)",
            growth is not None and growth <= bound,
        ),
    ]


def throughput(reports: dict[str, Report]) -> list[Row]:
    """500 fast clients, 2,000 messages of 100 B published flat out, raw and multiplexed."""
    rows = []
    for mode in Mode:
        # 2,000 messages at a rate no server keeps up with: sent as fast as possible.
        scenario = Scenario(
            fast=500, rate=100_000, duration=0.02, size=100, mode=mode, procs=2, drain=60
        )
        classic = reports[f"throughput {mode.value} classic"] = run(
            f"throughput {mode.value}: classic", CLASSIC, scenario
        )
        ours = reports[f"throughput {mode.value} broadcaster"] = run(
            f"throughput {mode.value}: broadcaster", BROADCASTER, scenario
        )
        ratio = deliveries_per_second(ours) / deliveries_per_second(classic)
        rows.append(
            Row(
                "throughput",
                f"deliveries/s, {mode.value} mode (x classic)",
                f"{deliveries_per_second(classic):,.0f}",
                f"{deliveries_per_second(ours):,.0f} ({ratio:.1f}x)",
                ">= 5x",
                ratio >= 5 and fast(ours).delivery == 1,
            )
        )
    return rows


def history(reports: dict[str, Report]) -> list[Row]:
    """The throughput scenario (multiplexed) with history on, the default, and off; the runs
    alternate, three of each, and the medians are compared."""
    base = Scenario(fast=500, rate=100_000, duration=0.02, size=100, procs=2, drain=60)
    off_env = {"BROADCASTER_HISTORY_SIZE": "0"}
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for attempt in range(1, 4):
        for label, env in (("off", off_env), ("on", {})):
            name = f"history {label} {attempt}"
            report = reports[name] = run(name, BROADCASTER, replace(base, server_env=env))
            rates[label].append(deliveries_per_second(report))

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    ratio = statistics.median(rates["on"]) / statistics.median(rates["off"])
    return [
        Row(
            "history",
            "deliveries/s, mux, median (range) of 3: off, on",
            summary(rates["off"]),
            f"{summary(rates['on'])} ({ratio:.2f}x off)",
            ">= 0.9x off",
            ratio >= 0.9,
        )
    ]


def churn(reports: dict[str, Report]) -> list[Row]:
    """5 fast clients and 100 that come and go abruptly, while 100 msg/s are published."""
    scenario = Scenario(fast=5, churn=100, churn_stay=0.2, rate=100, duration=20, procs=2)
    classic = reports["churn classic"] = run("churn: classic", CLASSIC, scenario)
    ours = reports["churn broadcaster"] = run("churn: broadcaster", BROADCASTER, scenario)

    def verdict(report: Report) -> str:
        server = report.server
        warm_up, drift = _rss_phases(report)
        cut_off = report.publisher.close_code is not None or report.publisher.error is not None
        return (
            f"{server.error_lines if server else 'n/a'} error lines, "
            f"publisher {'cut off' if cut_off else 'kept'}, "
            f"{'n/a' if report.leftover_subscribers is None else report.leftover_subscribers} "
            f"left subscribed, RSS drift {drift} MiB "
            f"after {warm_up} MiB of warm-up"
        )

    ours_ok = (
        ours.server is not None
        and ours.server.error_lines == 0
        and ours.publisher.close_code is None
        and ours.publisher.error is None
        and ours.leftover_subscribers == 0
        and abs(_rss_phases(ours)[1]) < 5
    )
    return [
        Row(
            "churn",
            f"{ours.kinds[Kind.CHURN].sessions:,} sessions",
            verdict(classic),
            verdict(ours),
            "0 errors, kept, 0 left, < 5 MiB",
            ours_ok,
        )
    ]


def connections(reports: dict[str, Report]) -> list[Row]:
    """10,000 idle connections on one worker, one small message a second."""
    scenario = Scenario(fast=10_000, rate=1, size=64, duration=10, procs=2, connect_timeout=60)
    classic = reports["connections classic"] = run("connections: classic", CLASSIC, scenario)
    ours = reports["connections broadcaster"] = run(
        "connections: broadcaster", BROADCASTER, scenario
    )

    def per_connection(report: Report) -> float | None:
        server = report.server
        if server is None or server.rss_peak_mib is None or server.rss_idle_mib is None:
            return None
        return (server.rss_peak_mib - server.rss_idle_mib) * 1024 / 10_000

    theirs, mine = per_connection(classic), per_connection(ours)
    return [
        delivery_row("connections", "delivery to 10,000 idle clients", classic, ours),
        Row(
            "connections",
            "server RSS per connection (KiB)",
            f"{theirs:.1f}" if theirs is not None else "n/a",
            f"{mine:.1f}" if mine is not None else "n/a",
            "< classic",
            theirs is not None and mine is not None and mine < theirs,
        ),
    ]


def _growth(report: Report) -> str:
    growth = report.server.rss_growth_mib if report.server else None
    return "n/a" if growth is None else f"{growth:.1f}"


def _rss_phases(report: Report) -> tuple[float, float]:
    """RSS growth over the first quarter of publishing (warm-up), and from then to the end.

    In the first quarter the first wave of connections grows the allocator's pools once; a
    leak keeps growing after it, and that later growth is the drift.
    """
    server = report.server
    assert server is not None
    assert server.rss_start_mib is not None
    assert server.rss_end_mib is not None
    quarter = report.scenario["duration"] / 4
    warm = next((rss for at, rss, _ in server.samples if at >= quarter), server.rss_end_mib)
    return round(warm - server.rss_start_mib, 1), round(server.rss_end_mib - warm, 1)


SCENARIOS: dict[str, Callable[[dict[str, Report]], list[Row]]] = {
    "isolation": isolation,
    "memory": memory,
    "throughput": throughput,
    "history": history,
    "churn": churn,
    "connections": connections,
}


def table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| scenario | figure | classic | broadcaster | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [row.scenario, row.figure, row.classic, row.broadcaster, row.target]
        lines.append("| " + " | ".join([*cells, "yes" if row.met else "**no**"]) + " |")
    return "\n".join(lines)


def main() -> int:
    """Run the chosen scenarios; exit 1 if a figure is not met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS), default=""
    )
    parser.add_argument("--json", type=Path, help="write every run's full report here")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name] or list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    reports: dict[str, Report] = {}
    rows = []
    for name in chosen:
        rows += SCENARIOS[name](reports)
        if args.json:  # after each scenario, so that a long run keeps what it measured
            args.json.write_text(json.dumps({k: r.to_json() for k, r in reports.items()}))
    print(table(rows))
    return 0 if all(row.met for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
