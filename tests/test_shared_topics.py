"""The hub with history shared through a broker, against a fake sequencer: every interleaving
of a resume's read with the live messages, refusals, epochs; and the pure read rules."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog

from broadcaster.backplane import decode_positioned, encode
from broadcaster.backplane.bridge import Bridge
from broadcaster.backplane.recoverer import READ_TRIES
from broadcaster.backplane.shared import Slice, judge, judge_page, read_start
from broadcaster.errors import BackplaneDown
from broadcaster.hub import Hub
from broadcaster.log import get_logger
from broadcaster.mailbox import PendingReceipt, PendingSubscribe, RecoveredCommand, Source
from broadcaster.protocol import Mode, Payload, Position
from broadcaster.settings import Settings
from broadcaster.stream import Outcome
from tests.support import wait_until
from tests.test_bridge import HERE, FakeLink
from tests.test_hub import make_subscriber, running, settle, take

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from broadcaster.mailbox import Subscriber


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeSequencer:
    """Takes publishes and subscribes the way the bridge does, and lets the test answer."""

    def __init__(self) -> None:
        self.up = True
        self.submitted: list[tuple[str, Payload, int]] = []
        self.requests: list[PendingSubscribe] = []
        self.room = True

    def accepting(self) -> bool:
        return self.up

    def submit(
        self, topic: str, payload: Payload, receipt: PendingReceipt | None, subscribers: int
    ) -> bool:
        self.submitted.append((topic, payload, subscribers))
        return True

    def recover(self, request: PendingSubscribe) -> bool:
        if self.room:
            self.requests.append(request)
        return self.room


def make_hub(sequencer: FakeSequencer) -> Hub:
    """A hub whose positions come from ``sequencer``."""
    return Hub(
        mailbox_size=100,
        logger=structlog.get_logger(),
        max_subscriptions=100,
        sequencer=sequencer,
    )


def answer(
    request: PendingSubscribe,
    seq: int,
    entries: list[int],
    outcome: Outcome | None = Outcome.RECOVERED,
    epoch: str = "E",
) -> RecoveredCommand:
    """The broker's answer to ``request``: the stream at ``seq``, replaying ``entries``."""
    replay = [(n, Payload.from_data(n)) for n in entries]
    return RecoveredCommand(request.subscriber, request, request.topic, epoch, seq, outcome, replay)


async def place(hub: Hub, *seqs: int, epoch: str = "E") -> None:
    """Deliver live messages numbered by the broker; each carries its seq as data."""
    for seq in seqs:
        await hub.place("t", Payload.from_data(seq), Position(epoch, seq))


async def frames(subscriber: Subscriber, count: int) -> list[Any]:
    """The next ``count`` frames as JSON."""
    return [json.loads(frame) for frame in await take(subscriber, count)]


def seqs(received: list[Any]) -> list[int]:
    """The seqs of the envelopes among ``received``."""
    return [frame["seq"] for frame in received if "seq" in frame and "op" not in frame]


async def test_a_read_ahead_of_the_live_messages_skips_what_it_replayed() -> None:
    """The broker's read saw 3..5 before the hub got them live: each is sent once."""
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t", since=Position("E", 2))
        await settle()
        [request] = sequencer.requests
        await hub.recovered(answer(request, 5, [3, 4, 5]))
        await place(hub, 3, 4, 5, 6)
        received = await frames(subscriber, 5)
    assert received[0] == {
        "op": "subscribed",
        "topic": "t",
        "epoch": "E",
        "seq": 5,
        "recovered": True,
    }
    assert seqs(received) == [3, 4, 5, 6]
    assert hub.statistics().recoveries == {"recovered": 1}


async def test_live_messages_ahead_of_the_read_are_buffered_then_sent() -> None:
    """Live messages that arrive while the read is under way follow the replay, past it
    (raw mode: the frames are the messages, here each one's seq)."""
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber(Mode.RAW)
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t", last=1)
        await settle()
        [request] = sequencer.requests
        await place(hub, 3, 4)
        await hub.recovered(answer(request, 3, [3]))
        await place(hub, 5)
        assert await frames(subscriber, 3) == [3, 4, 5]


async def test_an_answer_to_an_earlier_subscribe_is_ignored() -> None:
    """A subscriber that subscribed again waits for the answer to its latest subscribe."""
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t")
        await hub.subscribe(subscriber, "t", last=1)
        await settle()
        first, second = sequencer.requests
        await hub.recovered(answer(first, 1, [], outcome=None))
        await hub.recovered(answer(second, 1, [1]))
        received = await frames(subscriber, 2)
    assert received[0]["recovered"] is True
    assert seqs(received) == [1]


async def test_publishes_go_to_the_broker_and_are_refused_while_it_is_down() -> None:
    """A local publish is not delivered locally but submitted; with the broker down it raises."""
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t")
        await settle()
        await hub.recovered(answer(sequencer.requests[0], 0, [], outcome=None))
        await hub.publish("t", Payload("x"))
        await settle()
        assert sequencer.submitted == [("t", Payload("x"), 1)]
        assert subscriber.outbox.statistics().queued_messages == 0  # "subscribed" is control
        sequencer.up = False
        with pytest.raises(BackplaneDown):
            hub.publish_nowait("t", Payload("y"), Source.HTTP)
        with pytest.raises(BackplaneDown):
            await hub.publish("t", Payload("y"))
    assert len(sequencer.submitted) == 1


