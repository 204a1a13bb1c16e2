"""What a stress run measured, summarised per kind of client, and the thresholds it must meet.

A client subscribed before publishing started expects every message published to its topic;
a churn client expects, per session, the messages from the first to the last ``seq`` it saw.
Latencies come from merged histograms (about 3 % resolution); the maximum is exact.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from broadcaster.stress.clients import HISTOGRAM_SIZE, Kind, bucket_micros

if TYPE_CHECKING:
    from broadcaster.stress.messages import ClientResult, KindTotals
    from broadcaster.stress.publisher import PublisherResult
    from broadcaster.stress.scenario import Scenario
    from broadcaster.stress.spawned import Sample

# The close code of a slow consumer, as close labels start with it.
SLOW_CONSUMER = "1013"


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything a run measured, as the workers and the server sampler reported it.

    ``t0`` and ``publish_end`` are ``time.monotonic()`` values, like the samples' ``at``.
    """

    scenario: Scenario
    base_url: str
    topics: tuple[str, ...]
    publisher: PublisherResult
    clients: list[ClientResult]
    totals: list[dict[Kind, KindTotals]]
    bin_seconds: float
    t0: float
    publish_end: float
    drained_at: float
    server_cpu_seconds: float | None
    server_cpus: tuple[int, ...]
    samples: list[Sample]
    receiver_samples: list[list[Sample]]
    publisher_samples: list[Sample]
    server_pid: int | None
    exit_status: int | None
    error_count: int
    errors: list[str]
    leftover: int | None


@dataclass(frozen=True, slots=True)
class Latency:
    """Latency percentiles in milliseconds, from publish to receipt."""

    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class KindReport:
    """The clients of one kind, together.

    ``delivery`` is delivered over expected for them all; ``min_delivery`` the lowest of
    any one client. ``delivered_over_time`` is, per time bin of publishing, the fraction of
    that bin's messages they received (``None`` for churn clients and empty bins).
    ``lost`` is expected minus delivered, clients that got more not offsetting those that got
    less. Reconnecting clients also count ``duplicates`` the server sent, resumes answered
    ``recovered`` true and false, and ``diverged``: clients whose sequence of ``(epoch, seq,
    data)`` differs from the one most clients of their topic saw.
    """

    kind: Kind
    clients: int
    delivered: int
    expected: int
    delivery: float | None
    min_delivery: float | None
    gaps: int
    reordered: int
    unparsed: int
    lost: int
    duplicates: int
    recovered: int
    not_recovered: int
    diverged: int
    latency: Latency | None
    closes: dict[str, int]
    connect_failures: int
    undrained: int
    sessions: int
    errors: list[str]
    histogram: list[int] = field(repr=False)
    delivered_over_time: list[float | None] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServerReport:
    """The spawned server's memory and CPU (samples are seconds from the start of publishing,
    MiB and percent of a core) and how it ended.

    ``cpu_seconds`` is the CPU time (user and system) it used from just before the first
    publish to just after the last receipt, which took ``cpu_window_seconds``; ``cpus`` are
    the cores it was kept on (empty when it was not pinned).
    """

    pid: int | None
    exit_status: int | None
    rss_idle_mib: float | None
    rss_start_mib: float | None
    rss_peak_mib: float | None
    rss_end_mib: float | None
    rss_growth_mib: float | None
    cpu_mean_percent: float | None
    cpu_peak_percent: float | None
    cpu_seconds: float | None
    cpu_window_seconds: float | None
    cpus: list[int]
    error_lines: int
    errors: list[str]
    samples: list[tuple[float, float, float]] = field(repr=False)


@dataclass(frozen=True, slots=True)
class PublisherReport:
    """What the publisher was asked for and what it did."""

    via: str
    target_rate: float | None
    achieved_rate: float
    published: int
    per_topic: dict[str, int]
    seconds: float
    rejected: int
    close_code: int | None
    close_reason: str
    error: str | None


