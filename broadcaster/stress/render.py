"""Showing a stress run to a person: live progress while it runs, a table at the end.

On a terminal, progress is a rich table redrawn in place; elsewhere (CI logs) it is one
line every few seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from types import TracebackType

    from rich.console import Console

    from broadcaster.stress.messages import Snapshot
    from broadcaster.stress.report import KindReport, Report, ServerReport

# Seconds between two progress lines when the output is not a terminal.
QUIET_SECONDS = 5.0
# Mean CPU of a receiving process (percent of a core) at which it may be the bottleneck.
BUSY_PERCENT = 90.0


class ProgressView:
    """Shows :class:`Snapshot` s as they come; a context manager, called with each one.

    Args:
        console: where to draw.
        live: redraw a table in place (a terminal) rather than print quiet lines.
    """

    def __init__(self, console: Console, *, live: bool) -> None:
        self._console = console
        self._live = Live(console=console, auto_refresh=False, transient=True) if live else None
        self._next_line = 0.0

    def __enter__(self) -> ProgressView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, snapshot: Snapshot) -> None:
        """Show one snapshot."""
        if self._live is not None:
            self._live.update(_progress_table(snapshot), refresh=True)
            return
        now = time.monotonic()
        if now >= self._next_line:
            self._next_line = now + QUIET_SECONDS
            self._console.print(_progress_line(snapshot), highlight=False, soft_wrap=True)


def _progress_line(snapshot: Snapshot) -> str:
    parts = [
        f"stress: {snapshot.phase} {snapshot.elapsed:.0f}/{snapshot.duration:g} s",
        f"published {snapshot.published}",
    ]
    for kind, count in snapshot.clients.items():
        progress = snapshot.kinds.get(kind)
        if count and progress is not None:
            parts.append(f"{kind} {progress.received} received, {progress.connected}/{count} open")
    if snapshot.server is not None:
        server = snapshot.server
        parts.append(f"server {server.rss_mib:.0f} MiB {server.cpu_percent:.0f}% CPU")
    return "; ".join(parts)


def _progress_table(snapshot: Snapshot) -> Table:
    title = (
        f"broadcaster stress · {snapshot.phase} · {snapshot.elapsed:.1f}/{snapshot.duration:g} s"
        f" · published {snapshot.published}"
    )
    if snapshot.server is not None:
        server = snapshot.server
        title += f" · server {server.rss_mib:.1f} MiB, {server.cpu_percent:.0f}% CPU"
    table = Table(title=title, title_justify="left")
    for column in ("kind", "clients", "open", "received", "closed by server", "sessions"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, count in snapshot.clients.items():
        progress = snapshot.kinds.get(kind)
        if count and progress is not None:
            table.add_row(
                str(kind),
                str(count),
                str(progress.connected),
                str(progress.received),
                str(progress.closed),
                str(progress.sessions),
            )
    return table


def print_report(
    report: Report, violations: list[str], console: Console, *, judged: bool = True
) -> None:
    """Print the report's table, the publisher's and server's figures, each kind's health, and
    the verdict: a failed run, the thresholds missed, or (``judged`` false) that no threshold
    was given. Lines are never wrapped, so that a log file reads as a terminal does."""
    table = Table(title=f"broadcaster stress · {report.url}", title_justify="left")
    columns = ["kind", "clients", "delivered/expected", "delivery", "lost", "gaps"]
    columns += ["p50 ms", "p90 ms", "p99 ms", "max ms", "closes", "notes"]
    for column in columns:
        left = column in ("kind", "closes", "notes")
        table.add_column(column, justify="left" if left else "right")
    for kind in report.kinds.values():
        table.add_row(*_kind_row(kind))
    console.print(table)
    publisher = report.publisher
    target = f"{publisher.target_rate:g} msg/s" if publisher.target_rate else "flat out"
    line = (
        f"publisher ({publisher.via}): target {target}, achieved {publisher.achieved_rate:.1f} "
        f"msg/s, {publisher.published} published in {publisher.seconds:.1f} s"
    )
    if publisher.rejected:
        line += f", {publisher.rejected} rejected (503)"
    if publisher.close_code is not None:
        line += f", closed by the server: {publisher.close_code} {publisher.close_reason}"
    if publisher.error:
        line += f", error: {publisher.error}"
    console.print(line, highlight=False, soft_wrap=True)
    if report.server is not None:
        console.print(_server_line(report.server), highlight=False, soft_wrap=True)
        for error in report.server.errors[:5]:
            console.print(f"  server error: {error}", highlight=False, markup=False, soft_wrap=True)
    receivers = report.receiver_cpu_percent
    console.print(
        f"load generator, mean CPU while publishing: receivers "
        f"{', '.join(_percent(cpu) for cpu in receivers)}; "
        f"publisher {_percent(report.publisher_cpu_percent)}",
        highlight=False,
        soft_wrap=True,
    )
    busy = [cpu for cpu in receivers if cpu is not None and cpu >= BUSY_PERCENT]
    if busy:
        console.print(
            f"[yellow]warning[/] {len(busy)} of {len(receivers)} receiving processes were "
            "busy nearly all the time: the load generator may be what limits this run; "
            "give it more --procs (and cores)",
            highlight=False,
            soft_wrap=True,
        )
    if report.leftover_subscribers is not None:
        console.print(
            f"registry: {report.leftover_subscribers} subscribers left on this run's topics "
            "after every client left",
            highlight=False,
            soft_wrap=True,
        )
    for line in report.health():
        console.print(f"health: {line}", highlight=False, markup=False, soft_wrap=True)
    failures = report.failures()
    for failure in failures:
        console.print(f"[bold red]FAILED RUN[/] {failure}", highlight=False, soft_wrap=True)
    for violation in violations:
        console.print(f"[bold red]FAIL[/] {violation}", highlight=False, soft_wrap=True)
    if failures or violations:
        return
    if judged:
        console.print("[bold green]OK[/] every threshold met", highlight=False, soft_wrap=True)
    else:
        console.print(
            "no thresholds were given: nothing was judged beyond the run itself "
            "(--min-fast-delivery, --max-lost, --require-recovered and others judge it)",
            highlight=False,
            soft_wrap=True,
        )


def _kind_row(kind: KindReport) -> list[str]:
    latency = kind.latency
    times = (
        [f"{latency.p50:.1f}", f"{latency.p90:.1f}", f"{latency.p99:.1f}", f"{latency.max:.1f}"]
        if latency
        else ["-"] * 4
    )
    notes = []
    if kind.sessions:
        notes.append(f"{kind.sessions} sessions")
    if kind.connect_failures:
        notes.append(f"{kind.connect_failures} failed to connect")
    if kind.undrained:
        notes.append(f"{kind.undrained} still receiving when the drain ended")
    if kind.reordered:
        notes.append(f"{kind.reordered} out of order")
    if kind.duplicates:
        notes.append(f"{kind.duplicates} duplicated")
    if kind.recovered or kind.not_recovered:
        notes.append(f"resumes {kind.recovered} recovered, {kind.not_recovered} not")
    if kind.diverged:
        notes.append(f"{kind.diverged} saw another sequence")
    if kind.unparsed:
        notes.append(f"{kind.unparsed} unparsed")
    return [
        str(kind.kind),
        str(kind.clients),
        f"{kind.delivered}/{kind.expected}",
        f"{kind.delivery:.2%}" if kind.delivery is not None else "-",
        str(kind.lost),
        str(kind.gaps),
        *times,
        ", ".join(f"{label} x{n}" for label, n in kind.closes.items()) or "-",
        ", ".join(notes),
    ]


def _server_line(server: ServerReport) -> str:
    def mib(value: float | None) -> str:
        return f"{value:.1f} MiB" if value is not None else "-"

    cpu_time = ""
    if server.cpu_seconds is not None and server.cpu_window_seconds is not None:
        cpu_time = (
            f", {server.cpu_seconds:.2f} s of CPU in the {server.cpu_window_seconds:.1f} s "
            "from the first publish to the last receipt"
        )
    if server.cpus:
        cpu_time += f" on cores {','.join(map(str, server.cpus))}"
    return (
        f"server (pid {server.pid}): RSS idle {mib(server.rss_idle_mib)}, at start "
        f"{mib(server.rss_start_mib)}, peak {mib(server.rss_peak_mib)} (growth "
        f"{mib(server.rss_growth_mib)}), end {mib(server.rss_end_mib)}; CPU while publishing "
        f"mean {_percent(server.cpu_mean_percent)}, peak {_percent(server.cpu_peak_percent)}"
        f"{cpu_time}; exit status {server.exit_status}; {server.error_lines} error lines logged"
    )


def _percent(value: float | None) -> str:
    return f"{value:.0f}%" if value is not None else "-"
