"""Tests for broadcaster.hub.Hub, with real outboxes standing in for connections."""

from __future__ import annotations

import base64
import gc
import json
import warnings
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import anyio
import pytest
import structlog

from broadcaster.errors import (
    CloseCode,
    Closing,
    HubBusy,
    HubStopped,
    LagCause,
    ShuttingDown,
    SlowConsumer,
)
from broadcaster.hub import BURST, Hub
from broadcaster.mailbox import PendingReceipt, Source, Subscriber
from broadcaster.outbox import Outbox
from broadcaster.policy import Overflow
from broadcaster.protocol import Frame, Mode, Payload

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import TaskGroup

GUARD = 5.0  # seconds; only a guard against hangs, never a way to wait


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests of this module on asyncio."""
    return "asyncio"


class Failures:
    """Records every call of an outbox's ``on_fail``."""

    def __init__(self) -> None:
        self.errors: list[Closing] = []

    def __call__(self, error: Closing) -> None:
        self.errors.append(error)


def make_hub(mailbox_size: int = 100) -> Hub:
    """Build a hub with a structlog logger."""
    return Hub(mailbox_size=mailbox_size, logger=structlog.get_logger(), max_subscriptions=100)


def make_subscriber(
    mode: Mode = Mode.MUX,
    *,
    max_messages: int = 100,
    overflow: Overflow = Overflow.DROP_OLDEST,
    on_fail: Failures | None = None,
) -> Subscriber:
    """Build a fake connection: a subscriber whose outbox the test reads itself."""
    outbox = Outbox(
        max_messages=max_messages,
        max_bytes=1_000_000,
        overflow=overflow,
        lag_timeout=60.0,
        logger=structlog.get_logger(),
        on_fail=on_fail or Failures(),
    )
    return Subscriber(outbox, mode)


@asynccontextmanager
async def running(hub: Hub) -> AsyncIterator[TaskGroup]:
    """Run ``hub`` in a task group for the block, then cancel it."""
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            yield tg
            tg.cancel_scope.cancel()


async def settle() -> None:
    """Let the hub take every queued command: it is idle once every task is blocked."""
    await anyio.wait_all_tasks_blocked()


async def join(hub: Hub, *topics: str, mode: Mode = Mode.MUX, **options: Any) -> Subscriber:
    """Join a new fake connection to ``hub`` and subscribe it to ``topics``."""
    subscriber = make_subscriber(mode, **options)
    hub.join(subscriber)
    for topic in topics:
        await hub.subscribe(subscriber, topic)
    return subscriber


async def take_frames(subscriber: Subscriber, count: int) -> list[Frame]:
    """Receive ``count`` frames from the subscriber's outbox, one batch each."""
    frames: list[Frame] = []
    for _ in range(count):
        # A batch limit below any frame's size takes exactly one frame.
        frames += await subscriber.outbox.receive_batch(1)
    return frames


async def take(subscriber: Subscriber, count: int) -> list[str | bytes]:
    """Receive ``count`` frames from the subscriber's outbox; return their messages."""
    return [frame.data for frame in await take_frames(subscriber, count)]


async def take_json(subscriber: Subscriber, count: int) -> list[Any]:
    """Receive ``count`` text frames and decode them as JSON."""
    frames = await take(subscriber, count)
    assert all(isinstance(frame, str) for frame in frames)
    return [json.loads(frame) for frame in frames]


def subscribed(topic: str, seq: int = 0, **fields: Any) -> dict[str, Any]:
    """Match a subscribed frame by its topic, seq and other fields, whatever its epoch."""
    return {"op": "subscribed", "topic": topic, "epoch": ANY, "seq": seq, **fields}


def queued(subscriber: Subscriber) -> int:
    """Return how many frames, data and control, wait in the subscriber's outbox."""
    stats = subscriber.outbox.statistics()
    return stats.queued_messages + stats.queued_control


