"""The delivery scenarios: isolation, memory, throughput, churn and idle connections.

Each runs ``broadcaster stress`` against the classic pattern and broadcaster in rotation (see
:class:`measure.Bench`) and returns its rows; every scenario also reports deliveries per
second and the server's CPU per million deliveries (:func:`measure.cost_rows`).
"""

from __future__ import annotations

import resource
from dataclasses import replace
from typing import TYPE_CHECKING

from measure import (
    BROADCASTER,
    CLASSIC,
    MIB,
    Row,
    cost_rows,
    cpu_per_million,
    delivery_rate,
    fast,
    median,
    spread,
)

from broadcaster.settings import Settings
from broadcaster.stress import Kind, Mode, Scenario
from broadcaster.stress.worker import raise_file_limit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from measure import Bench, Run

# What the kernel and the event loop may hold per stalled socket beyond its outbox: the
# transport's write buffer up to its high-water mark plus one sender batch.
TRANSPORT_ALLOWANCE_MIB = 0.5
HISTORY_OFF = {"BROADCASTER_HISTORY_SIZE": "0"}
IDLE_CONNECTIONS = 100_000
# What an idle connection may cost the server, in KiB of RSS.
IDLE_KIB = 16
# Files a server needs besides its connections.
FILE_MARGIN = 1_000


def p99(run: Run) -> float | None:
    """The fast clients' p99 latency in milliseconds."""
    latency = fast(run.report).latency
    return latency.p99 if latency else None


def fast_delivery(run: Run) -> float | None:
    """The fraction of their messages the fast clients received, in percent."""
    delivery = fast(run.report).delivery
    return None if delivery is None else 100 * delivery


def delivery_row(scenario: str, figure: str, classic: Sequence[Run], ours: Sequence[Run]) -> Row:
    """The fast clients' delivery in both servers; broadcaster's median must be complete."""
    ours_median = median([fast_delivery(r) for r in ours])
    return Row(
        scenario,
        figure + " (%)",
        spread([fast_delivery(r) for r in classic]),
        spread([fast_delivery(r) for r in ours]),
        "100",
        ours_median == 100,
    )


def isolation(bench: Bench) -> list[Row]:
    """100 fast + 20 stalled clients, 200 msg/s of 4 KiB for 10 s."""
    base = Scenario(fast=100, rate=200, size=4096, duration=10, procs=2)
    stalled = replace(base, stalled=20)
    runs = bench.rotate(
        "isolation",
        [
            ("classic, no stalled", bench.stress(CLASSIC, base)),
            ("classic", bench.stress(CLASSIC, stalled)),
            ("broadcaster", bench.stress(BROADCASTER, stalled)),
        ],
    )
    clean, classic, ours = runs["classic, no stalled"], runs["classic"], runs["broadcaster"]
    clean_p99 = median([p99(r) for r in clean])
    ours_p99 = median([p99(r) for r in ours])
    return [
        delivery_row("isolation", "fast clients' delivery", classic, ours),
        Row(
            "isolation",
            "fast clients' p99 latency (ms)",
            f"{spread([p99(r) for r in classic])}; "
            f"{spread([p99(r) for r in clean])} without stalled",
            spread([p99(r) for r in ours]),
            f"<= 2 x {clean_p99:.1f}" if clean_p99 is not None else "<= 2 x n/a",
            clean_p99 is not None and ours_p99 is not None and ours_p99 <= 2 * clean_p99,
        ),
        *cost_rows("isolation", classic, ours),
    ]


def memory(bench: Bench) -> list[Row]:
    """10 fast + 50 stalled clients, 20 msg/s of 64 KiB for 20 s."""
    scenario = Scenario(fast=10, stalled=50, rate=20, size=64 * 1024 - 512, duration=20, procs=2)
    classic, ours = bench.versus("memory", scenario)
    bound = 50 * (Settings().queue_max_bytes / MIB + TRANSPORT_ALLOWANCE_MIB)
    rate = median([r.report.publisher.achieved_rate for r in ours])
    growth = median([_growth(r) for r in ours])
    return [
        Row(
            "memory",
            "publisher's achieved rate (msg/s)",
            spread([r.report.publisher.achieved_rate for r in classic]),
            spread([r.report.publisher.achieved_rate for r in ours]),
            ">= 19.8 (of 20)",
            rate is not None and rate >= 19.8,
        ),
        delivery_row("memory", "fast clients' delivery", classic, ours),
        Row(
            "memory",
            "server RSS growth (MiB)",
            spread([_growth(r) for r in classic]),
            spread([_growth(r) for r in ours]),
            f"<= {bound:.0f} (50 x QUEUE_MAX_BYTES + transport)",
            growth is not None and growth <= bound,
        ),
        *cost_rows("memory", classic, ours),
    ]


