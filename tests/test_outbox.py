"""Tests for broadcaster.outbox.Outbox with an injected clock and captured structlog events."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from broadcaster.errors import CloseCode, Closing, LagCause, ShuttingDown, SlowConsumer
from broadcaster.outbox import Outbox
from broadcaster.policy import Overflow
from broadcaster.protocol import Frame

if TYPE_CHECKING:
    from collections.abc import MutableMapping

GUARD = 5.0  # seconds; only a guard against hangs, never a way to wait
# Header bytes of a frame whose payload is under 126 bytes, as every frame here but one is.
H = 2
# A batch limit no test reaches: receive_batch takes everything queued.
EVERYTHING = 1 << 30


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests of this module on asyncio."""
    return "asyncio"


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds


class Failures:
    """Records every call of an outbox's ``on_fail``."""

    def __init__(self) -> None:
        self.errors: list[Closing] = []

    def __call__(self, error: Closing) -> None:
        self.errors.append(error)


def make_outbox(
    *,
    max_messages: int = 3,
    max_bytes: int = 1000,
    overflow: Overflow = Overflow.DROP_OLDEST,
    lag_timeout: float = 10.0,
    clock: FakeClock | None = None,
    on_fail: Failures | None = None,
) -> Outbox:
    """Build an outbox with a structlog logger, a fake clock and a failure recorder."""
    return Outbox(
        max_messages=max_messages,
        max_bytes=max_bytes,
        overflow=overflow,
        lag_timeout=lag_timeout,
        logger=structlog.get_logger(),
        on_fail=on_fail or Failures(),
        clock=clock or FakeClock(),
    )


Message = str | bytes


def send(outbox: Outbox, *messages: Message) -> None:
    """Offer data frames of ``messages``, each sized by its encoded frame."""
    for message in messages:
        outbox.offer(Frame.of(message))


def control(outbox: Outbox, message: str) -> None:
    """Queue a control frame of ``message``."""
    outbox.offer(Frame.of(message, control=True))


def contents(frames: list[Frame]) -> list[Message]:
    """Return the messages of ``frames``."""
    return [frame.data for frame in frames]


async def drain(outbox: Outbox) -> list[Message]:
    """Receive every frame queued right now; return their messages."""
    frames: list[Frame] = []
    with anyio.fail_after(GUARD):
        while outbox.statistics().queued_messages or outbox.statistics().queued_control:
            frames += await outbox.receive_batch(EVERYTHING)
    return contents(frames)


async def receive_one(outbox: Outbox) -> Message:
    """Receive the oldest frame alone: a batch limit below any frame's size takes exactly one."""
    with anyio.fail_after(GUARD):
        batch = await outbox.receive_batch(1)
    assert len(batch) == 1
    return batch[0].data


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """Return the captured log entries of event ``name``."""
    return [entry for entry in logs if entry["event"] == name]


async def test_frames_come_out_in_fifo_order() -> None:
    """Frames are received in the order they were offered, text and bytes alike."""
    outbox = make_outbox(max_messages=10)
    frames = [Frame.of("a"), Frame.of(b"b"), Frame.of("c")]
    for frame in frames:
        outbox.offer(frame)
    with anyio.fail_after(GUARD):
        received = await outbox.receive_batch(EVERYTHING)
    assert contents(received) == ["a", b"b", "c"]
    # The frames come out as they went in, encoded once for every outbox they are offered to.
    assert all(out is sent for out, sent in zip(received, frames, strict=True))
    assert outbox.statistics().dropped == 0


async def test_receive_batch_waits_for_a_frame() -> None:
    """receive_batch on an empty outbox waits until a frame is offered."""
    outbox = make_outbox()
    received: list[Message] = []

    async def receive() -> None:
        received.extend(contents(await outbox.receive_batch(EVERYTHING)))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            assert received == []
            send(outbox, "late")
    assert received == ["late"]


