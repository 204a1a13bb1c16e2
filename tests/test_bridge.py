"""The bridge between a hub and a broker, against a broker of our own in memory."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from structlog.testing import capture_logs

from broadcaster.backplane import NODE_ID_BYTES, decode, encode
from broadcaster.backplane.bridge import Bridge
from broadcaster.errors import BackplaneDown, HubStopped
from broadcaster.log import get_logger
from broadcaster.protocol import Payload
from broadcaster.settings import Settings
from tests.support import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from anyio.abc import TaskGroup

HERE = b"h" * NODE_ID_BYTES
THERE = b"t" * NODE_ID_BYTES


class FakeLink:
    """A link that records what the bridge asks of it; tests feed it messages."""

    def __init__(self) -> None:
        self.feed, self._messages = anyio.create_memory_object_stream[tuple[str, bytes]](100)
        self.topics: set[str] = set()
        self.published: list[tuple[str, bytes]] = []
        self.stall_publish = False
        self.fail_ping: Exception | None = None

    def close(self) -> None:
        self.feed.close()
        self._messages.close()

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        async for item in self._messages:
            yield item

    async def subscribe(self, topics: Sequence[str]) -> None:
        await anyio.lowlevel.checkpoint()
        self.topics.update(topics)

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        await anyio.lowlevel.checkpoint()
        self.topics.difference_update(topics)

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if self.stall_publish:
            await anyio.sleep_forever()
        self.published.extend(messages)

    async def ping(self) -> None:
        if self.fail_ping is not None:
            raise self.fail_ping


class FakeBroker:
    """Hands out :class:`FakeLink` s; refuses while ``refusals`` is positive."""

    def __init__(self) -> None:
        self.links: list[FakeLink] = []
        self.refusals = 0

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[FakeLink]:
        await anyio.lowlevel.checkpoint()
        if self.refusals:
            self.refusals -= 1
            raise BackplaneDown("refused")
        link = FakeLink()
        self.links.append(link)
        try:
            yield link
        finally:
            link.close()


class Delivered:
    """The hub's side: what the bridge delivered; ``gate`` holds deliveries back."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Payload]] = []
        self.gate = anyio.Event()
        self.gate.set()

    async def __call__(self, topic: str, payload: Payload) -> None:
        await self.gate.wait()
        self.items.append((topic, payload))


@asynccontextmanager
async def running_bridge(
    broker: FakeBroker, deliver: Delivered | None = None, **settings: Any
) -> AsyncIterator[tuple[Bridge, TaskGroup]]:
    """Run a bridge on ``broker`` with small reconnect delays and no jitter."""
    options = {"backplane_reconnect_min": 0.001, "backplane_reconnect_max": 0.002, **settings}
    bridge = Bridge(broker, HERE, Settings(**options), get_logger("test"), jitter=lambda: 0.0)
    async with anyio.create_task_group() as tg:
        await tg.start(bridge.run, deliver or Delivered())
        yield bridge, tg
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    "payload",
    [Payload("text"), Payload(b"\x00\xff"), Payload.from_data("a string"), Payload.from_data([1])],
)
def test_a_payload_survives_the_broker(payload: Payload) -> None:
    """Text, bytes and JSON (a string or not) come back as they were published."""
    assert decode(encode(HERE, payload)) == (HERE, payload)


@pytest.mark.parametrize("message", [b"", b"nope", b"bc1" + HERE + b"x" + b"body"])
def test_a_foreign_message_is_refused(message: bytes) -> None:
    """What :func:`encode` did not make raises ValueError."""
    with pytest.raises(ValueError, match=r"broadcaster message|unknown payload kind"):
        decode(message)


async def test_subscriptions_follow_the_wanted_topics_through_churn() -> None:
    """However topics open and close meanwhile, the broker ends with exactly the wanted ones."""
    broker = FakeBroker()
    async with running_bridge(broker) as (bridge, _):
        await wait_until(lambda: bridge.statistics().up)
        link = broker.links[0]
        for round_ in range(50):
            bridge.topic_opened(f"t{round_}")
            if round_ % 3:
                bridge.topic_closed(f"t{round_ - 1}")
            await anyio.lowlevel.checkpoint()
        wanted = {f"t{n}" for n in range(50) if n == 49 or not (n + 1) % 3}
        await wait_until(lambda: link.topics == wanted)
        assert bridge.statistics().subscribed == len(wanted)


async def test_own_echo_is_skipped_and_other_nodes_are_delivered() -> None:
    """A message this node published comes back from the broker and is not delivered twice."""
    broker, delivered = FakeBroker(), Delivered()
    async with running_bridge(broker, delivered) as (bridge, _):
        await wait_until(lambda: bridge.statistics().up)
        bridge.published("t", Payload("mine"))
        link = broker.links[0]
        await wait_until(lambda: len(link.published) == 1)
        await link.feed.send(link.published[0])
        await link.feed.send(("t", encode(THERE, Payload("theirs"))))
        await wait_until(lambda: bridge.statistics().received == 1)
        await wait_until(lambda: len(delivered.items) == 1)
        assert delivered.items == [("t", Payload("theirs"))]
        assert bridge.statistics().sent == 1


