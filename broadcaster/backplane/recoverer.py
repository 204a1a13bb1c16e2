"""Reads of the history shared through the broker, for subscribes and for ``GET /history``.

Part of the bridge (:mod:`broadcaster.backplane.bridge`), which owns the link. The hub queues a
pending subscribe with :meth:`Recoverer.recover` without waiting; :meth:`Recoverer.serve`, one
task per link, waits until the topic's broker subscription is in place (so nothing published
after the read can be missed), reads the topic's stream and hands the answer to the hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from broadcaster.backplane import decode
from broadcaster.backplane.shared import judge, judge_page, read_start
from broadcaster.errors import BackplaneDown, HubStopped
from broadcaster.mailbox import PendingSubscribe, RecoveredCommand
from broadcaster.protocol import Payload, Position

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from types import TracebackType

# Reads of one subscribe that failed in a row before it is answered with an error.
READ_TRIES = 3


class Recoverer:
    """Serves pending subscribes' reads in order, and ``GET /history`` pages.

    Args:
        buffer: pending subscribes queued at most.
        recovery_max: the most entries one resume or rewind replays.
        size: ``HISTORY_SIZE``, the entries a topic's stream is held to keep.
        timeout: seconds a read may take before the link counts as lost.
        subscribed: waits until the broker subscription for a topic is in place; ``False``
            when the topic is no longer wanted.
    """

    def __init__(
        self,
        buffer: int,
        recovery_max: int,
        size: int,
        timeout: float,
        subscribed: Callable[[str], Awaitable[bool]],
    ) -> None:
        self._wants_in, self._wants = anyio.create_memory_object_stream[PendingSubscribe](buffer)
        self._recovery_max = recovery_max
        self._size = size
        self._timeout = timeout
        self._subscribed = subscribed
        # A subscribe taken by a task whose link was lost: the next link serves it first.
        self._want: PendingSubscribe | None = None
        self._tries = 0
        # The link that is up (a RedisLink), if any; set by the bridge.
        self.link: Any = None
        # Hands an answer to the hub (``Hub.recovered``); set by the bridge.
        self.answer: Callable[[RecoveredCommand], Awaitable[None]] | None = None

    def __enter__(self) -> Recoverer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._wants_in.close()
        self._wants.close()

    def recover(self, request: PendingSubscribe) -> bool:
        """Queue a subscribe's read (called by the hub; never blocks); ``False`` if full."""
        try:
            self._wants_in.send_nowait(request)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            return False
        return True

    async def page(
        self, topic: str, since: Position | None, limit: int
    ) -> tuple[Position, bool | None, list[tuple[int, Payload]]]:
        """Read ``GET /history``'s page: the topic's position, whether the entries follow
        ``since`` with none missing (``None`` without ``since``), and up to ``limit`` entries.

        Raises:
            BackplaneDown: the broker is not linked, or did not answer.
        """
        link = self.link
        if link is None:
            raise BackplaneDown("the broker is down")
        try:
            with anyio.fail_after(self._timeout):
                read = await link.read(topic, read_start(since, limit, limit), limit)
        except TimeoutError:
            raise BackplaneDown("the broker did not answer") from None
        recovered, entries = judge_page(since, read.retained(self._size))
        return Position(read.epoch, read.seq), recovered, payloads(entries)

    async def serve(self, link: Any) -> None:
        """Serve pending subscribes over ``link`` until it is lost (then raise).

        A read that fails loses the link; the next link tries it again, and after
        ``READ_TRIES`` failures in a row the subscribe is answered with the error.
        """
        while True:
            want = self._want
            if want is None:
                want = self._want = await self._wants.receive()
                self._tries = 0
            if await self._subscribed(want.topic):
                self._tries += 1
                try:
                    command = await self._read(link, want)
                except (BackplaneDown, TimeoutError) as error:
                    if self._tries < READ_TRIES:
                        raise
                    reason = str(error) or "the broker did not answer"
                    command = RecoveredCommand(
                        want.subscriber, want, want.topic, "", 0, None, (), reason
                    )
                if self.answer is not None:
                    try:
                        await self.answer(command)
                    except HubStopped:
                        return
            self._want = None

    async def _read(self, link: Any, want: PendingSubscribe) -> RecoveredCommand:
        since, last = want.since, want.last
        start = read_start(since, last, self._recovery_max)
        count = 0 if since is None and last is None else self._recovery_max
        with anyio.fail_after(self._timeout):
            read = await link.read(want.topic, start, count)
        outcome, entries = judge(since, last, read.retained(self._size), self._recovery_max)
        return RecoveredCommand(
            want.subscriber, want, want.topic, read.epoch, read.seq, outcome, payloads(entries)
        )


def payloads(entries: Sequence[tuple[int, bytes]]) -> list[tuple[int, Payload]]:
    """Decode the messages of a stream's entries; one that does not decode is left out."""
    decoded = []
    for seq, message in entries:
        try:
            decoded.append((seq, decode(message)[1]))
        except ValueError:
            continue
    return decoded