async def test_drop_oldest_evicts_the_oldest_message_when_out_of_messages() -> None:
    """Past max_messages, drop_oldest evicts the oldest data frames and counts them."""
    outbox = make_outbox(max_messages=3, overflow=Overflow.DROP_OLDEST)
    send(outbox, "1", "2", "3", "4", "5")
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.dropped) == (3, 3 * (1 + H), 2)
    assert await drain(outbox) == ["3", "4", "5"]
    assert outbox.error is None


async def test_drop_oldest_evicts_as_many_as_needed_when_out_of_bytes() -> None:
    """Past max_bytes, drop_oldest evicts the oldest frames until the new one fits."""
    # Two 4-byte frames fill the bound; a 9-byte one fits alone only.
    outbox = make_outbox(max_messages=10, max_bytes=2 * (4 + H), overflow=Overflow.DROP_OLDEST)
    send(outbox, "aaaa", "bbbb")
    send(outbox, "cccc")
    assert outbox.statistics().dropped == 1
    send(outbox, "d" * 9)
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.dropped) == (1, 9 + H, 3)
    assert await drain(outbox) == ["d" * 9]


async def test_drop_newest_drops_the_new_message_when_out_of_messages() -> None:
    """Past max_messages, drop_newest keeps the queued frames and drops the new ones."""
    outbox = make_outbox(max_messages=2, overflow=Overflow.DROP_NEWEST)
    send(outbox, "1", "2", "3", "4")
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.dropped) == (2, 2 * (1 + H), 2)
    assert await drain(outbox) == ["1", "2"]
    assert outbox.error is None


async def test_drop_newest_drops_the_new_message_when_out_of_bytes() -> None:
    """Past max_bytes, drop_newest drops the frame that does not fit but takes one that does."""
    # Room for 10 bytes of messages in three frames: "cccc" does not fit after two, "dd" does.
    outbox = make_outbox(max_messages=10, max_bytes=10 + 3 * H, overflow=Overflow.DROP_NEWEST)
    send(outbox, "aaaa", "bbbb", "cccc", "dd")
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.dropped) == (3, 10 + 3 * H, 1)
    assert await drain(outbox) == ["aaaa", "bbbb", "dd"]


@pytest.mark.parametrize(
    ("max_messages", "max_bytes", "frames"),
    [(2, 1000, ["a", "b", "c"]), (10, 2 * (4 + H), ["aaaa", "bbbb", "cccc"])],
    ids=["by_messages", "by_bytes"],
)
async def test_disconnect_fails_the_outbox_when_full(
    max_messages: int, max_bytes: int, frames: list[str]
) -> None:
    """Under disconnect, a frame that does not fit fails the outbox with a 1013 slow consumer."""
    failures = Failures()
    outbox = make_outbox(
        max_messages=max_messages,
        max_bytes=max_bytes,
        overflow=Overflow.DISCONNECT,
        on_fail=failures,
    )
    send(outbox, *frames)
    send(outbox, "after")  # a closed outbox ignores further frames and does not fail again
    error = outbox.error
    assert isinstance(error, SlowConsumer)
    assert error.cause is LagCause.QUEUE_FULL
    assert error.code is CloseCode.TRY_AGAIN_LATER
    assert int(error.code) == 1013
    assert error.reason == "slow consumer"
    assert failures.errors == [error]
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.queued_control) == (0, 0, 0)
    assert stats.closed
    with pytest.raises(SlowConsumer) as raised:
        await outbox.receive_batch(EVERYTHING)
    assert raised.value is error