def throughput(bench: Bench) -> list[Row]:
    """500 fast clients, 2,000 messages of 100 B published flat out, raw and multiplexed."""
    rows = []
    for mode in Mode:
        # 2,000 messages at a rate no server keeps up with: sent as fast as possible.
        scenario = Scenario(
            fast=500, rate=100_000, duration=0.02, size=100, mode=mode, procs=2, drain=60
        )
        classic, ours = bench.versus(f"throughput {mode.value}", scenario)
        faster = _ratios([delivery_rate(r) for r in ours], [delivery_rate(r) for r in classic])
        leaner = _ratios([cpu_per_million(r) for r in classic], [cpu_per_million(r) for r in ours])
        least = median(faster)
        complete = median([fast_delivery(r) for r in ours]) == 100
        rows += [
            Row(
                "throughput",
                f"deliveries/s, {mode.value} mode (x classic)",
                spread([delivery_rate(r) for r in classic], ",.0f"),
                f"{spread([delivery_rate(r) for r in ours], ',.0f')}; {spread(faster)}x",
                ">= 5x",
                least is not None and least >= 5 and complete,
            ),
            Row(
                "throughput",
                f"server CPU s per million deliveries, {mode.value} mode (classic / broadcaster)",
                spread([cpu_per_million(r) for r in classic], ".2f"),
                f"{spread([cpu_per_million(r) for r in ours], '.2f')}; {spread(leaner)}x less",
                "-",
                None,
            ),
        ]
    return rows


def history(bench: Bench) -> list[Row]:
    """The multiplexed throughput scenario with history on (the default) and off, in turn."""
    base = Scenario(fast=500, rate=100_000, duration=0.02, size=100, procs=2, drain=60)
    runs = bench.rotate(
        "history",
        [
            ("off", bench.stress(BROADCASTER, replace(base, server_env=HISTORY_OFF))),
            ("on", bench.stress(BROADCASTER, base)),
        ],
    )
    off, on = runs["off"], runs["on"]
    kept = _ratios([delivery_rate(r) for r in on], [delivery_rate(r) for r in off])
    ratio = median(kept)
    return [
        Row(
            "history",
            "deliveries/s, mux mode: history off, on (x off)",
            spread([delivery_rate(r) for r in off], ",.0f"),
            f"{spread([delivery_rate(r) for r in on], ',.0f')}; {spread(kept, '.2f')}x",
            ">= 0.9x off",
            ratio is not None and ratio >= 0.9,
        ),
        Row(
            "history",
            "server CPU s per million deliveries: history off, on",
            spread([cpu_per_million(r) for r in off], ".2f"),
            spread([cpu_per_million(r) for r in on], ".2f"),
            "-",
            None,
        ),
    ]


def churn(bench: Bench) -> list[Row]:
    """5 fast clients and 100 that come and go abruptly, while 100 msg/s are published."""
    scenario = Scenario(fast=5, churn=100, churn_stay=0.2, rate=100, duration=20, procs=2)
    classic, ours = bench.versus("churn", scenario)

    def verdict(runs: Sequence[Run]) -> str:
        errors = max(r.report.server.error_lines if r.report.server else 0 for r in runs)
        kept = sum(not _cut_off(r) for r in runs)
        left = [r.report.leftover_subscribers for r in runs]
        known = [n for n in left if n is not None]
        return (
            f"at most {errors} error lines, publisher kept in {kept} of {len(runs)}, "
            f"{max(known) if known else 'n/a'} left subscribed at most, RSS drift "
            f"{spread([_rss_phases(r)[1] for r in runs])} MiB after "
            f"{spread([_rss_phases(r)[0] for r in runs])} MiB of warm-up"
        )

    clean = all(
        r.report.server is not None
        and r.report.server.error_lines == 0
        and not _cut_off(r)
        and r.report.leftover_subscribers == 0
        for r in ours
    )
    drift = median([abs(_rss_phases(r)[1]) for r in ours])
    sessions = spread([r.report.kinds[Kind.CHURN].sessions for r in ours], ",.0f")
    return [
        Row(
            "churn",
            f"{sessions} sessions",
            verdict(classic),
            verdict(ours),
            "every run: 0 errors, kept, 0 left; drift < 5 MiB",
            clean and drift is not None and drift < 5,
        ),
        *cost_rows("churn", classic, ours),
    ]