async def test_a_full_inbound_buffer_drops_and_counts_once_per_episode() -> None:
    """While the hub does not take deliveries, what overflows is dropped, counted, logged once."""
    broker, delivered = FakeBroker(), Delivered()
    delivered.gate = anyio.Event()
    with capture_logs() as logs:
        async with running_bridge(broker, delivered, backplane_buffer=2) as (bridge, _):
            await wait_until(lambda: bridge.statistics().up)
            link = broker.links[0]
            for n in range(6):
                await link.feed.send(("t", encode(THERE, Payload(str(n)))))
            # One is in the deliverer's hands, two are buffered; the rest are dropped.
            await wait_until(lambda: bridge.statistics().inbound_dropped == 3)
            delivered.gate.set()
            await wait_until(lambda: len(delivered.items) == 3)
            await link.feed.send(("t", encode(THERE, Payload("after"))))
            await wait_until(lambda: len(delivered.items) == 4)
            await link.feed.send(("t", b"junk"))
            await wait_until(lambda: bridge.statistics().malformed == 1)
    events = [(log["event"], log.get("dropped")) for log in logs]
    assert events.count(("backplane_inbound_overflow_started", None)) == 1
    assert ("backplane_inbound_overflow_ended", 3) in events
    assert [payload.raw for _, payload in delivered.items] == ["0", "1", "2", "after"]


async def test_a_stalled_broker_never_blocks_the_hub() -> None:
    """Publishes past a full outbound buffer are dropped; the stalled publish times out, the
    link is dropped, what it held is counted, and the bridge links again."""
    broker = FakeBroker()
    async with running_bridge(broker, backplane_buffer=2, backplane_timeout=0.2) as (bridge, _):
        await wait_until(lambda: bridge.statistics().up)
        broker.links[0].stall_publish = True
        for n in range(5):
            bridge.published("t", Payload(str(n)))
        stats = bridge.statistics()
        assert stats.outbound_dropped == 2
        await wait_until(lambda: bridge.statistics().links == 2)
        stats = bridge.statistics()
        assert stats.unrelayed == 3
        assert stats.error == "TimeoutError"


async def test_the_bridge_reconnects_after_refusals_and_resubscribes() -> None:
    """A lost link is reported down, retried through refusals, and rejoined with every topic."""
    broker = FakeBroker()
    with capture_logs() as logs:
        async with running_bridge(broker) as (bridge, _):
            bridge.topic_opened("a")
            bridge.topic_opened("b")
            await wait_until(lambda: bridge.statistics().subscribed == 2)
            broker.refusals = 3
            broker.links[0].feed.close()
            await wait_until(lambda: len(broker.links) == 2 and bridge.statistics().up)
            assert broker.links[1].topics == {"a", "b"}
        assert not bridge.statistics().up
        bridge.published("a", Payload("after the end"))
        assert bridge.statistics().unrelayed == 1
    downs = [log for log in logs if log["event"] == "backplane_down"]
    assert [log["error"] for log in downs] == ["the broker closed the connection"]


async def test_an_unexpected_error_is_logged_and_the_bridge_links_again() -> None:
    """An error the link did not expect is logged with its traceback; it does not crash."""
    broker = FakeBroker()
    with capture_logs() as logs:
        async with running_bridge(broker) as (bridge, _):
            await wait_until(lambda: bridge.statistics().up)
            broker.links[0].fail_ping = RuntimeError("surprise")
            await wait_until(lambda: bridge.statistics().links == 2, deadline=5)
    assert any(log["event"] == "backplane_error" for log in logs)


async def test_delivery_stops_quietly_when_the_hub_has_stopped() -> None:
    """A hub that stopped ends the deliverer, not the bridge."""

    async def stopped(topic: str, payload: Payload) -> None:
        raise HubStopped

    broker = FakeBroker()
    bridge = Bridge(broker, HERE, Settings(), get_logger("test"))
    async with anyio.create_task_group() as tg:
        await tg.start(bridge.run, stopped)
        await wait_until(lambda: bridge.statistics().up)
        await broker.links[0].feed.send(("t", encode(THERE, Payload("x"))))
        await wait_until(lambda: bridge.statistics().received == 1)
        # The receiver goes on; only delivery has ended.
        await broker.links[0].feed.send(("t", encode(THERE, Payload("y"))))
        await wait_until(lambda: bridge.statistics().received == 2)
        assert bridge.statistics().up
        tg.cancel_scope.cancel()