async def test_a_mux_subscriber_is_told_subscribed_first() -> None:
    """A mux subscriber gets a subscribed control frame before any published envelope."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub, "news")
        await hub.publish("news", Payload.from_data({"n": 1}))
        assert await take_json(subscriber, 2) == [
            {"op": "subscribed", "topic": "news", "epoch": ANY, "seq": 0},
            {"topic": "news", "seq": 1, "data": {"n": 1}},
        ]


async def test_a_raw_subscriber_gets_no_control_frames() -> None:
    """A raw subscriber is subscribed silently and gets only published frames."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub, "news", mode=Mode.RAW)
        await settle()
        assert queued(subscriber) == 0
        await hub.publish("news", Payload("first"))
        assert await take(subscriber, 1) == ["first"]


async def test_publish_fans_out_to_every_subscriber_of_the_topic() -> None:
    """Raw subscribers get the raw frame, mux ones the envelope, other topics nothing."""
    hub = make_hub()
    async with running(hub):
        raw = await join(hub, "t", mode=Mode.RAW)
        mux_a = await join(hub, "t")
        mux_b = await join(hub, "t", "other")
        bystander = await join(hub, "other")
        await settle()
        assert await take_json(mux_a, 1) == [subscribed("t")]
        assert len(await take(mux_b, 2)) == 2
        assert len(await take(bystander, 1)) == 1

        receipt = hub.publish_nowait("t", Payload(b"\x00\xff"))
        with anyio.fail_after(GUARD):
            assert (await receipt.wait()).subscribers == 3
        assert await take_frames(raw, 1) == [Frame.of(b"\x00\xff")]
        [frame_a] = await take_frames(mux_a, 1)
        [frame_b] = await take_frames(mux_b, 1)
        assert frame_a is frame_b  # the envelope is encoded once for every mux subscriber
        envelope: dict[str, Any] = {"topic": "t", "seq": 1, "data": "AP8=", "encoding": "base64"}
        assert isinstance(frame_a.data, str)
        assert json.loads(frame_a.data) == envelope
        assert frame_a == Frame.of(frame_a.data)  # a text frame
        assert base64.b64decode(envelope["data"]) == b"\x00\xff"
        assert queued(bystander) == 0


async def test_seq_counts_per_topic() -> None:
    """Each topic numbers its publishes 1, 2, 3 independently of other topics."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub, "a", "b")
        await take(subscriber, 2)
        for n in range(3):
            await hub.publish("a", Payload.from_data(n))
        await hub.publish("b", Payload.from_data("x"))
        await hub.publish("a", Payload.from_data(3))
        frames = await take_json(subscriber, 5)
    assert [(frame["topic"], frame["seq"], frame["data"]) for frame in frames] == [
        ("a", 1, 0),
        ("a", 2, 1),
        ("a", 3, 2),
        ("b", 1, "x"),
        ("a", 4, 3),
    ]


async def test_receipts_report_seq_and_subscribers() -> None:
    """A publish receipt tells the topic, its seq and how many subscribers it reached."""
    hub = make_hub()
    async with running(hub):
        await join(hub, "t")
        await join(hub, "t", mode=Mode.RAW)
        receipts = [hub.publish_nowait("t", Payload.from_data(n)) for n in range(3)]
        results = [await receipt.wait() for receipt in receipts]
        assert [(r.topic, r.seq, r.subscribers) for r in results] == [
            ("t", 1, 2),
            ("t", 2, 2),
            ("t", 3, 2),
        ]
        assert hub.statistics().published == {"app": 3}


async def test_publish_without_subscribers_still_takes_the_next_seq() -> None:
    """Publishing to a topic nobody subscribes to reaches nobody, but its seq still rises."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub, "elsewhere")
        receipt = hub.publish_nowait("empty", Payload("hello"))
        result = await receipt.wait()
        assert (result.topic, result.seq, result.subscribers) == ("empty", 1, 0)
        again = await hub.publish_nowait("empty", Payload("again")).wait()
        assert (again.epoch, again.seq) == (result.epoch, 2)
        stats = hub.statistics()
        assert "empty" not in stats.topics
        assert stats.published == {"app": 2}
        assert await take_json(subscriber, 1) == [subscribed("elsewhere")]
        assert queued(subscriber) == 0


