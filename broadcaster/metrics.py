"""Prometheus metrics, read at scrape time from totals the actors keep as plain numbers.

The hot path pays an integer addition, never a lock or a label lookup: :class:`Totals` holds
what has ended, the hub and the live outboxes hold what is, and the collector turns both into
metric families when Prometheus scrapes. No label carries a topic or a connection, so the
number of series stays fixed whatever clients do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from broadcaster.hub import BURST

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from prometheus_client.core import Metric

    from broadcaster.backplane.bridge import Bridge
    from broadcaster.hub import Hub
    from broadcaster.policy import Overflow

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "Totals"]

# Upper bounds of the outbox depth histogram, in queued messages.
DEPTH_BUCKETS = (0, 1, 10, 100, 1_000, 10_000)
# Upper bounds of the fan-out time histogram, in seconds.
FANOUT_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5)


@dataclass(slots=True)
class Totals:
    """What connections that have ended did; live connections are read from their outboxes."""

    accepted: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    slow_consumers: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    sent: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class Metrics:
    """The registry a broadcaster exposes at ``/metrics``.

    Args:
        overflow: the policy that drops are labelled with.

    The hub is created with ``fanout_seconds.observe``, then handed to :meth:`watch`.
    """

    def __init__(self, overflow: Overflow) -> None:
        self.totals = Totals()
        self.registry = CollectorRegistry()
        self.fanout_seconds = Histogram(
            "broadcaster_fanout_seconds",
            f"Time the hub took to offer one publish, or one command of up to {BURST} batched "
            "publishes, to every subscriber.",
            buckets=FANOUT_BUCKETS,
            registry=self.registry,
        )
        self._overflow = overflow

    def watch(self, hub: Hub, bridge: Bridge | None = None) -> None:
        """Read ``hub``'s registry, mailbox and outboxes, and ``bridge``, at every scrape."""
        self.registry.register(_Collector(hub, self.totals, self._overflow))
        if bridge is not None:
            self.registry.register(_BridgeCollector(bridge))

    def exposition(self) -> bytes:
        """Render every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, hub: Hub, totals: Totals, overflow: Overflow) -> None:
        self._hub = hub
        self._totals = totals
        self._overflow = overflow

    def collect(self) -> Iterator[Metric]:
        hub, totals = self._hub, self._totals
        stats = hub.statistics()
        outboxes = [subscriber.outbox.statistics() for subscriber in hub.subscribers()]
        yield GaugeMetricFamily(
            "broadcaster_connections", "WebSocket connections open.", stats.subscribers
        )
        yield CounterMetricFamily(
            "broadcaster_connections_accepted", "WebSocket connections accepted.", totals.accepted
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_connections_closed",
                "WebSocket connections ended, by the close code the server sent "
                "(none when the client left first).",
                labels=["code"],
            ),
            totals.closed,
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_refused",
                "WebSocket handshakes, HTTP requests and HTTP connections refused, by error code.",
                labels=["reason"],
            ),
            totals.refused,
        )
        yield GaugeMetricFamily(
            "broadcaster_subscriptions",
            "Subscriptions over all topics.",
            sum(stats.topics.values()),
        )
        yield GaugeMetricFamily("broadcaster_topics", "Topics with subscribers.", len(stats.topics))
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_messages_published",
                "Messages published, by where they came from.",
                labels=["source"],
            ),
            stats.published,
        )
        yield CounterMetricFamily(
            "broadcaster_messages_sent",
            "Messages taken from outboxes and written to sockets.",
            totals.sent + sum(outbox.sent for outbox in outboxes),
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_messages_dropped",
                "Messages an outbox dropped, by overflow policy.",
                labels=["policy"],
            ),
            {self._overflow.value: totals.dropped + sum(outbox.dropped for outbox in outboxes)},
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_slow_consumer_disconnects",
                "Connections closed with 1013, by cause.",
                labels=["cause"],
            ),
            totals.slow_consumers,
        )
        yield GaugeMetricFamily(
            "broadcaster_hub_mailbox_depth", "Commands waiting for the hub.", stats.mailbox_depth
        )
        history = stats.history
        yield GaugeMetricFamily(
            "broadcaster_history_streams",
            "Topics whose position (epoch and seq) the server keeps.",
            history.streams,
        )
        yield GaugeMetricFamily(
            "broadcaster_history_messages", "Messages kept in history.", history.messages
        )
        yield GaugeMetricFamily(
            "broadcaster_history_bytes",
            "Bytes of history, per-topic overhead included (bounded by HISTORY_TOTAL_BYTES).",
            history.bytes,
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_history_topics_forgotten",
                "Topics whose history was forgotten: evicted past HISTORY_TOTAL_BYTES, or "
                "expired past HISTORY_TTL.",
                labels=["reason"],
            ),
            {"evicted": history.evicted, "expired": history.expired},
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_recoveries",
                "Subscribes with since, by outcome: recovered, new_epoch, not_retained, "
                "over_limit or invalid_position.",
                labels=["outcome"],
            ),
            stats.recoveries,
        )
        depths = [outbox.queued_messages for outbox in outboxes]
        buckets = [(str(bound), sum(d <= bound for d in depths)) for bound in DEPTH_BUCKETS]
        yield HistogramMetricFamily(
            "broadcaster_outbox_depth_messages",
            "Messages queued per connection, sampled at scrape time.",
            buckets=[*buckets, ("+Inf", len(depths))],
            sum_value=sum(depths),
        )


class _BridgeCollector(Collector):
    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterator[Metric]:
        stats = self._bridge.statistics()
        yield GaugeMetricFamily(
            "broadcaster_backplane_up",
            "1 while linked to the broker with every wanted topic subscribed.",
            int(stats.up),
        )
        yield GaugeMetricFamily(
            "broadcaster_backplane_topics", "Topics subscribed on the broker.", stats.subscribed
        )
        yield CounterMetricFamily(
            "broadcaster_backplane_links", "Links made to the broker.", stats.links
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_backplane_messages",
                "Messages relayed through the broker, by direction.",
                labels=["direction"],
            ),
            {"outbound": stats.sent, "inbound": stats.received},
        )
        yield _labelled(
            CounterMetricFamily(
                "broadcaster_backplane_messages_dropped",
                "Messages not relayed, by why: a full buffer either way, the broker being "
                "down when published, or a message that was not broadcaster's.",
                labels=["reason"],
            ),
            {
                "outbound_overflow": stats.outbound_dropped,
                "inbound_overflow": stats.inbound_dropped,
                "broker_down": stats.unrelayed,
                "malformed": stats.malformed,
            },
        )


def _labelled(family: CounterMetricFamily, counts: Mapping[str, int]) -> CounterMetricFamily:
    for label, count in sorted(counts.items()):
        family.add_metric([label], count)
    return family
