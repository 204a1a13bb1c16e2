"""The hub's streams: resume with since, rewind with last, races with publishes, bounds."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import pytest
import structlog

from broadcaster.errors import LagCause, SlowConsumer
from broadcaster.hub import Hub
from broadcaster.mailbox import Source, Subscriber
from broadcaster.policy import Overflow
from broadcaster.protocol import Mode, Payload, Position
from broadcaster.stream import History
from tests.test_hub import GUARD, join, queued, running, settle, subscribed, take, take_json


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stream_hub(clock: Clock | None = None, **history: Any) -> Hub:
    """A hub with a history of these bounds (small defaults) and, optionally, a fake clock."""
    bounds: dict[str, Any] = {"size": 100, "recovery_max": 50, "ttl": 60.0, **history}
    return Hub(
        mailbox_size=1000,
        logger=structlog.get_logger(),
        max_subscriptions=100,
        history=History(**bounds),
        clock=clock or Clock(),
    )


async def publish_numbers(hub: Hub, topic: str, numbers: range) -> Position:
    """Publish each number, waiting for each receipt; return the last position."""
    receipt = None
    for n in numbers:
        receipt = await hub.publish_nowait(topic, Payload.from_data(n)).wait()
    assert receipt is not None
    return Position(receipt.epoch, receipt.seq)


async def test_since_replays_what_was_missed_then_live_messages() -> None:
    """A resume within the history gets recovered: true, the missed messages, then live ones."""
    hub = stream_hub()
    async with running(hub):
        position = await publish_numbers(hub, "t", range(3))
        await publish_numbers(hub, "t", range(3, 6))
        subscriber = await join(hub)
        await hub.subscribe(subscriber, "t", since=Position(position.epoch, 3))
        await hub.publish("t", Payload.from_data(6))
        frames = await take_json(subscriber, 5)
    assert frames[0] == subscribed("t", 6, epoch=position.epoch, recovered=True)
    assert [(f["seq"], f["data"]) for f in frames[1:]] == [(4, 3), (5, 4), (6, 5), (7, 6)]


@pytest.mark.parametrize(
    ("since", "reason"),
    [
        (Position("another-epoch", 2), "new_epoch"),
        (Position("", 1), "not_retained"),  # the epoch is filled in below
        (Position("", 99), "invalid_position"),
    ],
)
async def test_an_unrecoverable_since_says_recovered_false_and_goes_live(
    since: Position, reason: str
) -> None:
    """Another epoch, a position older than the history or one never reached: live only."""
    hub = stream_hub(size=3)
    async with running(hub):
        position = await publish_numbers(hub, "t", range(6))
        if not since.epoch:
            since = Position(position.epoch, since.seq)
        subscriber = await join(hub)
        await hub.subscribe(subscriber, "t", since=since)
        await hub.publish("t", Payload.from_data("live"))
        frames = await take_json(subscriber, 2)
        assert frames == [
            subscribed("t", 6, epoch=position.epoch, recovered=False),
            {"topic": "t", "seq": 7, "data": "live"},
        ]
        assert hub.statistics().recoveries == {reason: 1}


async def test_more_missed_than_recovery_max_is_not_replayed() -> None:
    """A client that missed more than recovery_max messages is told recovered: false."""
    hub = stream_hub(recovery_max=2)
    async with running(hub):
        position = await publish_numbers(hub, "t", range(3))
        subscriber = await join(hub)
        await hub.subscribe(subscriber, "t", since=Position(position.epoch, 0))
        await settle()
        assert await take_json(subscriber, 1) == [subscribed("t", 3, recovered=False)]
        assert queued(subscriber) == 0
        assert hub.statistics().recoveries == {"over_limit": 1}


async def test_last_rewinds_in_both_modes() -> None:
    """last K replays the latest K messages: envelopes in mux mode, raw frames in raw mode."""
    hub = stream_hub()
    async with running(hub):
        await publish_numbers(hub, "t", range(5))
        mux = await join(hub)
        await hub.subscribe(mux, "t", last=2)
        raw = await join(hub, mode=Mode.RAW)
        await hub.subscribe(raw, "t", last=3)
        frames = await take_json(mux, 3)
        assert frames[0] == subscribed("t", 5, recovered=True)
        assert [frame["data"] for frame in frames[1:]] == [3, 4]
        assert await take(raw, 3) == ["2", "3", "4"]


async def test_a_replay_reuses_the_frame_of_the_live_fan_out() -> None:
    """A replayed envelope is the very frame object that live subscribers were sent."""
    hub = stream_hub()
    async with running(hub):
        live = await join(hub, "t")
        await take(live, 1)
        await hub.publish("t", Payload.from_data("once"))
        [live_frame] = await live.outbox.receive_batch(1)
        late = await join(hub)
        await hub.subscribe(late, "t", last=1)
        await settle()
        [_, replayed] = await late.outbox.receive_batch(1_000_000)
        assert replayed is live_frame


async def test_a_replay_larger_than_the_outbox_meets_the_overflow_policy() -> None:
    """drop_oldest keeps the newest replayed messages; disconnect cuts the client off."""
    hub = stream_hub()
    async with running(hub):
        await publish_numbers(hub, "t", range(10))
        dropping = await join(hub, max_messages=3, overflow=Overflow.DROP_OLDEST)
        await hub.subscribe(dropping, "t", last=10)
        cut = await join(hub, max_messages=3, overflow=Overflow.DISCONNECT)
        await hub.subscribe(cut, "t", last=10)
        await settle()
        frames = await take_json(dropping, 4)
        assert [frame.get("data") for frame in frames[1:]] == [7, 8, 9]
        assert dropping.outbox.statistics().dropped == 7
        error = cut.outbox.error
        assert isinstance(error, SlowConsumer)
        assert error.cause is LagCause.QUEUE_FULL


async def test_resuming_while_publishes_stream_loses_and_repeats_nothing() -> None:
    """Clients that leave and resume with since while a publisher runs get every seq once."""
    hub = stream_hub(size=1000, recovery_max=1000)
    total = 600
    results: list[list[int]] = []

    async def publisher() -> None:
        for n in range(1, total):
            await hub.publish_eagerly("t", Payload.from_data(n), source=Source.APP)
            if n % 7 == 0:
                await anyio.lowlevel.checkpoint()

    async def reconnecting(seed: int, start: Position) -> None:
        chooser = random.Random(seed)
        seen: list[int] = []
        position = start
        while position.seq < total:
            subscriber = await join(hub)
            await hub.subscribe(subscriber, "t", since=position)
            [ack, *messages] = await _frames(subscriber)
            assert ack == subscribed("t", ack["seq"], epoch=start.epoch, recovered=True)
            for _ in range(chooser.randint(0, 5)):
                if messages and messages[-1]["seq"] == total:
                    break
                messages += await _frames(subscriber)
            # Left abruptly: whatever was queued and not taken is lost with the connection.
            hub.leave_nowait(subscriber)
            seen += [message["seq"] for message in messages]
            if seen:
                position = Position(start.epoch, seen[-1])
        results.append(seen)

    with anyio.fail_after(GUARD * 4):
        async with running(hub), anyio.create_task_group() as tg:
            start = await publish_numbers(hub, "t", range(1))
            for seed in range(5):
                tg.start_soon(reconnecting, seed, start)
            tg.start_soon(publisher)
    assert results == [list(range(2, total + 1))] * 5
    assert hub.statistics().recoveries["recovered"] > 5


async def _frames(subscriber: Subscriber) -> list[dict[str, Any]]:
    """Take what is queued (waiting for at least one frame) and decode it."""
    return [json.loads(frame.data) for frame in await subscriber.outbox.receive_batch(1 << 20)]


async def test_an_idle_topic_expires_and_a_resume_gets_a_new_epoch() -> None:
    """After the TTL without publishes the topic is forgotten: its next epoch differs."""
    clock = Clock()
    hub = stream_hub(clock, ttl=10.0)
    async with running(hub):
        position = await publish_numbers(hub, "t", range(2))
        clock.now = 11.0
        subscriber = await join(hub)
        await hub.subscribe(subscriber, "t", since=position)
        [ack] = await take_json(subscriber, 1)
        assert ack["recovered"] is False
        assert (ack["seq"], ack["epoch"] != position.epoch) == (0, True)
        assert hub.statistics().history.expired == 1


async def test_a_subscribed_topic_keeps_its_position_past_the_ttl() -> None:
    """Live subscribers never see seq go back: the topic's position outlives its TTL."""
    clock = Clock()
    hub = stream_hub(clock, ttl=10.0)
    async with running(hub):
        subscriber = await join(hub, "t")
        position = await publish_numbers(hub, "t", range(2))
        clock.now = 100.0
        receipt = await hub.publish_nowait("other", Payload("wake")).wait()
        assert receipt.seq == 1
        again = await publish_numbers(hub, "t", range(1))
        assert again == Position(position.epoch, 3)
        frames = await take_json(subscriber, 4)
        assert [frame.get("seq") for frame in frames] == [0, 1, 2, 3]