async def test_lag_timeout_fails_an_outbox_that_keeps_overflowing() -> None:
    """An outbox overflowing under drop_oldest for lag_timeout fails with a lag slow consumer."""
    clock = FakeClock()
    failures = Failures()
    with capture_logs() as logs:
        outbox = make_outbox(
            max_messages=2,
            overflow=Overflow.DROP_OLDEST,
            lag_timeout=10.0,
            clock=clock,
            on_fail=failures,
        )
        send(outbox, "1", "2", "3")
        clock.advance(9.5)
        send(outbox, "4")
        assert outbox.error is None
        assert outbox.statistics().dropped == 2
        clock.advance(0.5)
        send(outbox, "5")
    error = outbox.error
    assert isinstance(error, SlowConsumer)
    assert error.cause is LagCause.LAG
    assert (error.code, error.reason) == (CloseCode.TRY_AGAIN_LATER, "slow consumer")
    assert failures.errors == [error]
    assert outbox.statistics().queued_messages == 0
    assert len(events(logs, "outbox_overflow")) == 1


async def test_a_partial_catch_up_does_not_end_the_episode() -> None:
    """Receiving some but not all frames keeps the overflow episode, so lag still applies."""
    clock = FakeClock()
    outbox = make_outbox(max_messages=2, lag_timeout=10.0, clock=clock)
    send(outbox, "1", "2", "3")
    assert await receive_one(outbox) == "2"
    clock.advance(10.0)
    send(outbox, "4", "5")
    assert isinstance(outbox.error, SlowConsumer)
    assert outbox.error.cause is LagCause.LAG


async def test_an_episode_is_logged_once_and_ends_when_the_sender_catches_up() -> None:
    """One overflow episode logs outbox_overflow once and outbox_recovered once with its drops."""
    clock = FakeClock()
    with capture_logs() as logs:
        outbox = make_outbox(max_messages=2, lag_timeout=10.0, clock=clock)
        send(outbox, "1", "2", "3", "4", "5", "6")
        assert await drain(outbox) == ["5", "6"]
        clock.advance(100.0)
        # A new episode starts now, so the long wait since the first one is not lag.
        send(outbox, "7", "8", "9")
        assert outbox.error is None
        assert await drain(outbox) == ["8", "9"]
    overflows = events(logs, "outbox_overflow")
    recoveries = events(logs, "outbox_recovered")
    assert [entry["policy"] for entry in overflows] == ["drop_oldest", "drop_oldest"]
    assert [entry["dropped"] for entry in recoveries] == [4, 1]
    assert [entry["log_level"] for entry in overflows + recoveries] == [
        "warning",
        "warning",
        "info",
        "info",
    ]
    assert outbox.statistics().dropped == 5


async def test_drop_newest_episode_is_logged_once() -> None:
    """Under drop_newest, many drops in one episode give one overflow and one recovery event."""
    with capture_logs() as logs:
        outbox = make_outbox(max_messages=1, overflow=Overflow.DROP_NEWEST)
        send(outbox, *[str(n) for n in range(10)])
        assert await drain(outbox) == ["0"]
    assert len(events(logs, "outbox_overflow")) == 1
    assert [entry["dropped"] for entry in events(logs, "outbox_recovered")] == [9]


async def test_no_episode_is_logged_while_frames_fit() -> None:
    """An outbox that never overflows logs neither outbox_overflow nor outbox_recovered."""
    with capture_logs() as logs:
        outbox = make_outbox(max_messages=2)
        for n in range(5):
            send(outbox, str(n))
            assert await drain(outbox) == [str(n)]
    assert events(logs, "outbox_overflow") == []
    assert events(logs, "outbox_recovered") == []


@pytest.mark.parametrize("policy", list(Overflow))
async def test_a_frame_bigger_than_max_bytes_is_dropped_under_every_policy(
    policy: Overflow,
) -> None:
    """A frame bigger than max_bytes is dropped whatever the policy and the queue is kept."""
    outbox = make_outbox(max_messages=10, max_bytes=10 + H, overflow=policy)
    send(outbox, "keep")
    send(outbox, "x" * 11)
    stats = outbox.statistics()
    assert outbox.error is None
    assert (stats.queued_messages, stats.queued_bytes, stats.dropped) == (1, 4 + H, 1)
    assert await drain(outbox) == ["keep"]