async def test_unsubscribe_stops_delivery_and_empty_topics_disappear() -> None:
    """An unsubscribed connection gets nothing more, and a topic without subscribers goes away."""
    hub = make_hub()
    async with running(hub):
        leaving = await join(hub, "t")
        staying = await join(hub, "t", mode=Mode.RAW)
        await settle()
        assert hub.statistics().topics == {"t": 2}

        await hub.unsubscribe(leaving, "t")
        await hub.publish("t", Payload("after"))
        await settle()
        assert await take_json(leaving, 2) == [
            subscribed("t"),
            {"op": "unsubscribed", "topic": "t"},
        ]
        assert queued(leaving) == 0
        assert await take(staying, 1) == ["after"]
        assert hub.statistics().topics == {"t": 1}

        await hub.unsubscribe(staying, "t")
        await settle()
        assert queued(staying) == 0  # raw subscribers get no unsubscribed frame
        stats = hub.statistics()
        assert dict(stats.topics) == {}
        assert stats.subscribers == 2  # unsubscribing does not leave the hub
        assert leaving.topics == staying.topics == set()


async def test_statistics_topics_is_a_read_only_snapshot() -> None:
    """statistics().topics cannot be used to change the hub's registry."""
    hub = make_hub()
    async with running(hub):
        await join(hub, "t")
        await settle()
        topics = hub.statistics().topics
        with pytest.raises(TypeError):
            topics["x"] = 1  # type: ignore[index]
        assert dict(hub.statistics().topics) == {"t": 1}


async def test_leave_removes_every_subscription() -> None:
    """leave_nowait takes a connection off every topic and out of the hub."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub, "a", "b", "c")
        other = await join(hub, "b")
        await settle()
        assert hub.statistics().topics == {"a": 1, "b": 2, "c": 1}
        hub.leave_nowait(subscriber)
        await settle()
        stats = hub.statistics()
        assert stats.topics == {"b": 1}
        assert stats.subscribers == 1
        assert subscriber.topics == set()
        assert other.topics == {"b"}


async def test_publish_nowait_raises_hub_busy_when_the_mailbox_is_full() -> None:
    """publish_nowait raises HubBusy once the mailbox holds mailbox_size commands."""
    hub = make_hub(mailbox_size=3)
    async with running(hub):
        accepted = fill_mailbox(hub)
        assert hub.statistics().mailbox_depth == 3
        with pytest.raises(HubBusy):
            hub.publish_nowait("t", Payload("one more"))
        for receipt in accepted:
            await receipt.wait()
        assert hub.statistics().mailbox_depth == 0
        # Once the hub has caught up there is room again.
        assert (await hub.publish_nowait("t", Payload("again")).wait()).subscribers == 0


def fill_mailbox(hub: Hub) -> list[PendingReceipt]:
    """Publish without waiting until the hub's mailbox is full; return the pending receipts."""
    receipts: list[PendingReceipt] = []
    for _ in range(1000):
        try:
            receipts.append(hub.publish_nowait("t", Payload("filler")))
        except HubBusy:
            return receipts
    pytest.fail("the mailbox never filled up")


async def test_leave_nowait_is_not_lost_when_the_mailbox_is_full() -> None:
    """A departure made while the mailbox is full still removes every subscription."""
    hub = make_hub(mailbox_size=4)
    async with running(hub):
        subscriber = await join(hub, "t", "u", "v")
        await settle()
        assert hub.statistics().topics == {"t": 1, "u": 1, "v": 1}
        receipts = fill_mailbox(hub)
        assert hub.statistics().mailbox_depth == 4
        hub.leave_nowait(subscriber)
        results = [await receipt.wait() for receipt in receipts]
        await settle()
        stats = hub.statistics()
        assert dict(stats.topics) == {}
        assert stats.subscribers == 0
        assert stats.mailbox_depth == 0
        assert subscriber.topics == set()
        # The departure is taken at the latest right after the burst of commands that was
        # queued when it was made; here that burst is every publish in the mailbox.
        assert len(results) <= BURST
        assert [result.subscribers for result in results] == [1] * len(results)
        assert (await hub.publish_nowait("t", Payload("after")).wait()).subscribers == 0