async def test_with_history_off_a_resume_recovers_only_when_nothing_was_missed() -> None:
    """HISTORY_SIZE=0 keeps positions: nothing missed is recovered, anything else is not."""
    hub = stream_hub(size=0)
    async with running(hub):
        position = await publish_numbers(hub, "t", range(3))
        first = await join(hub)
        await hub.subscribe(first, "t", since=position)
        second = await join(hub)
        await hub.subscribe(second, "t", since=Position(position.epoch, 2))
        await settle()
        assert await take_json(first, 1) == [subscribed("t", 3, recovered=True)]
        assert await take_json(second, 1) == [subscribed("t", 3, recovered=False)]
        assert hub.statistics().history.messages == 0


async def test_history_reads_pages_of_envelopes() -> None:
    """Hub.history gives the position and envelopes after since, or the latest ones."""
    hub = stream_hub()
    async with running(hub):
        position = await publish_numbers(hub, "t", range(5))
        assert hub.history("t", Position(position.epoch, 1), 2)[0] == position
        _, recovered, frames = hub.history("t", Position(position.epoch, 1), 2)
        assert recovered
        assert [json.loads(str(frame.data))["seq"] for frame in frames] == [2, 3]
        _, recovered, frames = hub.history("t", None, 2)
        assert [json.loads(str(frame.data))["data"] for frame in frames] == [3, 4]
        assert hub.history("t", Position("old", 1), 2)[1:] == (False, [])
        empty, _, none = hub.history("fresh", None, 5)
        assert (empty.seq, none) == (0, [])
