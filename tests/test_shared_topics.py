"""The hub with history shared through a broker, against a fake sequencer: every interleaving
of a resume's read with the live messages, refusals, epochs; and the pure read rules."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import structlog

from broadcaster.backplane.shared import Slice, judge, judge_page, read_start
from broadcaster.errors import BackplaneDown
from broadcaster.hub import Hub
from broadcaster.mailbox import PendingReceipt, PendingSubscribe, RecoveredCommand, Source
from broadcaster.protocol import Mode, Payload, Position
from broadcaster.stream import Outcome
from tests.test_hub import make_subscriber, running, settle, take

if TYPE_CHECKING:
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


def joined(hub: Hub) -> Subscriber:
    """A subscriber that has joined ``hub``."""
    subscriber = make_subscriber()
    hub.join(subscriber)
    return subscriber


async def subscribed(hub: Hub, sequencer: FakeSequencer, at: int) -> Subscriber:
    """A subscriber of ``t`` whose subscribe the broker answered at seq ``at``, with nothing
    to replay."""
    subscriber = joined(hub)
    await hub.subscribe(subscriber, "t")
    await settle()
    await hub.recovered(answer(sequencer.requests[0], at, [], outcome=None))
    return subscriber


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
        subscriber = joined(hub)
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
        subscriber = joined(hub)
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
        subscriber = await subscribed(hub, sequencer, at=0)
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
        subscriber = joined(hub)
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
        subscriber = await subscribed(hub, sequencer, at=7)
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
        subscriber = joined(hub)
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


async def test_a_pending_subscribe_whose_buffer_overflows_is_not_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past PENDING_MAX live messages while the broker answers, the resume says
    recovered: false, replays nothing and goes on with the live messages."""
    monkeypatch.setattr("broadcaster.shared_topics.PENDING_MAX", 2)
    sequencer = FakeSequencer()
    hub = make_hub(sequencer)
    async with running(hub):
        subscriber = joined(hub)
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