async def test_a_departure_waits_for_at_most_one_burst() -> None:
    """The hub takes up to BURST queued commands in one go, then a departure, then the rest."""
    hub = make_hub(mailbox_size=2 * BURST)
    async with running(hub):
        subscriber = await join(hub, "t", mode=Mode.RAW, max_messages=4 * BURST)
        await settle()
        receipts = fill_mailbox(hub)
        assert len(receipts) > 2 * BURST  # one taken by the waiting hub, the rest queued
        hub.leave_nowait(subscriber)
        results = [await receipt.wait() for receipt in receipts]
        assert [result.subscribers for result in results] == [1] * BURST + [0] * (
            len(results) - BURST
        )
        # The frames of the burst reached the outbox before it left; nothing after.
        assert queued(subscriber) == BURST
        assert hub.statistics().subscribers == 0


async def test_a_batch_is_published_in_order_in_commands_of_at_most_a_burst() -> None:
    """publish_batch waits for mailbox room between its commands and returns each message's
    epoch, seq and subscriber count in order; the subscriber gets its messages in order and
    the fan-out of each command is observed once."""
    observed: list[float] = []
    hub = Hub(
        mailbox_size=1,
        logger=structlog.get_logger(),
        max_subscriptions=10,
        observe_fanout=observed.append,
    )
    messages = [("t" if n % 2 else "u", Payload(str(n))) for n in range(2 * BURST + 1)]
    async with running(hub):
        subscriber = await join(hub, "t", mode=Mode.RAW, max_messages=2 * BURST)
        results = await hub.publish_batch(messages, Source.APP)
        received = await take(subscriber, BURST)
    assert results == [(ANY, n // 2 + 1, 1 if n % 2 else 0) for n in range(2 * BURST + 1)]
    assert received == [str(n) for n in range(1, 2 * BURST + 1, 2)]
    assert len(observed) == 3
    assert hub.statistics().published == {"app": 2 * BURST + 1}


async def test_a_batch_for_a_stopped_hub_raises_hub_stopped() -> None:
    """A batch for a hub that is not running publishes nothing and raises HubStopped."""
    hub = make_hub()
    with pytest.raises(HubStopped):
        await hub.publish_batch([("t", Payload("late"))], Source.APP)


async def test_raw_subscribers_get_the_published_frame_as_it_is() -> None:
    """A raw subscriber gets one text or binary frame of the published message, unwrapped."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub, "t", mode=Mode.RAW)
        messages: list[str | bytes] = ["text", "\u2603" * 50, b"\x00bytes", b"x" * 70_000]
        for message in messages:
            await hub.publish("t", Payload(message))
            assert await take_frames(subscriber, 1) == [Frame.of(message)]


async def test_commands_of_a_departed_connection_are_ignored() -> None:
    """A subscribe queued by a connection that has left does not put it back on the topic."""
    hub = make_hub()
    async with running(hub):
        subscriber = await join(hub)
        hub.leave_nowait(subscriber)
        await hub.subscribe(subscriber, "t")
        await settle()
        assert dict(hub.statistics().topics) == {}
        assert queued(subscriber) == 0


async def test_a_stalled_subscriber_is_cut_off_while_others_get_everything() -> None:
    """Under disconnect, an outbox nobody reads fails with SlowConsumer; the others miss nothing."""
    failures = Failures()
    hub = make_hub()
    async with running(hub):
        stalled = await join(
            hub, "t", max_messages=3, overflow=Overflow.DISCONNECT, on_fail=failures
        )
        reader = await join(hub, "t", max_messages=3, overflow=Overflow.DISCONNECT)
        received = await take_json(reader, 1)
        for n in range(20):
            await hub.publish("t", Payload.from_data(n))
            # The reader keeps up, as a live connection would, while the stalled one lags.
            received += await take_json(reader, 1)

        error = stalled.outbox.error
        assert isinstance(error, SlowConsumer)
        assert error.cause is LagCause.QUEUE_FULL
        assert (error.code, error.reason) == (CloseCode.TRY_AGAIN_LATER, "slow consumer")
        assert failures.errors == [error]
        assert reader.outbox.error is None
        assert received[0] == subscribed("t")
        assert [frame["data"] for frame in received[1:]] == list(range(20))
        assert [frame["seq"] for frame in received[1:]] == list(range(1, 21))
        with pytest.raises(SlowConsumer):
            await stalled.outbox.receive_batch(1)


async def test_cancelling_the_hub_fails_every_outbox_with_shutting_down() -> None:
    """When the hub is cancelled, every joined connection's outbox fails with a 1001."""
    hub = make_hub()
    failures = Failures()
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            assert hub.statistics().running
            subscribers = [
                await join(hub, "t", on_fail=failures),
                await join(hub, "t", mode=Mode.RAW, on_fail=failures),
                await join(hub, on_fail=failures),
            ]
            await hub.publish("t", Payload("queued"))
            await settle()
            tg.cancel_scope.cancel()
    assert len(failures.errors) == 3
    for subscriber in subscribers:
        error = subscriber.outbox.error
        assert isinstance(error, ShuttingDown)
        assert (error.code, error.reason) == (CloseCode.GOING_AWAY, "server shutting down")
        assert error.code == 1001
        assert subscriber.outbox.statistics().queued_messages == 0
        with pytest.raises(ShuttingDown):
            await subscriber.outbox.receive_batch(1)
    stats = hub.statistics()
    assert not stats.running
    assert dict(stats.topics) == {}
    assert stats.subscribers == 0


async def test_join_raises_hub_stopped_when_the_hub_is_not_running() -> None:
    """join raises HubStopped before the hub runs and after it has stopped."""
    hub = make_hub()
    with pytest.raises(HubStopped):
        hub.join(make_subscriber())
    async with running(hub):
        hub.join(make_subscriber())
        assert hub.statistics().subscribers == 1
    with pytest.raises(HubStopped):
        hub.join(make_subscriber())


async def test_commands_raise_hub_stopped_after_the_hub_stops() -> None:
    """Once the hub has stopped, subscribing and publishing raise HubStopped."""
    hub = make_hub()
    async with running(hub):
        pass
    subscriber = make_subscriber()
    with pytest.raises(HubStopped):
        await hub.subscribe(subscriber, "t")
    with pytest.raises(HubStopped):
        await hub.publish("t", Payload("late"))
    with pytest.raises(HubStopped):
        hub.publish_nowait("t", Payload("late"))
    hub.leave_nowait(subscriber)  # leaving a stopped hub is harmless


async def test_publishes_queued_when_the_hub_stops_are_not_left_pending() -> None:
    """Every receipt of a publish still queued when the hub stops resolves, or raises HubStopped."""
    hub = make_hub()
    async with running(hub) as tg:
        receipts = [hub.publish_nowait("t", Payload(str(n))) for n in range(3)]
        tg.cancel_scope.cancel()
    outcomes: list[object] = []

    async def wait(receipt: PendingReceipt) -> None:
        try:
            outcomes.append(await receipt.wait())
        except HubStopped as error:
            outcomes.append(error)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as waiters:
            for receipt in receipts:
                waiters.start_soon(wait, receipt)
            await anyio.wait_all_tasks_blocked()
            # Whatever is still waiting now would wait forever: nothing is left to wake it.
            waiters.cancel_scope.cancel()
    assert len(outcomes) == len(receipts)


async def test_a_stopped_hub_closes_its_mailbox() -> None:
    """A hub that has stopped leaves no unclosed memory stream for the garbage collector to flag."""
    hub = make_hub()
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            tg.cancel_scope.cancel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
        caught.clear()  # garbage left by earlier tests is not this hub's
        del hub
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
