"""The shared writer with fake lanes: batching, rounds, parking, send timeouts, broken lanes."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from broadcaster.app import Broadcaster
from broadcaster.errors import Closing, LagCause, SlowConsumer
from broadcaster.outbox import Outbox
from broadcaster.policy import Overflow
from broadcaster.protocol import Frame
from broadcaster.settings import Settings
from broadcaster.writer import BATCH_BYTES, Writer
from tests.support import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from broadcaster.errors import Closing

SEND_TIMEOUT = 7.0


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests of this module on asyncio."""
    return "asyncio"


class FakeLane:
    """A lane whose transport the test pauses, resumes and times out by hand."""

    def __init__(self, name: str, log: list[tuple[str, bytes]]) -> None:
        self.name = name
        self.paused = False
        self.broken = False
        self.parked: tuple[Callable[[], None], float, Callable[[], None]] | None = None
        self.closed_with: tuple[int, str] | None = None
        self.closing: Closing | None = None
        self._log = log

    def writable(self) -> bool:
        return not self.paused

    def write(self, wire: bytes) -> None:
        if self.broken:
            raise anyio.BrokenResourceError
        self._log.append((self.name, wire))

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def when_writable(
        self, callback: Callable[[], None], timeout: float, on_timeout: Callable[[], None]
    ) -> None:
        self.parked = (callback, timeout, on_timeout)

    def resume(self) -> None:
        """Let the transport take more, as its protocol's ``resume_writing`` would."""
        assert self.parked is not None
        callback, _, _ = self.parked
        self.parked = None
        self.paused = False
        callback()

    def time_out(self) -> None:
        """Let the parked outbox's deadline pass."""
        assert self.parked is not None
        _, _, on_timeout = self.parked
        self.parked = None
        on_timeout()


def attach(writer: Writer, lane: FakeLane, failures: list[Closing] | None = None) -> Outbox:
    """Build an outbox that schedules itself on ``writer`` for ``lane``."""
    return Outbox(
        max_messages=100,
        max_bytes=4 * BATCH_BYTES,
        overflow=Overflow.DROP_OLDEST,
        lag_timeout=60,
        logger=structlog.get_logger(),
        on_fail=(failures if failures is not None else []).append,
        on_ready=lambda outbox: writer.schedule(lane, outbox),
    )


@asynccontextmanager
async def running_writer() -> AsyncIterator[Writer]:
    """Run a writer for the block."""
    writer = Writer(SEND_TIMEOUT)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            yield writer
            tg.cancel_scope.cancel()


async def test_frames_queued_together_go_out_in_one_write_in_order() -> None:
    """Frames that queue up before the writer runs are joined into one write, oldest first."""
    log: list[tuple[str, bytes]] = []
    async with running_writer() as writer:
        outbox = attach(writer, FakeLane("a", log))
        frames = [Frame.of(text) for text in ("one", "two", "three")]
        for frame in frames:
            outbox.offer(frame)
        await wait_until(lambda: writer.statistics().written == 1)
    assert log == [("a", b"".join(frame.wire for frame in frames))]
    assert len(outbox) == 0


async def test_a_frame_in_an_emptied_outbox_schedules_it_again() -> None:
    """After the writer empties an outbox, the next frame gets written in a new round."""
    log: list[tuple[str, bytes]] = []
    async with running_writer() as writer:
        outbox = attach(writer, FakeLane("a", log))
        outbox.offer(Frame.of("first"))
        await wait_until(lambda: writer.statistics().written == 1)
        outbox.offer(Frame.of("second"))
        await wait_until(lambda: writer.statistics().written == 2)
    assert log == [("a", Frame.of("first").wire), ("a", Frame.of("second").wire)]


async def test_outboxes_with_more_than_a_batch_take_turns() -> None:
    """An outbox holding two batches gets one per round, so others are written in between."""
    log: list[tuple[str, bytes]] = []
    big = "x" * (BATCH_BYTES - 10)
    writer = Writer(SEND_TIMEOUT)
    a, b = attach(writer, FakeLane("a", log)), attach(writer, FakeLane("b", log))
    for outbox in (a, b):
        outbox.offer(Frame.of(big))
        outbox.offer(Frame.of(big))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            await wait_until(lambda: writer.statistics().written == 4)
            tg.cancel_scope.cancel()
    assert [name for name, _ in log] == ["a", "b", "a", "b"]
    assert all(wire == Frame.of(big).wire for _, wire in log)


async def test_a_paused_lane_parks_its_outbox_until_it_resumes() -> None:
    """Nothing is written while the transport is paused; everything queued goes once it resumes."""
    log: list[tuple[str, bytes]] = []
    lane = FakeLane("a", log)
    lane.paused = True
    async with running_writer() as writer:
        outbox = attach(writer, lane)
        outbox.offer(Frame.of("held"))
        await wait_until(lambda: lane.parked is not None)
        assert lane.parked is not None
        assert lane.parked[1] == SEND_TIMEOUT
        outbox.offer(Frame.of("also held"))
        assert log == []
        lane.resume()
        await wait_until(lambda: writer.statistics().written == 1)
    assert log == [("a", Frame.of("held").wire + Frame.of("also held").wire)]


async def test_a_lane_that_stays_paused_fails_its_outbox_with_send_timeout() -> None:
    """When the parked outbox's deadline passes, it fails as a slow consumer and lets go."""
    log: list[tuple[str, bytes]] = []
    failures: list[Closing] = []
    lane = FakeLane("a", log)
    lane.paused = True
    async with running_writer() as writer:
        outbox = attach(writer, lane, failures)
        outbox.offer(Frame.of("never read"))
        await wait_until(lambda: lane.parked is not None)
        lane.time_out()
    assert [(type(e), e.cause) for e in failures if isinstance(e, SlowConsumer)] == [
        (SlowConsumer, LagCause.SEND_TIMEOUT)
    ]
    assert outbox.statistics().closed
    assert len(outbox) == 0
    assert log == []


async def test_a_broken_lane_closes_its_outbox_and_spares_the_others() -> None:
    """A lane whose connection is gone drops its frames; the next outbox is still written."""
    log: list[tuple[str, bytes]] = []
    broken = FakeLane("gone", log)
    broken.broken = True
    async with running_writer() as writer:
        dead, alive = attach(writer, broken), attach(writer, FakeLane("alive", log))
        dead.offer(Frame.of("lost"))
        alive.offer(Frame.of("kept"))
        await wait_until(lambda: writer.statistics().written == 1)
    assert dead.statistics().closed
    assert log == [("alive", Frame.of("kept").wire)]


class ExplodingLane(FakeLane):
    """A lane whose write fails in a way the writer does not expect."""

    def write(self, wire: bytes) -> None:
        raise RuntimeError("transport exploded")


async def test_a_crashing_writer_is_logged_and_stops_the_server() -> None:
    """The app supervises its writer as it does its hub: a crash is logged and reported."""
    failures: list[str] = []
    live = Broadcaster(Settings(), on_hub_failure=lambda: failures.append("stop"))
    with capture_logs() as logs, pytest.RaisesGroup(RuntimeError), anyio.fail_after(10):
        async with live.lifespan():
            outbox = attach(live.writer, ExplodingLane("boom", []))
            outbox.offer(Frame.of("x"))
            await anyio.sleep_forever()
    assert failures == ["stop"]
    crashes = [e for e in logs if e["event"] == "actor_crashed"]
    assert [(e["actor"], e["log_level"]) for e in crashes] == [("writer", "error")]
