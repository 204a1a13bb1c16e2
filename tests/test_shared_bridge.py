"""The bridge with history shared through a broker, against fake links: reads that fail,
reads that wait for the topic's broker subscription, and numbered messages."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from broadcaster.backplane import decode_positioned, encode
from broadcaster.backplane.bridge import Bridge
from broadcaster.backplane.recoverer import READ_TRIES
from broadcaster.backplane.shared import Slice
from broadcaster.errors import BackplaneDown
from broadcaster.log import get_logger
from broadcaster.mailbox import PendingSubscribe, RecoveredCommand
from broadcaster.protocol import Payload, Position
from broadcaster.settings import Settings
from tests.support import wait_until
from tests.test_bridge import HERE, FakeLink
from tests.test_hub import make_subscriber

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


class UnreadableBroker:
    """Hands out links whose stream reads fail, as a Redis that errs on every read."""

    def __init__(self) -> None:
        self.links: list[FakeLink] = []
        self.reads = 0

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[FakeLink]:
        await anyio.lowlevel.checkpoint()
        link = FakeLink()
        self.links.append(link)

        async def read(topic: str, start: int, count: int) -> Slice:
            self.reads += 1
            raise BackplaneDown("redis: unreadable")

        link.read = read  # type: ignore[attr-defined]
        try:
            yield link
        finally:
            link.close()


@asynccontextmanager
async def numbered_bridge(
    broker: Any,
) -> AsyncIterator[tuple[Bridge, list[RecoveredCommand]]]:
    """A bridge numbering through ``broker``, up, and the answers it gives; stopped on exit."""
    answers: list[RecoveredCommand] = []

    async def answer_(command: RecoveredCommand) -> None:
        answers.append(command)

    async def deliver(topic: str, payload: Payload) -> None:
        raise AssertionError("nothing is delivered unnumbered")

    options: dict[str, Any] = {"backplane_reconnect_min": 0.001, "backplane_reconnect_max": 0.002}
    bridge = Bridge(
        broker, HERE, Settings(**options), get_logger("test"), jitter=lambda: 0.0, sequenced=True
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: bridge.run(deliver, answer=answer_, task_status=task_status)
            )
            await wait_until(lambda: bridge.statistics().up)
            yield bridge, answers
            tg.cancel_scope.cancel()


async def test_a_read_that_keeps_failing_is_answered_with_the_error() -> None:
    """Each failed read costs the link; after READ_TRIES the subscribe gets the error."""
    broker = UnreadableBroker()
    async with numbered_bridge(broker) as (bridge, answers):
        bridge.topic_opened("t")
        request = PendingSubscribe(make_subscriber(), "t", Position("E", 1), None)
        assert bridge.recover(request)
        await wait_until(lambda: bool(answers))
    [command] = answers
    assert command.request is request
    assert command.error == "redis: unreadable"
    assert broker.reads == READ_TRIES
    assert len(broker.links) >= READ_TRIES


def test_a_numbered_message_carries_its_position() -> None:
    """The broker's message decodes to its position, node and payload; others are refused."""
    message = b"sE1:42:" + encode(HERE, Payload("x"))
    assert decode_positioned(message) == (Position("E1", 42), HERE, Payload("x"))
    with pytest.raises(ValueError, match="numbered"):
        decode_positioned(encode(HERE, Payload("x")))


class GatedBroker:
    """Links whose unsubscribes wait for ``gate``, and whose reads note the link's topics."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.unsubscribing = anyio.Event()
        self.reads: list[tuple[set[str], bool]] = []
        self.links: list[FakeLink] = []

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[FakeLink]:
        await anyio.lowlevel.checkpoint()
        link = FakeLink()
        self.links.append(link)
        unsubscribe = link.unsubscribe

        async def gated(topics: Sequence[str]) -> None:
            self.unsubscribing.set()
            await self.gate.wait()
            await unsubscribe(topics)

        async def read(topic: str, start: int, count: int) -> Slice:
            self.reads.append((set(link.topics), self.gate.is_set()))
            return Slice("E", 0, [])

        link.unsubscribe = gated  # type: ignore[method-assign]
        link.read = read  # type: ignore[attr-defined]
        try:
            yield link
        finally:
            link.close()


async def test_a_read_waits_for_a_topic_being_unsubscribed_to_be_subscribed_again() -> None:
    """A topic wanted again while its broker subscription is being dropped is read only once
    it is subscribed again: nothing published in between can be missed."""
    broker = GatedBroker()
    async with numbered_bridge(broker) as (bridge, answers):
        bridge.topic_opened("t")
        await wait_until(lambda: bridge.statistics().subscribed == 1)
        bridge.topic_closed("t")
        await broker.unsubscribing.wait()
        bridge.topic_opened("t")
        assert bridge.recover(PendingSubscribe(make_subscriber(), "t", None, None))
        await anyio.wait_all_tasks_blocked()
        assert broker.reads == []
        broker.gate.set()
        await wait_until(lambda: bool(answers))
    assert broker.reads == [({"t"}, True)]
    assert len(broker.links) == 1