@pytest.mark.parametrize("policy", list(Overflow))
async def test_oversized_frames_on_an_idle_outbox_are_not_taken_for_lag(policy: Overflow) -> None:
    """Oversized frames dropped from an empty, caught-up outbox never make it fail for lag."""
    clock = FakeClock()
    with capture_logs() as logs:
        outbox = make_outbox(max_messages=10, max_bytes=10 + H, overflow=policy, clock=clock)
        send(outbox, "x" * 11)
        clock.advance(60.0)
        send(outbox, "x" * 11)
    assert outbox.error is None
    assert outbox.statistics().dropped == 2
    assert events(logs, "outbox_overflow") == []


@pytest.mark.parametrize("policy", list(Overflow))
async def test_control_frames_are_never_dropped(policy: Overflow) -> None:
    """Control frames are queued outside both bounds, even when the data frames fill them."""
    outbox = make_outbox(max_messages=1, max_bytes=10 + H, overflow=policy)
    send(outbox, "data")
    for n in range(5):
        control(outbox, f'{{"op":"pong","n":{n}}}')
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.queued_control) == (1, 4 + H, 5)
    assert outbox.error is None
    frames = await drain(outbox)
    assert frames[0] == "data"
    assert frames[1:] == [f'{{"op":"pong","n":{n}}}' for n in range(5)]


async def test_control_frames_keep_their_order_under_drop_oldest() -> None:
    """Evicting data frames under drop_oldest never reorders or removes control frames."""
    outbox = make_outbox(max_messages=2, overflow=Overflow.DROP_OLDEST)
    send(outbox, "d1")
    control(outbox, "c1")
    send(outbox, "d2", "d3")  # d3 evicts d1, the oldest data frame, not c1
    control(outbox, "c2")
    send(outbox, "d4")  # evicts d2
    assert await drain(outbox) == ["c1", "d3", "c2", "d4"]
    assert outbox.statistics().dropped == 2


async def test_control_frames_keep_their_order_under_drop_newest() -> None:
    """Dropping new data frames under drop_newest leaves control frames where they were."""
    outbox = make_outbox(max_messages=2, overflow=Overflow.DROP_NEWEST)
    send(outbox, "d1")
    control(outbox, "c1")
    send(outbox, "d2", "d3")
    control(outbox, "c2")
    assert await drain(outbox) == ["d1", "c1", "d2", "c2"]


async def test_control_frames_do_not_count_against_the_byte_bound() -> None:
    """A queued control frame bigger than max_bytes leaves the whole byte bound to data frames."""
    outbox = make_outbox(max_messages=10, max_bytes=10 + H, overflow=Overflow.DROP_OLDEST)
    control(outbox, "control frame longer than max_bytes")
    send(outbox, "x" * 10)
    assert outbox.statistics().queued_messages == 1
    assert await drain(outbox) == ["control frame longer than max_bytes", "x" * 10]


async def test_wait_control_room_returns_at_once_below_the_limit() -> None:
    """wait_control_room returns without waiting when fewer than limit control frames are queued."""
    outbox = make_outbox()
    control(outbox, "c1")
    send(outbox, "data", "data", "data")  # data frames do not count against the limit
    with anyio.fail_after(GUARD):
        await outbox.wait_control_room(2)


async def test_wait_control_room_blocks_until_control_frames_are_consumed() -> None:
    """wait_control_room waits while limit control frames are queued and wakes when one is taken."""
    outbox = make_outbox()
    control(outbox, "c1")
    control(outbox, "c2")
    woken = anyio.Event()

    async def wait_for_room() -> None:
        await outbox.wait_control_room(2)
        woken.set()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_room)
            await anyio.wait_all_tasks_blocked()
            assert not woken.is_set()
            send(outbox, "data")  # a data frame makes no room for control frames
            await anyio.wait_all_tasks_blocked()
            assert not woken.is_set()
            assert await receive_one(outbox) == "c1"
            await woken.wait()
    assert outbox.statistics().queued_control == 1


