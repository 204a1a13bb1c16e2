"""What the benchmark rows share: rotated runs, core placement, kernel TCP memory, the table.

A :class:`Bench` runs each variant of a scenario ``repeat`` times in rotation (classic,
broadcaster, classic, broadcaster, ...), so that a slow spell on the shared machine falls on
both servers alike, and every figure is shown as its median and, in brackets, the lowest and
highest run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from broadcaster.stress import Kind, Report, Scenario, run_scenario
from broadcaster.stress.spawned import ServerFailed, SpawnedServer, can_pin, pin

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from broadcaster.stress import KindReport, Snapshot

CLASSIC = (str(Path(__file__).with_name("classic.py")),)
# The classic pattern with the usual patch for clients that come and go: a failed send
# forgets the socket rather than failing the publish.
CLASSIC_DROPPING = (*CLASSIC, "--drop-failed-sends")
BROADCASTER = Scenario().server_command
MIB = 1024 * 1024
SOCKSTAT = Path("/proc/net/sockstat")
TCP_MEM = Path("/proc/sys/net/ipv4/tcp_mem")
T = TypeVar("T")
# Seconds a spawned server may take to start, and to stop once asked.
STARTUP_SECONDS = 30.0
STOP_SECONDS = 30.0


@contextmanager
def pinned_server(
    server_command: tuple[str, ...], server_cpus: tuple[int, ...]
) -> Iterator[tuple[SpawnedServer, str]]:
    """Spawn a server with its default settings, keep it on ``server_cpus`` (all cores when
    empty), and stop it on exit; end the benchmark, saying why, if it does not start."""
    server = SpawnedServer({}, server_command)
    try:
        base = server.start(STARTUP_SECONDS)
        assert server.pid is not None  # set by start()
        if server_cpus:
            pin(server.pid, server_cpus)
        yield server, base
    except ServerFailed as error:
        raise SystemExit(f"bench: {error}") from None
    finally:
        server.stop(STOP_SECONDS)


@dataclass(frozen=True)
class Row:
    """One figure of the table; ``met`` is ``None`` for a figure without a target."""

    scenario: str
    figure: str
    classic: str
    broadcaster: str
    target: str
    met: bool | None


@dataclass(frozen=True)
class Placement:
    """The cores the servers and the load generator run on, and how the run says so."""

    server_cpus: tuple[int, ...]
    load_cpus: tuple[int, ...]
    note: str


def place() -> Placement:
    """Keep this process (and so the load generator it starts) off the server's core.

    With two cores or more the server gets the first usable core and the load generator
    the others; otherwise nothing is pinned and the note says why.
    """
    if not can_pin():
        return Placement((), (), "not pinned: this platform has no sched_setaffinity")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return Placement((), (), f"not pinned: this process may use only core {cores[0]}")
    server, load = (cores[0],), tuple(cores[1:])
    pin(os.getpid(), load)
    return Placement(
        server, load, f"server on core {cores[0]}, load generator on cores {_cores(load)}"
    )


def _cores(cores: Sequence[int]) -> str:
    return ",".join(map(str, cores))


def tcp_memory_mib() -> float | None:
    """Return the kernel's TCP buffer memory (``/proc/net/sockstat``, TCP ``mem``) in MiB.

    ``None`` where the file does not exist (not Linux).
    """
    try:
        text = SOCKSTAT.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            pages = int(fields[fields.index("mem") + 1])
            return pages * os.sysconf("SC_PAGE_SIZE") / MIB
    return None


def tcp_pressure_mib() -> float | None:
    """Return the TCP memory above which the kernel enters memory pressure (``tcp_mem``'s
    middle value), in MiB; ``None`` where it cannot be read."""
    try:
        pages = int(TCP_MEM.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


@dataclass(frozen=True)
class Run:
    """One stress run: its report, and the kernel's TCP memory before it and at its peak."""

    report: Report
    tcp_before_mib: float | None
    tcp_peak_mib: float | None

    @property
    def tcp_rise_mib(self) -> float | None:
        """How far the kernel's TCP memory rose above what it held before the run."""
        if self.tcp_before_mib is None or self.tcp_peak_mib is None:
            return None
        return self.tcp_peak_mib - self.tcp_before_mib