def connections(bench: Bench) -> list[Row]:
    """10,000 idle connections on one worker, one small message a second."""
    scenario = Scenario(fast=10_000, rate=1, size=64, duration=10, procs=2, connect_timeout=60)
    classic, ours = bench.versus("connections", scenario)

    def per_connection(run: Run) -> float | None:
        return _per_connection(run, 10_000)

    theirs = median([per_connection(r) for r in classic])
    mine = median([per_connection(r) for r in ours])
    return [
        delivery_row("connections", "delivery to 10,000 idle clients", classic, ours),
        Row(
            "connections",
            "server RSS per connection (KiB)",
            spread([per_connection(r) for r in classic]),
            spread([per_connection(r) for r in ours]),
            "< classic",
            theirs is not None and mine is not None and mine < theirs,
        ),
        *cost_rows("connections", classic, ours),
    ]


def idle(bench: Bench) -> list[Row]:
    """100,000 idle connections on one worker, from eight loopback addresses (one has too
    few ephemeral ports), one small message a second; broadcaster alone, one round.

    Where the hard limit on open files is lower and may not be raised, as many connections as
    it lets one process hold.
    """
    raise_file_limit(IDLE_CONNECTIONS)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    count = IDLE_CONNECTIONS
    if hard != resource.RLIM_INFINITY:
        count = min(count, hard - FILE_MARGIN)
    scenario = Scenario(
        fast=count,
        rate=1,
        size=64,
        duration=5,
        drain=30,
        procs=2,
        connect_timeout=300,
        source_addresses=8,
        server_env={"BROADCASTER_MAX_CONNECTIONS": str(2 * IDLE_CONNECTIONS)},
    )
    runs = bench.rotate("idle", [("broadcaster", bench.stress(BROADCASTER, scenario))], rounds=1)
    ours = runs["broadcaster"]
    mine = median([_per_connection(r, count) for r in ours])
    complete = median([fast_delivery(r) for r in ours]) == 100
    return [
        Row(
            "idle",
            f"{count:,} idle connections (hard file limit {hard}): delivery (%), RSS per "
            "connection (KiB)",
            "-",
            f"{spread([fast_delivery(r) for r in ours])}, "
            f"{spread([_per_connection(r, count) for r in ours])}",
            f"{IDLE_CONNECTIONS:,} connections, 100, <= {IDLE_KIB}",
            count == IDLE_CONNECTIONS and complete and mine is not None and mine <= IDLE_KIB,
        ),
    ]


def _per_connection(run: Run, connections: int) -> float | None:
    """The server's peak RSS over its idle RSS, per connection, in KiB."""
    server = run.report.server
    if server is None or server.rss_peak_mib is None or server.rss_idle_mib is None:
        return None
    return (server.rss_peak_mib - server.rss_idle_mib) * 1024 / connections


def _ratios(tops: Sequence[float | None], bottoms: Sequence[float | None]) -> list[float | None]:
    """Round by round, one run's figure over the other's."""
    return [
        top / bottom if top is not None and bottom else None
        for top, bottom in zip(tops, bottoms, strict=True)
    ]


def _cut_off(run: Run) -> bool:
    publisher = run.report.publisher
    return publisher.close_code is not None or publisher.error is not None


def _growth(run: Run) -> float | None:
    return run.report.server.rss_growth_mib if run.report.server else None


def _rss_phases(run: Run) -> tuple[float, float]:
    """RSS growth over the first quarter of publishing (warm-up), and from then to the end.

    In the first quarter the first wave of connections grows the allocator's pools once; a
    leak keeps growing after it, and that later growth is the drift.
    """
    server = run.report.server
    assert server is not None
    assert server.rss_start_mib is not None
    assert server.rss_end_mib is not None
    quarter = run.report.scenario["duration"] / 4
    warm = next((rss for at, rss, _ in server.samples if at >= quarter), server.rss_end_mib)
    return round(warm - server.rss_start_mib, 1), round(server.rss_end_mib - warm, 1)