async def test_wait_control_room_returns_when_the_outbox_closes() -> None:
    """A reader waiting for control room is released when the outbox is closed."""
    outbox = make_outbox()
    control(outbox, "c1")
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(outbox.wait_control_room, 1)
            await anyio.wait_all_tasks_blocked()
            outbox.close()


async def test_receive_batch_raises_the_failure_after_fail() -> None:
    """After fail(), receive_batch raises that error, even for a receiver already waiting."""
    failures = Failures()
    outbox = make_outbox(on_fail=failures)
    error = ShuttingDown()
    raised: list[Closing] = []

    async def receive() -> None:
        try:
            await outbox.receive_batch(EVERYTHING)
        except Closing as closing:
            raised.append(closing)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            outbox.fail(error)
    assert raised == [error]
    with pytest.raises(ShuttingDown) as again:
        await outbox.receive_batch(EVERYTHING)
    assert again.value is error
    assert (again.value.code, again.value.reason) == (CloseCode.GOING_AWAY, "server shutting down")


async def test_fail_releases_queued_frames_and_calls_on_fail_once() -> None:
    """fail() drops every queued frame, keeps the first error and calls on_fail only once."""
    failures = Failures()
    outbox = make_outbox(on_fail=failures)
    send(outbox, "a", "b")
    control(outbox, "c")
    first = SlowConsumer(LagCause.SEND_TIMEOUT)
    outbox.fail(first)
    outbox.fail(ShuttingDown())
    assert outbox.error is first
    assert failures.errors == [first]
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.queued_control) == (0, 0, 0)
    assert stats.closed
    with pytest.raises(SlowConsumer):
        await outbox.receive_batch(EVERYTHING)


async def test_receive_batch_raises_end_of_stream_after_close() -> None:
    """After close(), queued frames are released and receive_batch raises anyio.EndOfStream."""
    failures = Failures()
    outbox = make_outbox(on_fail=failures)
    send(outbox, "a")
    outbox.close()
    send(outbox, "b")
    control(outbox, "c")
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.queued_control) == (0, 0, 0)
    assert outbox.error is None
    assert failures.errors == []
    with pytest.raises(anyio.EndOfStream):
        await outbox.receive_batch(EVERYTHING)


async def test_close_wakes_a_waiting_receiver() -> None:
    """A receiver waiting on an empty outbox gets anyio.EndOfStream when it is closed."""
    outbox = make_outbox()
    ended = anyio.Event()

    async def receive() -> None:
        with pytest.raises(anyio.EndOfStream):
            await outbox.receive_batch(EVERYTHING)
        ended.set()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            outbox.close()
    assert ended.is_set()


@pytest.mark.parametrize("policy", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST])
async def test_statistics_never_exceed_the_bounds(policy: Overflow) -> None:
    """Whatever is offered and taken, queued messages and bytes stay within their bounds."""
    generator = random.Random(1234)
    outbox = make_outbox(max_messages=8, max_bytes=64, overflow=policy)
    offered = received = 0
    with anyio.fail_after(GUARD):
        for _ in range(2000):
            if generator.random() < 0.7:
                send(outbox, "x" * generator.randint(1, 70))
                offered += 1
            elif outbox.statistics().queued_messages:
                limit = generator.randint(1, 100)
                batch = await outbox.receive_batch(limit)
                assert len(batch) == 1 or sum(frame.size for frame in batch) <= limit
                received += len(batch)
            stats = outbox.statistics()
            assert 0 <= stats.queued_messages <= stats.max_messages == 8
            assert 0 <= stats.queued_bytes <= stats.max_bytes == 64
    stats = outbox.statistics()
    assert stats.dropped > 0
    assert offered == received + stats.dropped + stats.queued_messages
    assert outbox.error is None