class Bench:
    """Runs the variants of each scenario in rotation and keeps every result.

    Args:
        repeat: rounds of each scenario.
        placement: where the servers and the load generator run.
        json_path: where every run's full result is written after each scenario.
    """

    def __init__(self, repeat: int, placement: Placement, json_path: Path | None) -> None:
        self.repeat = repeat
        self.placement = placement
        self.json_path = json_path
        self.results: dict[str, dict[str, list[Any]]] = {}

    def rotate(
        self,
        name: str,
        variants: Sequence[tuple[str, Callable[[], T]]],
        rounds: int | None = None,
    ) -> dict[str, list[T]]:
        """Run every variant once per round, ``repeat`` rounds (or ``rounds``, for a scenario
        too long to repeat); return the results by label."""
        results: dict[str, list[T]] = {label: [] for label, _ in variants}
        rounds = self.repeat if rounds is None else rounds
        for round_number in range(1, rounds + 1):
            for label, run in variants:
                print(
                    f"bench: {name} {round_number}/{rounds}: {label}",
                    file=sys.stderr,
                    flush=True,
                )
                results[label].append(run())
        self.results[name] = {label: [_jsonable(r) for r in rs] for label, rs in results.items()}
        if self.json_path is not None:  # after each scenario, so a long run keeps its results
            self.json_path.write_text(json.dumps(self.results))
        return results

    def versus(
        self, name: str, scenario: Scenario, classic: tuple[str, ...] = CLASSIC
    ) -> tuple[list[Run], list[Run]]:
        """Run ``scenario`` against the classic pattern and broadcaster in rotation; return
        the classic pattern's runs and broadcaster's."""
        runs = self.rotate(
            name,
            [
                ("classic", self.stress(classic, scenario)),
                ("broadcaster", self.stress(BROADCASTER, scenario)),
            ],
        )
        return runs["classic"], runs["broadcaster"]

    def stress(self, server: tuple[str, ...], scenario: Scenario) -> Callable[[], Run]:
        """Return a thunk that runs ``scenario`` against ``server`` on the server's cores."""
        placed = replace(
            scenario,
            server_command=server,
            server_cpus=self.placement.server_cpus,
            load_cpus=self.placement.load_cpus,
        )

        def run() -> Run:
            before = tcp_memory_mib()
            peak = [before]

            def sample(_: Snapshot) -> None:
                peak.append(tcp_memory_mib())

            report = run_scenario(placed, on_progress=sample)
            seen = [mib for mib in peak if mib is not None]
            return Run(report, before, max(seen) if seen else None)

        return run


def _jsonable(result: object) -> object:
    if isinstance(result, Run):
        return {
            "tcp_before_mib": result.tcp_before_mib,
            "tcp_peak_mib": result.tcp_peak_mib,
            "report": result.report.to_json(),
        }
    if is_dataclass(result) and not isinstance(result, type):
        return asdict(result)
    return result


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values measured; ``None`` when none was."""
    seen = [v for v in values if v is not None]
    return statistics.median(seen) if seen else None


def spread(values: Sequence[float | None], style: str = ".1f") -> str:
    """Show values as ``median (min to max)``; ``n/a`` when none was measured."""
    seen = [v for v in values if v is not None]
    if not seen:
        return "n/a"
    middle = format(statistics.median(seen), style)
    if len(seen) == 1:
        return middle
    return f"{middle} ({format(min(seen), style)} to {format(max(seen), style)})"


def fast(report: Report) -> KindReport:
    """The fast clients' part of a report."""
    return report.kinds[Kind.FAST]


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def deliveries_per_second(report: Report) -> float:
    """Fast clients' deliveries over the publisher's time plus the slowest latency.

    ``benchmarks/scaleout.py`` counts this way, also for servers it did not spawn;
    :func:`delivery_rate` is what ``benchmarks/run.py`` shows.
    """
    kind = fast(report)
    window = report.publisher.seconds + (kind.latency.max / 1000 if kind.latency else 0)
    return float(kind.delivered / window) if window else 0.0


def delivered(report: Report) -> int:
    """Messages received by every client of the run."""
    return sum(kind.delivered for kind in report.kinds.values())


def delivery_rate(run: Run) -> float | None:
    """Every client's deliveries per second, from the first publish to the last receipt."""
    server = run.report.server
    window = server.cpu_window_seconds if server else None
    return delivered(run.report) / window if window else None


def cpu_per_million(run: Run) -> float | None:
    """The server's CPU seconds (user + system) per million deliveries."""
    server = run.report.server
    count = delivered(run.report)
    if server is None or server.cpu_seconds is None or not count:
        return None
    return server.cpu_seconds / count * 1e6


def cost_rows(scenario: str, classic: Sequence[Run], ours: Sequence[Run]) -> list[Row]:
    """Deliveries per second and the server's CPU per million deliveries, for both servers."""
    return [
        Row(
            scenario,
            "deliveries/s, first publish to last receipt",
            spread([delivery_rate(r) for r in classic], ",.0f"),
            spread([delivery_rate(r) for r in ours], ",.0f"),
            "-",
            None,
        ),
        Row(
            scenario,
            "server CPU s per million deliveries",
            spread([cpu_per_million(r) for r in classic], ".2f"),
            spread([cpu_per_million(r) for r in ours], ".2f"),
            "-",
            None,
        ),
    ]


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| scenario | figure | classic | broadcaster | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        met = "-" if row.met is None else "yes" if row.met else "**no**"
        cells = [row.scenario, row.figure, row.classic, row.broadcaster, row.target, met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
