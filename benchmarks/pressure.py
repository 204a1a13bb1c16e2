"""Steady clients under pressure: clients churning around them, and stalled clients that
hold the kernel's socket buffers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from measure import (
    BROADCASTER,
    CLASSIC,
    CLASSIC_DROPPING,
    MIB,
    Row,
    cost_rows,
    median,
    spread,
    tcp_pressure_mib,
)
from scenarios import delivery_row, p99

from broadcaster.settings import Settings
from broadcaster.stress import Kind, Scenario

if TYPE_CHECKING:
    from measure import Bench, Run

CHURN_LATENCY = Scenario(fast=20, churn=30, churn_stay=0.5, rate=200, duration=10, procs=2)
KERNEL_STALLED = 600
KERNEL_FAST = 20
KERNEL_BASE = Scenario(
    fast=KERNEL_FAST, rate=20, size=60 * 1024, duration=25, drain=3, procs=2, connect_timeout=30
)
# Each connection's kernel send buffer, in bytes: the server's share of the kernel's TCP
# memory in the kernel row is at most connections x this.
SOCKET_SEND_BUFFER = Settings().socket_send_buffer


def client_receive_buffer() -> int:
    """The receive buffer Linux gives a new socket (the middle of ``net.ipv4.tcp_rmem``): the
    load generator's stalled clients, on this machine too, each hold up to that much."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 128 * 1024


def churn_latency(bench: Bench) -> list[Row]:
    """20 steady clients at 200 msg/s while 30 churning ones connect and leave ~100 times a
    second (half with a TCP reset).

    The classic server here forgets a socket whose send fails (``--drop-failed-sends``):
    unpatched, the first send to a reset client fails the publish and cuts the publisher off
    (the churn row shows that), and there would be no latency left to compare.
    """
    classic, ours = bench.versus("churn latency", CHURN_LATENCY, CLASSIC_DROPPING)
    theirs, mine = median([p99(r) for r in classic]), median([p99(r) for r in ours])

    def churn_rate(run: Run) -> float:
        return run.report.kinds[Kind.CHURN].sessions / CHURN_LATENCY.duration

    return [
        Row(
            "churn latency",
            "steady clients' p99 latency (ms)",
            spread([p99(r) for r in classic]),
            spread([p99(r) for r in ours]),
            f"<= 1.3 x {theirs:.1f}" if theirs is not None else "<= 1.3 x n/a",
            theirs is not None and mine is not None and mine <= 1.3 * theirs,
        ),
        delivery_row("churn latency", "steady clients' delivery", classic, ours),
        Row(
            "churn latency",
            "churn sessions/s",
            spread([churn_rate(r) for r in classic], ".0f"),
            spread([churn_rate(r) for r in ours], ".0f"),
            "about 100",
            None,
        ),
        *cost_rows("churn latency", classic, ours),
    ]


def kernel(bench: Bench) -> list[Row]:
    """600 stalled clients that never read plus 20 fast ones, 20 msg/s of 60 KB for 25 s;
    the kernel's TCP memory, and the fast clients against a run without the stalled ones."""
    stalled = replace(KERNEL_BASE, stalled=KERNEL_STALLED)
    runs = bench.rotate(
        "kernel",
        [
            ("classic", bench.stress(CLASSIC, stalled)),
            ("broadcaster", bench.stress(BROADCASTER, stalled)),
            ("broadcaster, no stalled", bench.stress(BROADCASTER, KERNEL_BASE)),
        ],
    )
    classic, ours, clean = runs["classic"], runs["broadcaster"], runs["broadcaster, no stalled"]
    connections = KERNEL_STALLED + KERNEL_FAST + 1  # and the publisher's
    # Judged on the rise above what the machine's other sockets held just before.
    rise = median([r.tcp_rise_mib for r in ours])
    # Both ends of every connection are on this machine: the server's send buffer and the
    # client's receive buffer.
    bound = connections * (SOCKET_SEND_BUFFER + client_receive_buffer()) / MIB
    target = f"rise <= {bound:.0f} ({connections} x (SOCKET_SEND_BUFFER + client rcvbuf))"
    within = rise is not None and rise <= bound
    clean_p99, ours_p99 = median([p99(r) for r in clean]), median([p99(r) for r in ours])

    def memory(runs: list[Run]) -> str:
        before = median([r.tcp_before_mib for r in runs])
        held = "n/a" if before is None else f"{before:.1f}"
        return f"{spread([r.tcp_peak_mib for r in runs])}, {held} before"

    pressure = tcp_pressure_mib()
    return [
        Row(
            "kernel",
            "kernel TCP memory at its peak (MiB); this machine's pressure threshold "
            + ("n/a" if pressure is None else f"{pressure:.0f}"),
            memory(classic),
            f"{memory(ours)}; {memory(clean)} without stalled",
            target,
            within,
        ),
        delivery_row("kernel", "fast clients' delivery", classic, ours),
        Row(
            "kernel",
            "fast clients' p99 latency (ms)",
            spread([p99(r) for r in classic]),
            f"{spread([p99(r) for r in ours])}; {spread([p99(r) for r in clean])} without stalled",
            f"<= 2 x {clean_p99:.1f}" if clean_p99 is not None else "<= 2 x n/a",
            clean_p99 is not None and ours_p99 is not None and ours_p99 <= 2 * clean_p99,
        ),
        *cost_rows("kernel", classic, ours),
    ]