@dataclass(frozen=True, slots=True)
class Report:
    """The summary of one run.

    ``receiver_cpu_percent`` and ``publisher_cpu_percent`` are the load generator's own
    processes' mean CPU use while publishing: a receiving process near 100 % counts as fast
    as it can, so it, not the server, may be what limits the run.
    """

    url: str
    spawned: bool
    scenario: dict[str, Any]
    topics: list[str]
    kinds: dict[Kind, KindReport]
    publisher: PublisherReport
    server: ServerReport | None
    leftover_subscribers: int | None
    receiver_cpu_percent: list[float | None]
    publisher_cpu_percent: float | None
    bin_seconds: float
    clients: list[ClientResult] = field(repr=False)

    def failures(self) -> list[str]:
        """Say why the run itself failed (its figures judge nothing); empty when it did not."""
        publisher = self.publisher
        lines = []
        if publisher.close_code is not None:
            lines.append(
                f"the server closed the publisher's connection: {publisher.close_code} "
                f"{publisher.close_reason}".rstrip()
            )
        elif publisher.error:
            lines.append(f"the publisher stopped: {publisher.error}")
        if publisher.published == 0:
            lines.append("nothing was published")
        elif not any(kind.delivered for kind in self.kinds.values()):
            lines.append("no client received any message")
        return lines

    def health(self) -> list[str]:
        """Say, per kind of client, whether it got everything, and what it lost and why."""
        lines = []
        for kind in self.kinds.values():
            line = f"{kind.kind}: "
            if kind.expected and kind.lost == 0 and not (kind.duplicates or kind.reordered):
                line += f"all {kind.clients} clients got every message"
            elif kind.expected:
                least = f"{kind.min_delivery:.1%}" if kind.min_delivery is not None else "-"
                line += f"lost {kind.lost} of {kind.expected} messages (the least got {least})"
            else:
                line += "nothing was expected"
            if kind.duplicates or kind.reordered:
                line += f", {kind.duplicates} duplicated, {kind.reordered} out of order"
            if kind.recovered or kind.not_recovered:
                line += f"; resumes: {kind.recovered} recovered, {kind.not_recovered} not recovered"
            if kind.diverged:
                line += f"; {kind.diverged} clients saw another sequence than their topic's others"
            closes = ", ".join(f"{label} x{n}" for label, n in kind.closes.items())
            if closes:
                line += f"; closed by the server: {closes}"
            if kind.undrained:
                line += f"; {kind.undrained} still receiving when the drain ended"
            if kind.connect_failures:
                line += f"; {kind.connect_failures} connection attempts failed"
            lines.append(line)
        return lines

    def to_json(self) -> dict[str, Any]:
        """Return the whole report as JSON-ready data."""
        data = asdict(self)
        for kind in data["kinds"].values():
            kind["histogram"] = [
                [round(bucket_micros(i) / 1000, 4), n] for i, n in enumerate(kind["histogram"]) if n
            ]
        data["kinds"] = {str(kind): value for kind, value in data["kinds"].items()}
        data["failures"] = self.failures()
        data["health"] = self.health()
        return data


def summarise(outcome: Outcome) -> Report:
    """Turn what a run measured into its report."""
    scenario = outcome.scenario
    kinds = {
        kind: _kind_report(kind, outcome) for kind, count in scenario.counts().items() if count > 0
    }
    publisher = outcome.publisher
    settings = asdict(scenario)
    settings.update(mode=scenario.mode.value, via=str(scenario.via))
    settings["server_env"] = dict(scenario.server_env)
    return Report(
        url=outcome.base_url,
        spawned=scenario.url is None,
        scenario=settings,
        topics=list(outcome.topics),
        kinds=kinds,
        publisher=PublisherReport(
            via=str(scenario.via),
            target_rate=scenario.rate or None,
            achieved_rate=publisher.achieved_rate,
            published=publisher.total,
            per_topic=dict(publisher.published),
            seconds=publisher.seconds,
            rejected=publisher.rejected,
            close_code=publisher.close_code,
            close_reason=publisher.close_reason,
            error=publisher.error,
        ),
        server=_server_report(outcome) if scenario.url is None else None,
        leftover_subscribers=outcome.leftover,
        receiver_cpu_percent=[_mean_cpu(s, outcome) for s in outcome.receiver_samples],
        publisher_cpu_percent=_mean_cpu(outcome.publisher_samples, outcome),
        bin_seconds=outcome.bin_seconds,
        clients=outcome.clients,
    )