async def test_a_subscribe_the_broker_cannot_queue_is_refused() -> None:
    """A full queue of pending subscribes answers backplane_busy and subscribes nothing."""
    sequencer = FakeSequencer()
    sequencer.room = False
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t")
        [error] = await frames(subscriber, 1)
        assert error["error"] == "backplane_busy"
        assert hub.statistics().topics == {}
        assert subscriber.topics == set()


async def test_a_new_epoch_is_announced_to_subscribers_of_the_old_one() -> None:
    """When the broker lost the stream, live subscribers get a subscribed frame first."""
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t")
        await settle()
        await hub.recovered(answer(sequencer.requests[0], 7, [], outcome=None))
        await place(hub, 8)
        await place(hub, 1, epoch="F")
        received = await frames(subscriber, 4)
    assert received[2] == {
        "op": "subscribed",
        "topic": "t",
        "epoch": "F",
        "seq": 0,
        "recovered": False,
    }
    assert seqs(received) == [8, 1]


async def test_an_unsubscribe_while_pending_leaves_nothing_behind() -> None:
    """A subscriber that leaves before the broker answers is forgotten, answer and all."""
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t")
        await hub.unsubscribe(subscriber, "t")
        await settle()
        await hub.recovered(answer(sequencer.requests[0], 0, [], outcome=None))
        await settle()
        assert hub.statistics().topics == {}
        [unsubscribed] = await frames(subscriber, 1)
        assert unsubscribed["op"] == "unsubscribed"


def test_a_read_starts_after_since_or_at_the_latest_k() -> None:
    """Reads start after ``since`` (capped), or at ``-K`` within the limit."""
    assert read_start(Position("E", 4), None, 10) == 5
    assert read_start(Position("E", 2**63 - 1), None, 10) == 10**13
    assert read_start(None, 3, 10) == -3
    assert read_start(None, 50, 10) == -10
    assert read_start(None, None, 10) == 0


def test_judge_follows_the_memory_histories_rules() -> None:
    """A read is recovered only with the same epoch and every missed entry."""
    full = Slice("E", 5, [(3, b"c"), (4, b"d"), (5, b"e")])
    assert judge(Position("E", 2), None, full, 10) == (Outcome.RECOVERED, full.entries)
    assert judge(Position("F", 2), None, full, 10) == (Outcome.NEW_EPOCH, ())
    assert judge(Position("E", 9), None, full, 10) == (Outcome.INVALID, ())
    assert judge(Position("E", 2), None, full, 2) == (Outcome.OVER_LIMIT, ())
    assert judge(Position("E", 1), None, full, 10) == (Outcome.NOT_RETAINED, ())
    assert judge(Position("E", 5), None, Slice("E", 5, []), 10) == (Outcome.RECOVERED, [])
    assert judge(None, 3, full, 10) == (Outcome.RECOVERED, full.entries)
    assert judge(None, 4, full, 10)[0] is Outcome.NOT_RETAINED
    assert judge(None, 4, full, 3)[0] is Outcome.OVER_LIMIT
    assert judge(None, None, full, 10) == (None, ())
    assert judge(Position("E", 2), None, full.retained(2), 10)[0] is Outcome.NOT_RETAINED
    assert judge(Position("E", 3), None, full.retained(2), 10)[0] is Outcome.RECOVERED
    assert full.retained(3) is full
    assert judge_page(None, full) == (None, full.entries)
    assert judge_page(Position("E", 2), full) == (True, full.entries)
    assert judge_page(Position("E", 1), full) == (False, ())
    assert judge_page(Position("F", 2), full) == (False, ())
    assert judge_page(Position("E", 5), full) == (True, full.entries)


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


async def test_a_read_that_keeps_failing_is_answered_with_the_error() -> None:
    """Each failed read costs the link; after READ_TRIES the subscribe gets the error."""
    broker = UnreadableBroker()
    answers: list[RecoveredCommand] = []

    async def answer_(command: RecoveredCommand) -> None:
        answers.append(command)

    async def deliver(topic: str, payload: Payload) -> None:
        raise AssertionError("nothing is delivered unnumbered")

    options: dict[str, Any] = {"backplane_reconnect_min": 0.001, "backplane_reconnect_max": 0.002}
    bridge = Bridge(
        broker,
        HERE,
        Settings(**options),
        get_logger("test"),
        jitter=lambda: 0.0,
        sequenced=True,
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: bridge.run(deliver, answer=answer_, task_status=task_status)
            )
            await wait_until(lambda: bridge.statistics().up)
            bridge.topic_opened("t")
            request = PendingSubscribe(make_subscriber(), "t", Position("E", 1), None)
            assert bridge.recover(request)
            await wait_until(lambda: bool(answers))
            tg.cancel_scope.cancel()
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


async def test_a_pending_subscribe_whose_buffer_overflows_is_not_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past PENDING_MAX live messages while the broker answers, the resume says
    recovered: false, replays nothing and goes on with the live messages."""
    monkeypatch.setattr("broadcaster.shared_topics.PENDING_MAX", 2)
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = make_subscriber()
        hub.join(subscriber)
        await hub.subscribe(subscriber, "t", since=Position("E", 1))
        await settle()
        [request] = sequencer.requests
        await place(hub, 2, 3, 4)
        await hub.recovered(answer(request, 2, [2]))
        await place(hub, 5)
        received = await frames(subscriber, 2)
    assert received[0]["recovered"] is False
    assert seqs(received) == [5]
    assert hub.statistics().recoveries == {"over_limit": 1}


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
            tg.cancel_scope.cancel()
    assert broker.reads == [({"t"}, True)]
    assert len(broker.links) == 1
