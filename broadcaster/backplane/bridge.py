"""The bridge: one node's hub on one side, the broker shared by every node on the other.

::

    hub ─published()──────► outbound (bounded) ─► sender ─────► broker
    hub ◄─ deliverer ◄───── inbound (bounded) ◄── receiver ◄─── broker
    hub ─topic_opened/closed()─► wanted topics ─► subscriber ─► broker

The hub calls the :class:`broadcaster.backplane.Relay` methods from its own task; each one is
a set update or a non-blocking offer, so the hub never waits for the broker. The receiver never
waits for the hub: what does not fit the inbound buffer is dropped and counted. Each node
delivers its own publishes locally at once and skips their echo from the broker, so local
delivery goes on while the broker is down, and every subscriber gets each message once.

The bridge owns one link at a time. When it is lost the bridge counts what could not be
relayed, reconnects with capped exponential backoff and jitter, and subscribes every wanted
topic again before it reports itself up.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from broadcaster.backplane import decode, encode
from broadcaster.errors import BackplaneDown, HubStopped
from broadcaster.protocol import Payload

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from structlog.typing import FilteringBoundLogger

    from broadcaster.backplane import Backplane, Link
    from broadcaster.settings import Settings

# Messages the sender takes from the outbound buffer for one pipelined write.
BATCH = 256
# Seconds between two pings of a link that looks idle to the operating system.
PING_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    """A snapshot of the bridge.

    Args:
        up: linked to the broker, with every wanted topic subscribed.
        error: why the last link was lost (or could not be made); ``None`` before any loss.
        subscribed: topics subscribed on the broker now.
        sent: local publishes relayed to the broker.
        received: other nodes' publishes handed toward the hub.
        outbound_dropped: local publishes dropped because the outbound buffer was full.
        inbound_dropped: other nodes' publishes dropped because the inbound buffer was full.
        unrelayed: local publishes made while the broker was down, never relayed.
        malformed: broker messages that were not a broadcaster message.
        links: links made, the first one included.
    """

    up: bool
    error: str | None
    subscribed: int
    sent: int
    received: int
    outbound_dropped: int
    inbound_dropped: int
    unrelayed: int
    malformed: int
    links: int


class _Episode:
    """Counts losses of one kind, logging when a run of them starts and when it ends."""

    __slots__ = ("_event", "_log", "_run", "total")

    def __init__(self, log: FilteringBoundLogger, event: str) -> None:
        self._log = log
        self._event = event
        self._run = 0
        self.total = 0

    def lose(self, count: int = 1) -> None:
        if not self._run:
            self._log.warning(self._event + "_started")
        self._run += count
        self.total += count

    def end(self) -> None:
        if self._run:
            self._log.info(self._event + "_ended", dropped=self._run)
            self._run = 0


class Bridge:
    """Shares a hub's topics with other nodes through a :class:`Backplane`.

    Args:
        backplane: the broker.
        node: this node's id, ``NODE_ID_BYTES`` long, to tell its own echo.
        settings: the ``BACKPLANE_*`` buffer, timeout and reconnect delays.
        logger: the bridge's logger.
        jitter: returns a number in [0, 1) that spreads reconnects out.
    """

    def __init__(
        self,
        backplane: Backplane,
        node: bytes,
        settings: Settings,
        logger: FilteringBoundLogger,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._backplane = backplane
        self._node = node
        self._timeout = settings.backplane_timeout
        self._delays = (settings.backplane_reconnect_min, settings.backplane_reconnect_max)
        self._log = logger
        self._jitter = jitter
        self._buffer = settings.backplane_buffer
        # Both buffers exist while run() runs; published() touches them only while up.
        self._outbound_in: MemoryObjectSendStream[tuple[str, Payload]]
        self._outbound: MemoryObjectReceiveStream[tuple[str, Payload]]
        self._inbound_in: MemoryObjectSendStream[tuple[str, Payload]]
        self._inbound: MemoryObjectReceiveStream[tuple[str, Payload]]
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._changed = anyio.Event()
        self._up = False
        self._error: str | None = None
        self._sent = self._received = self._links = 0
        self._outbound_dropped = _Episode(logger, "backplane_outbound_overflow")
        self._inbound_dropped = _Episode(logger, "backplane_inbound_overflow")
        self._unrelayed = _Episode(logger, "backplane_unrelayed")
        self._malformed = _Episode(logger, "backplane_malformed")

    def topic_opened(self, topic: str) -> None:
        """Want ``topic`` from the broker (called by the hub; never blocks)."""
        self._wanted.add(topic)
        self._changed.set()

    def topic_closed(self, topic: str) -> None:
        """Stop wanting ``topic`` from the broker (called by the hub; never blocks)."""
        self._wanted.discard(topic)
        self._changed.set()

    def published(self, topic: str, payload: Payload) -> None:
        """Offer a local publish to the broker (called by the hub; never blocks)."""
        if not self._up:
            self._unrelayed.lose()
            return
        try:
            self._outbound_in.send_nowait((topic, payload))
        except anyio.WouldBlock:
            self._outbound_dropped.lose()
        else:
            self._outbound_dropped.end()

    def statistics(self) -> BridgeStatistics:
        """Return the link's state and what has been relayed, dropped and lost."""
        return BridgeStatistics(
            up=self._up,
            error=self._error,
            subscribed=len(self._subscribed),
            sent=self._sent,
            received=self._received,
            outbound_dropped=self._outbound_dropped.total,
            inbound_dropped=self._inbound_dropped.total,
            unrelayed=self._unrelayed.total,
            malformed=self._malformed.total,
            links=self._links,
        )

    async def run(
        self,
        deliver: Callable[[str, Payload], Awaitable[None]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Link to the broker and keep relaying, reconnecting whenever the link is lost.

        Args:
            deliver: hands another node's publish to the local hub (``Hub.publish_eagerly``),
                waiting only while its mailbox is full.

        Runs until cancelled; a lost broker is never an error here.
        """
        self._outbound_in, self._outbound = anyio.create_memory_object_stream[tuple[str, Payload]](
            self._buffer
        )
        self._inbound_in, self._inbound = anyio.create_memory_object_stream[tuple[str, Payload]](
            self._buffer
        )
        try:
            with self._outbound_in, self._outbound, self._inbound_in, self._inbound:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._deliver, deliver)
                    task_status.started()
                    await self._keep_linked()
        finally:
            # The buffers are closed: the hub's publishes count as unrelayed from now on.
            self._up = False

    async def _keep_linked(self) -> None:
        failures = 0
        while True:
            links = self._links
            error = await self._link_until_lost()
            self._down(error)
            failures = 0 if self._links > links else failures + 1
            low, high = self._delays
            delay = min(high, low * 2**failures)
            # Half fixed, half random ("equal jitter"): nodes that lost the broker together
            # do not all come back in the same instant.
            await anyio.sleep(delay / 2 + self._jitter() * delay / 2)

    async def _link_until_lost(self) -> str:
        reason = "the broker closed the connection"
        try:
            async with AsyncExitStack() as stack:
                with anyio.fail_after(self._timeout):
                    link = await stack.enter_async_context(self._backplane.connect())
                await self._serve(link)
        except* (BackplaneDown, TimeoutError) as group:
            reason = _describe(group)
        except* Exception as group:
            self._log.error("backplane_error", exc_info=group)
            reason = _describe(group)
        return reason

    async def _serve(self, link: Link) -> None:
        self._subscribed.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._receive, link)
            await self._reconcile(link)
            self._links += 1
            self._up = True
            self._log.info("backplane_up", links=self._links, topics=len(self._subscribed))
            self._unrelayed.end()
            tg.start_soon(self._follow_wanted, link)
            tg.start_soon(self._ping, link)
            await self._send(link)

    def _down(self, error: str) -> None:
        if self._up or self._error is None:
            self._log.warning("backplane_down", error=error)
        self._up = False
        self._error = error
        self._subscribed.clear()
        # What was waiting for the lost link will not be sent: count it with the outage.
        left = 0
        while True:
            try:
                self._outbound.receive_nowait()
            except anyio.WouldBlock:
                break
            left += 1
        if left:
            self._unrelayed.lose(left)

    async def _receive(self, link: Link) -> None:
        async for topic, message in link.messages():
            try:
                node, payload = decode(message)
            except ValueError:
                self._malformed.lose()
                continue
            self._malformed.end()
            if node == self._node:
                continue  # this node's own publish, delivered locally already
            try:
                self._inbound_in.send_nowait((topic, payload))
            except anyio.WouldBlock:
                self._inbound_dropped.lose()
            else:
                self._received += 1
                self._inbound_dropped.end()
        raise BackplaneDown("the broker closed the connection")

    async def _deliver(self, deliver: Callable[[str, Payload], Awaitable[None]]) -> None:
        """Hand other nodes' publishes to the hub, all that are buffered in one go.

        A checkpoint per message would let the hub wake every subscriber's sender once per
        message; given a burst, the hub fans it out whole and each sender writes it in one
        batch, as for a socket's frames. ``deliver`` waits only while the mailbox is full.
        """
        try:
            async for topic, payload in self._inbound:
                await deliver(topic, payload)
                while True:
                    try:
                        topic, payload = self._inbound.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    await deliver(topic, payload)
        except HubStopped:
            return  # the server is stopping

    async def _send(self, link: Link) -> None:
        async for topic, payload in self._outbound:
            batch = [(topic, encode(self._node, payload))]
            while len(batch) < BATCH:
                try:
                    topic, payload = self._outbound.receive_nowait()
                except anyio.WouldBlock:
                    break
                batch.append((topic, encode(self._node, payload)))
            try:
                with anyio.fail_after(self._timeout):
                    await link.publish(batch)
            except (BackplaneDown, TimeoutError):
                self._unrelayed.lose(len(batch))
                raise
            self._sent += len(batch)

    async def _follow_wanted(self, link: Link) -> None:
        while True:
            await self._changed.wait()
            await self._reconcile(link)

    async def _reconcile(self, link: Link) -> None:
        """Subscribe and unsubscribe until the broker has exactly the wanted topics."""
        while True:
            self._changed = anyio.Event()
            new = sorted(self._wanted - self._subscribed)
            old = sorted(self._subscribed - self._wanted)
            if not new and not old:
                return
            with anyio.fail_after(self._timeout):
                if new:
                    await link.subscribe(new)
                if old:
                    await link.unsubscribe(old)
            self._subscribed.update(new)
            self._subscribed.difference_update(old)

    async def _ping(self, link: Link) -> None:
        while True:
            await anyio.sleep(PING_SECONDS)
            with anyio.fail_after(self._timeout):
                await link.ping()


def _describe(group: BaseExceptionGroup[Exception]) -> str:
    """Word the first error of a group, however deeply nested."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return str(error) or type(error).__name__