def percentile(histogram: list[int], fraction: float) -> float:
    """Return the latency in ms below which ``fraction`` of a histogram's counts lie."""
    rank = max(1, math.ceil(fraction * sum(histogram)))
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return bucket_micros(index) / 1000
    return bucket_micros(len(histogram) - 1) / 1000


def _kind_report(kind: Kind, outcome: Outcome) -> KindReport:
    clients = [c for c in outcome.clients if c.kind is kind]
    published = outcome.publisher.published
    churn = kind is Kind.CHURN
    expected = [c.span if churn else published.get(c.topic, 0) for c in clients]
    fractions = [c.received / e for c, e in zip(clients, expected, strict=True) if e]
    histogram = [0] * HISTOGRAM_SIZE
    bins: list[int] = []
    max_us = 0
    for totals in outcome.totals:
        part = totals.get(kind)
        if part is not None:
            histogram = [a + b for a, b in zip(histogram, part.histogram, strict=True)]
            bins = [a + b for a, b in zip(bins or [0] * len(part.bins), part.bins, strict=True)]
            max_us = max(max_us, part.max_latency_us)
    closes: dict[str, int] = {}
    for client in clients:
        for label, count in client.closes.items():
            closes[label] = closes.get(label, 0) + count
    over_time: list[float | None] = []
    if not churn:
        wanted = [0] * len(bins)
        for client in clients:
            topic_bins = outcome.publisher.bins.get(client.topic, [])
            wanted = [a + b for a, b in zip(wanted, topic_bins, strict=False)]
        over_time = [got / want if want else None for got, want in zip(bins, wanted, strict=True)]
    total_expected = sum(expected)
    delivered = sum(c.received for c in clients)
    lost = sum(max(e - c.received, 0) for c, e in zip(clients, expected, strict=True))
    # The sequence most clients of each topic delivered.
    usual: dict[str, str | None] = {}
    for topic in {c.topic for c in clients}:
        digests = Counter(c.digest for c in clients if c.topic == topic)
        usual[topic] = digests.most_common(1)[0][0]
    return KindReport(
        kind=kind,
        clients=len(clients),
        delivered=delivered,
        expected=total_expected,
        delivery=delivered / total_expected if total_expected else None,
        min_delivery=min(fractions) if fractions else None,
        gaps=sum(c.gaps for c in clients),
        reordered=sum(c.reordered for c in clients),
        unparsed=sum(c.unparsed for c in clients),
        lost=lost,
        duplicates=sum(c.duplicates for c in clients),
        recovered=sum(c.recovered for c in clients),
        not_recovered=sum(c.not_recovered for c in clients),
        diverged=sum(c.digest != usual[c.topic] for c in clients),
        latency=_latency(histogram, max_us / 1000) if any(histogram) else None,
        closes=dict(sorted(closes.items())),
        connect_failures=sum(c.connect_failures for c in clients),
        undrained=sum(not c.drained for c in clients),
        sessions=sum(c.sessions for c in clients),
        errors=[c.error for c in clients if c.error][:10],
        histogram=histogram,
        delivered_over_time=over_time,
    )


def _latency(histogram: list[int], max_ms: float) -> Latency:
    # A bucket's middle can lie above the exact maximum; no percentile may.
    p50, p90, p99 = (min(percentile(histogram, f), max_ms) for f in (0.5, 0.9, 0.99))
    return Latency(p50, p90, p99, max_ms)