async def test_queued_bytes_count_whole_frames() -> None:
    """The byte bound counts each frame's header too, and payloads in UTF-8 bytes."""
    outbox = make_outbox(max_messages=10, max_bytes=10_000)
    send(outbox, "\u00e9" * 63)  # 63 characters, 126 UTF-8 bytes: a 4-byte header
    assert outbox.statistics().queued_bytes == 126 + 4
    send(outbox, b"\x00" * 125)  # the longest payload with a 2-byte header
    assert outbox.statistics().queued_bytes == 126 + 4 + 125 + 2
    await drain(outbox)
    assert outbox.statistics().queued_bytes == 0


async def test_receive_batch_honours_max_bytes_but_returns_at_least_one_frame() -> None:
    """A batch is the oldest frames that fit max_bytes, or the oldest frame alone if none fits."""
    outbox = make_outbox(max_messages=10, max_bytes=1000)
    send(outbox, "aaaa", "bb", "c" * 10, "d", "e" * 20, "f")
    with anyio.fail_after(GUARD):
        # Exactly full: 4 + H and 2 + H bytes.
        assert contents(await outbox.receive_batch((4 + H) + (2 + H))) == ["aaaa", "bb"]
        # The oldest frame does not fit: it comes alone rather than never.
        assert contents(await outbox.receive_batch(1)) == ["c" * 10]
        # "d" fits but "e" * 20 does not; "f" behind it, though it would fit, waits its turn.
        assert contents(await outbox.receive_batch(2 * (1 + H))) == ["d"]
        stats = outbox.statistics()
        assert (stats.queued_messages, stats.queued_bytes) == (2, (20 + H) + (1 + H))
        assert contents(await outbox.receive_batch(0)) == ["e" * 20]
        assert contents(await outbox.receive_batch(EVERYTHING)) == ["f"]
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes) == (0, 0)


async def test_receive_batch_keeps_control_frames_in_order_with_data_frames() -> None:
    """Control frames come out of batches where they were queued, and count toward max_bytes."""
    outbox = make_outbox(max_messages=10)
    send(outbox, "d1")
    control(outbox, "c1")
    send(outbox, "d2", "d3")
    control(outbox, "c2")
    control(outbox, "c3")
    send(outbox, "d4")
    frame = 2 + H  # every frame here has a 2-byte message
    with anyio.fail_after(GUARD):
        assert contents(await outbox.receive_batch(3 * frame)) == ["d1", "c1", "d2"]
        stats = outbox.statistics()
        assert (stats.queued_messages, stats.queued_bytes, stats.queued_control) == (
            2,
            2 * frame,
            2,
        )
        assert contents(await outbox.receive_batch(3 * frame)) == ["d3", "c2", "c3"]
        assert contents(await outbox.receive_batch(EVERYTHING)) == ["d4"]
    stats = outbox.statistics()
    assert (stats.queued_messages, stats.queued_bytes, stats.queued_control) == (0, 0, 0)


async def test_a_batch_that_takes_every_data_frame_ends_the_episode() -> None:
    """An overflow episode ends once a batch empties the outbox of data frames, not before."""
    clock = FakeClock()
    with capture_logs() as logs:
        outbox = make_outbox(max_messages=3, lag_timeout=10.0, clock=clock)
        send(outbox, "1", "2", "3", "4")
        assert contents(await outbox.receive_batch(2 * (1 + H))) == ["2", "3"]
        assert events(logs, "outbox_recovered") == []
        control(outbox, "c")
        assert contents(await outbox.receive_batch(1 + H)) == ["4"]
        # Only a control frame is left: the sender has caught up with the data.
        assert [entry["dropped"] for entry in events(logs, "outbox_recovered")] == [1]
        clock.advance(60.0)
        send(outbox, "5", "6", "7", "8")
    assert outbox.error is None
