"""One task that writes every fastlane connection's queued frames to its socket.

A sender task per connection would cost each of thousands of idle connections a task, its
coroutine frames and a wake-up event. Through the fastlane a write never waits: a lane either
takes the bytes at once or says that its transport is paused. So one :class:`Writer` serves
every such connection. An outbox that stops being empty schedules itself; the writer takes a
batch from each scheduled outbox and writes it with one transport write. An outbox whose lane
is paused is parked until the transport drains, and fails with a
:class:`~broadcaster.errors.SlowConsumer` (``send_timeout``) if it does not drain in time, so a
stalled peer backs up into its own bounded outbox and nowhere else.

Connections on other servers, which offer no lane, keep a sender task of their own (see
:class:`broadcaster.connection.Connection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.lowlevel

from broadcaster.errors import LagCause, SlowConsumer

if TYPE_CHECKING:
    from collections.abc import Callable

    from broadcaster.errors import Closing
    from broadcaster.outbox import Outbox

# The ASGI scope extension under which broadcaster's WebSocket protocol offers itself as the
# connection's Lane.
FASTLANE = "broadcaster.fastlane"
# Bytes taken from one outbox for one write; bounds what a write holds outside the outbox,
# and lets the writer go round every scheduled outbox before it comes back to a busy one.
BATCH_BYTES = 256 * 1024
# Outboxes written between two checkpoints, so that a fan-out to many sockets does not keep
# readers and the hub waiting for the whole round.
WRITES_PER_CHECKPOINT = 256


class Lane(Protocol):
    """A socket's write path that never waits; the server's fastlane is one."""

    #: Why the server side of the socket closed it on its own (a flood, a ping that went
    #: unanswered, shutdown), once it has; the connection counts it.
    closing: Closing | None

    def writable(self) -> bool:
        """Whether the transport takes more at once."""

    def write(self, wire: bytes) -> None:
        """Write whole, pre-encoded frames.

        Raises:
            anyio.BrokenResourceError: the connection is closing or gone.
        """

    def close(self, code: int, reason: str) -> None:
        """Close the connection soon, with a close frame behind whatever is buffered; never
        waits. The connection's reader then sees the client gone."""

    def when_writable(
        self, callback: Callable[[], None], timeout: float, on_timeout: Callable[[], None]
    ) -> None:
        """Call ``callback`` once the transport takes more, or ``on_timeout`` if it does not
        within ``timeout`` seconds."""


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """A snapshot of the writer."""

    scheduled: int
    written: int


class Writer:
    """Writes scheduled outboxes to their lanes, a batch per outbox per round.

    Args:
        send_timeout: seconds a lane may stay paused with frames waiting before its outbox
            fails with ``SlowConsumer(send_timeout)``.
    """

    def __init__(self, send_timeout: float) -> None:
        self._send_timeout = send_timeout
        # Insertion-ordered and free of duplicates: each round writes outboxes in the order
        # in which they became ready.
        self._ready: dict[Outbox, Lane] = {}
        self._wakeup: anyio.Event | None = None
        self._written = 0

    def schedule(self, lane: Lane, outbox: Outbox) -> None:
        """Have ``outbox`` written to ``lane`` in the next round. Never blocks."""
        self._ready[outbox] = lane
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write until cancelled; the app's lifespan owns this task."""
        task_status.started()
        while True:
            if not self._ready:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
            ready, self._ready = self._ready, {}
            for count, (outbox, lane) in enumerate(ready.items(), 1):
                self._write(outbox, lane)
                if count % WRITES_PER_CHECKPOINT == 0:
                    await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()

    def statistics(self) -> WriterStatistics:
        """Return how many outboxes wait for a round and how many batches were written."""
        return WriterStatistics(scheduled=len(self._ready), written=self._written)

    def _write(self, outbox: Outbox, lane: Lane) -> None:
        if not lane.writable():
            lane.when_writable(
                lambda: self.schedule(lane, outbox),
                self._send_timeout,
                lambda: outbox.fail(SlowConsumer(LagCause.SEND_TIMEOUT)),
            )
            return
        frames = outbox.take_batch(BATCH_BYTES)
        if not frames:
            return  # closed, or emptied since it was scheduled
        try:
            lane.write(b"".join([frame.wire for frame in frames]))
        except anyio.BrokenResourceError:
            # The connection is going; its reader sees that and ends it.
            outbox.close()
            return
        self._written += 1
        if len(outbox):
            self._ready[outbox] = lane  # more than one batch queued: again next round