def _mean_cpu(samples: list[Sample], outcome: Outcome) -> float | None:
    """Return a process's mean CPU use while the publisher ran."""
    during = [s.cpu_percent for s in samples if outcome.t0 < s.at <= outcome.publish_end]
    return sum(during) / len(during) if during else None


def _server_report(outcome: Outcome) -> ServerReport:
    samples = outcome.samples
    before = [s for s in samples if s.at <= outcome.t0]
    during = [s for s in samples if outcome.t0 < s.at <= outcome.publish_end]
    rss = [s.rss_mib for s in samples]
    start = before[-1].rss_mib if before else None
    peak = max(rss) if rss else None
    return ServerReport(
        pid=outcome.server_pid,
        exit_status=outcome.exit_status,
        rss_idle_mib=rss[0] if rss else None,
        rss_start_mib=start,
        rss_peak_mib=peak,
        rss_end_mib=rss[-1] if rss else None,
        rss_growth_mib=peak - start if peak is not None and start is not None else None,
        cpu_mean_percent=_mean_cpu(samples, outcome),
        cpu_peak_percent=max(s.cpu_percent for s in during) if during else None,
        cpu_seconds=outcome.server_cpu_seconds,
        cpu_window_seconds=(
            outcome.drained_at - outcome.t0 if outcome.server_cpu_seconds is not None else None
        ),
        cpus=list(outcome.server_cpus),
        error_lines=outcome.error_count,
        errors=outcome.errors,
        samples=[(s.at - outcome.t0, s.rss_mib, s.cpu_percent) for s in samples],
    )


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Limits a run must stay within; ``None`` (or ``False``) leaves one unchecked.

    Args:
        max_p99_ms: fast clients' p99 latency.
        min_fast_delivery: the delivered fraction (0 to 1) every fast client must reach.
        max_rss_mib: the spawned server's peak RSS.
        require_stalled_closed: every stalled client must have been closed with 1013.
        max_server_errors: lines the spawned server may log at error level.
        max_lost: messages reconnecting clients may miss, over them all.
        max_duplicates: messages reconnecting clients may get twice, over them all.
        max_out_of_order: messages reconnecting clients may get after a later one, over them
            all.
        require_recovered: every resume of a reconnecting client must say recovered: true,
            and every reconnecting client of a topic must see one identical sequence.
    """

    max_p99_ms: float | None = None
    min_fast_delivery: float | None = None
    max_rss_mib: float | None = None
    require_stalled_closed: bool = False
    max_server_errors: int | None = None
    max_lost: int | None = None
    max_duplicates: int | None = None
    max_out_of_order: int | None = None
    require_recovered: bool = False

    def given(self) -> bool:
        """Say whether any threshold was given."""
        return any(value not in (None, False) for value in asdict(self).values())

    def problems(self, scenario: Scenario) -> list[str]:
        """Say which thresholds cannot apply to ``scenario``; empty when all can."""
        spawned = scenario.url is None
        checks = [
            (self.max_p99_ms is None or self.max_p99_ms > 0, "--max-p99-ms must be more than 0"),
            (
                self.min_fast_delivery is None or 0 <= self.min_fast_delivery <= 1,
                "--min-fast-delivery is a fraction from 0 to 1",
            ),
            (
                (self.max_p99_ms is None and self.min_fast_delivery is None) or scenario.fast > 0,
                "--max-p99-ms and --min-fast-delivery need fast clients (--fast)",
            ),
            (self.max_rss_mib is None or spawned, "--max-rss-mib needs a spawned server (--spawn)"),
            (
                self.max_server_errors is None or spawned,
                "--max-server-errors needs a spawned server (--spawn)",
            ),
            (
                not self.require_stalled_closed or scenario.stalled > 0,
                "--require-stalled-closed needs stalled clients (--stalled)",
            ),
            (
                all(n is None or n >= 0 for n in self._reconnect_limits().values()),
                "--max-lost, --max-duplicates and --max-out-of-order must be 0 or more",
            ),
            (
                scenario.reconnect > 0
                or (self._reconnect_limits() == {} and not self.require_recovered),
                "--max-lost, --max-duplicates, --max-out-of-order and --require-recovered need "
                "reconnecting clients (--reconnecting)",
            ),
        ]
        return [message for ok, message in checks if not ok]

    def violations(self, report: Report) -> list[str]:
        """Return one line per threshold the run did not meet."""
        lines = []
        fast = report.kinds.get(Kind.FAST)
        if self.max_p99_ms is not None and fast is not None:
            p99 = fast.latency.p99 if fast.latency else None
            if p99 is None or p99 > self.max_p99_ms:
                seen = f"{p99:.1f} ms" if p99 is not None else "not measured (nothing arrived)"
                lines.append(f"--max-p99-ms {self.max_p99_ms:g}: fast clients' p99 was {seen}")
        if self.min_fast_delivery is not None and fast is not None:
            limit, per_topic = self.min_fast_delivery, report.publisher.per_topic
            short = [
                c
                for c in report.clients
                if c.kind is Kind.FAST and c.received < limit * per_topic.get(c.topic, 0)
            ]
            if short:
                least = fast.min_delivery or 0.0
                lines.append(
                    f"--min-fast-delivery {self.min_fast_delivery:g}: {len(short)} of "
                    f"{fast.clients} fast clients got less; the least got {least:.2%}"
                )
        server = report.server
        if self.max_rss_mib is not None and server is not None:
            peak = server.rss_peak_mib
            if peak is None or peak > self.max_rss_mib:
                seen = f"{peak:.1f} MiB" if peak is not None else "not measured"
                lines.append(f"--max-rss-mib {self.max_rss_mib:g}: the server's peak was {seen}")
        stalled = report.kinds.get(Kind.STALLED)
        if self.require_stalled_closed and stalled is not None:
            closed = sum(
                n for label, n in stalled.closes.items() if label.split()[0] == SLOW_CONSUMER
            )
            if closed < stalled.clients:
                how = ", ".join(f"{label} x{n}" for label, n in stalled.closes.items())
                lines.append(
                    f"--require-stalled-closed: {stalled.clients - closed} of {stalled.clients} "
                    f"stalled clients were not closed with 1013 (closes: {how or 'none'})"
                )
        if self.max_server_errors is not None and server is not None:
            if server.error_lines > self.max_server_errors:
                lines.append(
                    f"--max-server-errors {self.max_server_errors}: the server logged "
                    f"{server.error_lines} error lines"
                )
        return lines + self._reconnect_violations(report)

    def _reconnect_limits(self) -> dict[str, int]:
        limits = {
            "--max-lost": self.max_lost,
            "--max-duplicates": self.max_duplicates,
            "--max-out-of-order": self.max_out_of_order,
        }
        return {flag: limit for flag, limit in limits.items() if limit is not None}

    def _reconnect_violations(self, report: Report) -> list[str]:
        kind = report.kinds.get(Kind.RECONNECT)
        if kind is None:
            return []
        seen = {
            "--max-lost": (kind.lost, "lost"),
            "--max-duplicates": (kind.duplicates, "duplicated"),
            "--max-out-of-order": (kind.reordered, "out of order"),
        }
        lines = []
        for flag, limit in self._reconnect_limits().items():
            count, what = seen[flag]
            if count > limit:
                lines.append(f"{flag} {limit}: reconnecting clients had {count} messages {what}")
        if self.require_recovered:
            if kind.not_recovered or not kind.recovered:
                lines.append(
                    f"--require-recovered: {kind.not_recovered} of "
                    f"{kind.recovered + kind.not_recovered} resumes said recovered: false"
                )
            if kind.diverged:
                lines.append(
                    f"--require-recovered: {kind.diverged} reconnecting clients saw another "
                    "sequence of (epoch, seq, data) than the others of their topic"
                )
        return lines
