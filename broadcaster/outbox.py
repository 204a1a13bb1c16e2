"""One connection's bounded queue of frames, bounded by messages and by bytes.

The hub offers frames with :meth:`Outbox.offer`, which never blocks: when a frame does
not fit, the overflow policy decides on the spot (see :mod:`broadcaster.policy`). The
connection's sender is the only consumer: its own task through :meth:`Outbox.receive_batch`,
or the shared :class:`broadcaster.writer.Writer` through :meth:`Outbox.take_batch`, which the
outbox calls back through ``on_ready`` whenever it stops being empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from broadcaster.errors import Closing, LagCause, SlowConsumer
from broadcaster.policy import Action, Overflow, decide

if TYPE_CHECKING:
    from collections.abc import Callable

    from structlog.typing import FilteringBoundLogger

    from broadcaster.protocol import Frame


@dataclass(frozen=True, slots=True)
class OutboxStatistics:
    """A snapshot of an outbox."""

    queued_messages: int
    queued_bytes: int
    queued_control: int
    max_messages: int
    max_bytes: int
    dropped: int
    sent: int
    oldest_born: float | None
    closed: bool


class Outbox:
    """A bounded, policy-driven queue of frames for one connection.

    Args:
        max_messages: data frames held at most.
        max_bytes: bytes of data frames held at most.
        overflow: what to do with a frame that does not fit.
        lag_timeout: seconds the outbox may keep overflowing before it fails with
            :class:`SlowConsumer`, whatever the policy.
        logger: bound to the connection; told once per overflow episode, never per frame.
        on_fail: called once, synchronously, when the outbox fails; the connection uses it
            to cancel its tasks, since its sender may be blocked in a socket write.
        on_ready: called with the outbox, synchronously, each time a frame lands in it while
            it is empty; the shared writer's way of learning that there is something to write.
        clock: monotonic seconds; tests inject their own.
    """

    # Thousands of idle connections each hold one: no per-instance dict.
    __slots__ = (
        "_bytes",
        "_clock",
        "_closed",
        "_dropped",
        "_episode_drops",
        "_error",
        "_lag_timeout",
        "_log",
        "_messages",
        "_on_fail",
        "_on_ready",
        "_overflow",
        "_overflowing_since",
        "_queue",
        "_sent",
        "_waiter",
        "max_bytes",
        "max_messages",
    )

    def __init__(
        self,
        *,
        max_messages: int,
        max_bytes: int,
        overflow: Overflow,
        lag_timeout: float,
        logger: FilteringBoundLogger,
        on_fail: Callable[[Closing], None] = lambda error: None,
        on_ready: Callable[[Outbox], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._overflow = overflow
        self._lag_timeout = lag_timeout
        self._log = logger
        self._on_fail = on_fail
        self._on_ready = on_ready
        self._clock = clock
        # Control frames are queued in order with the rest but count against neither bound.
        # A list rather than a deque: an empty deque costs 760 bytes, and most of thousands of
        # idle outboxes are empty; a batch that takes everything swaps the list out whole.
        self._queue: list[Frame] = []
        self._messages = 0
        self._bytes = 0
        self._dropped = 0
        self._sent = 0
        self._episode_drops = 0
        self._overflowing_since: float | None = None
        self._waiter: anyio.Event | None = None
        self._error: Closing | None = None
        self._closed = False

    def offer(self, frame: Frame) -> None:
        """Offer a frame; the policy decides if it does not fit. Never blocks or raises.

        Control frames (``subscribed``, ``pong``, ``error``) are queued in order but outside
        both bounds, and the policy never drops them; the reader bounds them instead, by
        waiting in :meth:`wait_control_room` before each command it passes on.

        Args:
            frame: what the sender will write, encoded once for every subscriber.
        """
        if self._closed:
            return
        if frame.control:
            self._push(frame)
            return
        size = frame.size
        while True:
            room = self._messages < self.max_messages and self._bytes + size <= self.max_bytes
            if room:
                break
            now = self._clock()
            since = self._overflowing_since
            action = decide(
                self._overflow,
                queue_empty=self._messages == 0,
                size=size,
                max_bytes=self.max_bytes,
                overflowing_for=None if since is None else now - since,
                lag_timeout=self._lag_timeout,
            )
            if action is Action.DROP_OVERSIZED:
                self._dropped += 1
                return
            if since is None:
                self._overflowing_since = now
                self._log.warning("outbox_overflow", policy=self._overflow.value)
            if action is Action.EVICT_OLDEST:
                self._evict_oldest()
                continue
            if action is Action.DROP_NEW:
                self._dropped += 1
                self._episode_drops += 1
                return
            cause = LagCause.LAG if action is Action.DISCONNECT_LAG else LagCause.QUEUE_FULL
            self.fail(SlowConsumer(cause))
            return
        self._messages += 1
        self._bytes += size
        self._push(frame)

    async def wait_control_room(self, limit: int) -> None:
        """Wait until fewer than ``limit`` control frames are queued."""
        while not self._closed and len(self._queue) - self._messages >= limit:
            await self._wait()

    async def wait_empty(self) -> None:
        """Wait until every queued frame has been taken, or the outbox is closed."""
        while self._queue and not self._closed:
            await self._wait()

    async def receive_batch(self, max_bytes: int) -> list[Frame]:
        """Take the oldest frames, up to ``max_bytes`` of them but at least one, waiting for one.

        Raises:
            Closing: the outbox failed (a slow consumer, the hub stopping).
            anyio.EndOfStream: the outbox was closed.
        """
        while not self._queue:
            if self._closed:
                raise self._error or anyio.EndOfStream
            await self._wait()
        return self.take_batch(max_bytes)

    def take_batch(self, max_bytes: int) -> list[Frame]:
        """Take the oldest frames, up to ``max_bytes`` of them but at least one if any are queued.

        Returns an empty list when nothing is queued; never waits.
        """
        queue = self._queue
        count = taken = 0
        for frame in queue:
            size = frame.size
            if count and taken + size > max_bytes:
                break
            count += 1
            taken += size
            if not frame.control:
                self._messages -= 1
                self._bytes -= size
                self._sent += 1
        if count == len(queue):
            batch, self._queue = queue, []
        else:
            batch = queue[:count]
            del queue[:count]
        if self._messages == 0 and self._overflowing_since is not None:
            self._log.info("outbox_recovered", dropped=self._episode_drops)
            self._overflowing_since = None
            self._episode_drops = 0
        if self._waiter is not None:
            self._wake()
        return batch

    def fail(self, error: Closing) -> None:
        """Close the outbox because of ``error``, release its frames and tell the connection."""
        if self._closed:
            return
        self._error = error
        self.close()
        self._on_fail(error)

    def close(self) -> None:
        """Close the outbox and release every queued frame."""
        self._closed = True
        self._queue.clear()
        self._messages = 0
        self._bytes = 0
        self._wake()

    def __len__(self) -> int:
        """Frames queued, control frames included."""
        return len(self._queue)

    @property
    def error(self) -> Closing | None:
        """Why the outbox failed, if it did."""
        return self._error

    def statistics(self) -> OutboxStatistics:
        """Return what the outbox holds and has dropped."""
        return OutboxStatistics(
            queued_messages=self._messages,
            queued_bytes=self._bytes,
            queued_control=len(self._queue) - self._messages,
            max_messages=self.max_messages,
            max_bytes=self.max_bytes,
            dropped=self._dropped,
            sent=self._sent,
            oldest_born=self._queue[0].born if self._queue else None,
            closed=self._closed,
        )

    def _evict_oldest(self) -> None:
        for index, frame in enumerate(self._queue):
            if not frame.control:
                del self._queue[index]
                self._messages -= 1
                self._bytes -= frame.size
                self._dropped += 1
                self._episode_drops += 1
                return

    def _push(self, frame: Frame) -> None:
        self._queue.append(frame)
        if self._on_ready is not None and len(self._queue) == 1:
            self._on_ready(self)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    async def _wait(self) -> None:
        if self._waiter is None:
            self._waiter = anyio.Event()
        await self._waiter.wait()
