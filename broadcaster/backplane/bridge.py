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

With shared history (``sequenced``), the bridge is also the hub's
:class:`broadcaster.backplane.Sequencer`: a local publish is not delivered locally but sent to
the broker, which numbers it; every node, this one included, delivers what comes back, at the
broker's position. While the broker is down, publishes are refused rather than numbered here.
A subscribe asks the recoverer for its starting point: once the topic's broker subscription is
in place (so nothing published later can be missed), it reads the topic's stream and answers
the hub through its mailbox.

The bridge owns one link at a time. When it is lost the bridge counts what could not be
relayed, reconnects with capped exponential backoff and jitter, and subscribes every wanted
topic again before it reports itself up.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio

from broadcaster.backplane import decode, decode_positioned, encode
from broadcaster.backplane.episodes import BridgeStatistics, Episode, describe
from broadcaster.backplane.recoverer import Recoverer
from broadcaster.errors import BackplaneDown, HubStopped
from broadcaster.mailbox import PendingReceipt, Receipt
from broadcaster.protocol import Payload, Position

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from structlog.typing import FilteringBoundLogger

    from broadcaster.backplane import Backplane, Link
    from broadcaster.mailbox import RecoveredCommand
    from broadcaster.settings import Settings

# A local publish on its way to the broker: topic, payload, receipt, local subscribers.
Outgoing = tuple[str, Payload, PendingReceipt | None, int]
# A broker message on its way to the hub, with the broker's position when it gave one.
Incoming = tuple[str, Payload, Position | None]

# Messages the sender takes from the outbound buffer for one pipelined write.
BATCH = 256
# Seconds between two pings of a link that looks idle to the operating system.
PING_SECONDS = 1.0


class Bridge:
    """Shares a hub's topics with other nodes through a :class:`Backplane`.

    Args:
        backplane: the broker.
        node: this node's id, ``NODE_ID_BYTES`` long, to tell its own echo.
        settings: the ``BACKPLANE_*`` buffer, timeout and reconnect delays.
        logger: the bridge's logger.
        jitter: returns a number in [0, 1) that spreads reconnects out.
        sequenced: the broker numbers every topic's messages and keeps their history
            (Redis with history on); the link must then offer ``append`` and ``read``.
    """

    def __init__(
        self,
        backplane: Backplane,
        node: bytes,
        settings: Settings,
        logger: FilteringBoundLogger,
        jitter: Callable[[], float] = random.random,
        *,
        sequenced: bool = False,
    ) -> None:
        self.sequenced = sequenced
        self._backplane = backplane
        self._node = node
        self._timeout = settings.backplane_timeout
        self._delays = (settings.backplane_reconnect_min, settings.backplane_reconnect_max)
        self._log = logger
        self._jitter = jitter
        self._buffer = settings.backplane_buffer
        # Both buffers exist while run() runs; published() touches them only while up.
        self._outbound_in: MemoryObjectSendStream[Outgoing]
        self._outbound: MemoryObjectReceiveStream[Outgoing]
        self._inbound_in: MemoryObjectSendStream[Incoming]
        self._inbound: MemoryObjectReceiveStream[Incoming]
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._leaving: set[str] = set()
        self._changed = anyio.Event()
        self._reconciled = anyio.Event()
        self._recoverer = Recoverer(
            self._buffer,
            settings.recovery_max,
            settings.history_messages,
            self._timeout,
            self._subscribed_to,
        )
        # The hub's way to ask for a subscribe's starting point and GET /history's pages.
        self.recover = self._recoverer.recover
        self.page = self._recoverer.page
        self._up = False
        self._error: str | None = None
        self._sent = self._received = self._links = 0
        self._outbound_dropped = Episode(logger, "backplane_outbound_overflow")
        self._inbound_dropped = Episode(logger, "backplane_inbound_overflow")
        self._unrelayed = Episode(logger, "backplane_unrelayed")
        self._malformed = Episode(logger, "backplane_malformed")

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
        self.submit(topic, payload, None, 0)

    def accepting(self) -> bool:
        """Whether the broker is linked, so that a publish can be relayed (or numbered)."""
        return self._up

    def submit(
        self, topic: str, payload: Payload, receipt: PendingReceipt | None, subscribers: int
    ) -> bool:
        """Offer a local publish to the broker (called by the hub; never blocks).

        Returns whether it was taken; one that was not is counted, and its receipt failed.
        """
        if not self._up:
            self._unrelayed.lose()
            _fail(receipt, "the broker is down")
            return False
        try:
            self._outbound_in.send_nowait((topic, payload, receipt, subscribers))
        except anyio.WouldBlock:
            self._outbound_dropped.lose()
            _fail(receipt, "the broker is not keeping up")
            return False
        self._outbound_dropped.end()
        return True

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
        place: Callable[[str, Payload, Position], Awaitable[None]] | None = None,
        answer: Callable[[RecoveredCommand], Awaitable[None]] | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Link to the broker and keep relaying, reconnecting whenever the link is lost.

        Args:
            deliver: hands another node's publish to the local hub (``Hub.publish_eagerly``),
                waiting only while its mailbox is full.
            place: when sequenced, hands every publish, at the broker's position, to the hub.
            answer: when sequenced, hands the hub a subscribe's starting point.

        Runs until cancelled; a lost broker is never an error here.
        """
        self._outbound_in, self._outbound = anyio.create_memory_object_stream[Outgoing](
            self._buffer
        )
        self._inbound_in, self._inbound = anyio.create_memory_object_stream[Incoming](self._buffer)
        self._recoverer.answer = answer
        try:
            with self._outbound_in, self._outbound, self._inbound_in, self._inbound:
                with self._recoverer:
                    try:
                        await self._relay(deliver, place, task_status)
                    finally:
                        # No publisher waits for a receipt that will never come.
                        self._fail_waiting("the server is stopping")
        finally:
            # The buffers are closed: the hub's publishes count as unrelayed from now on.
            self._up = False

    async def _relay(
        self,
        deliver: Callable[[str, Payload], Awaitable[None]],
        place: Callable[[str, Payload, Position], Awaitable[None]] | None,
        task_status: TaskStatus[None],
    ) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._deliver, deliver, place)
            task_status.started()
            await self._keep_linked()

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
            reason = describe(group)
        except* Exception as group:
            self._log.error("backplane_error", exc_info=group)
            reason = describe(group)
        finally:
            self._recoverer.link = None
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
            if self.sequenced:
                self._recoverer.link = link
                tg.start_soon(self._recoverer.serve, link)
            await self._send(link)

    def _down(self, error: str) -> None:
        if self._up or self._error is None:
            self._log.warning("backplane_down", error=error)
        self._up = False
        self._error = error
        self._subscribed.clear()
        self._leaving.clear()
        # What was waiting for the lost link will not be sent: count it with the outage.
        left = self._fail_waiting(error)
        if left:
            self._unrelayed.lose(left)

    def _fail_waiting(self, error: str) -> int:
        """Take what waits in the outbound buffer, failing its receipts; return how many."""
        left = 0
        while True:
            try:
                _, _, receipt, _ = self._outbound.receive_nowait()
            except anyio.WouldBlock:
                return left
            _fail(receipt, error)
            left += 1

    async def _receive(self, link: Link) -> None:
        async for topic, message in link.messages():
            position = None
            try:
                if self.sequenced:
                    position, node, payload = decode_positioned(message)
                else:
                    node, payload = decode(message)
            except ValueError:
                self._malformed.lose()
                continue
            self._malformed.end()
            if node == self._node and position is None:
                continue  # this node's own publish, delivered locally already
            try:
                self._inbound_in.send_nowait((topic, payload, position))
            except anyio.WouldBlock:
                self._inbound_dropped.lose()
            else:
                self._received += 1
                self._inbound_dropped.end()
        raise BackplaneDown("the broker closed the connection")

    async def _deliver(
        self,
        deliver: Callable[[str, Payload], Awaitable[None]],
        place: Callable[[str, Payload, Position], Awaitable[None]] | None,
    ) -> None:
        """Hand other nodes' publishes to the hub, all that are buffered in one go.

        A checkpoint per message would let the hub wake every subscriber's sender once per
        message; given a burst, the hub fans it out whole and each sender writes it in one
        batch, as for a socket's frames. ``deliver`` waits only while the mailbox is full.
        """
        try:
            async for topic, payload, position in self._inbound:
                while True:
                    if position is None or place is None:
                        await deliver(topic, payload)
                    else:
                        await place(topic, payload, position)
                    try:
                        topic, payload, position = self._inbound.receive_nowait()
                    except anyio.WouldBlock:
                        break
        except HubStopped:
            return  # the server is stopping

    async def _send(self, link: Link) -> None:
        async for item in self._outbound:
            items = [item]
            while len(items) < BATCH:
                try:
                    items.append(self._outbound.receive_nowait())
                except anyio.WouldBlock:
                    break
            batch = [(topic, encode(self._node, payload)) for topic, payload, _, _ in items]
            try:
                with anyio.fail_after(self._timeout):
                    if self.sequenced:
                        positions = await link.append(batch)  # type: ignore[attr-defined]
                    else:
                        await link.publish(batch)
            except (BackplaneDown, TimeoutError) as error:
                self._unrelayed.lose(len(batch))
                for _, _, receipt, _ in items:
                    _fail(receipt, str(error) or "the broker did not answer")
                raise
            self._sent += len(batch)
            if self.sequenced:
                for (topic, _, receipt, count), at in zip(items, positions, strict=True):
                    if receipt is not None:
                        receipt._set(Receipt(topic, at.epoch, at.seq, count))

    async def _subscribed_to(self, topic: str) -> bool:
        """Wait until the broker subscription for ``topic`` is in place; ``False`` if the
        topic is no longer wanted."""
        while (topic not in self._subscribed or topic in self._leaving) and topic in self._wanted:
            await self._reconciled.wait()
        return topic in self._subscribed and topic not in self._leaving

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
            # A topic on its way out is not trusted by a resume's read, even if it is wanted
            # again meanwhile: what is published before it is subscribed again would be lost.
            self._leaving.update(old)
            with anyio.fail_after(self._timeout):
                if new:
                    await link.subscribe(new)
                if old:
                    await link.unsubscribe(old)
            self._subscribed.update(new)
            self._subscribed.difference_update(old)
            self._leaving.clear()
            self._reconciled.set()
            self._reconciled = anyio.Event()

    async def _ping(self, link: Link) -> None:
        while True:
            await anyio.sleep(PING_SECONDS)
            with anyio.fail_after(self._timeout):
                await link.ping()


def _fail(receipt: PendingReceipt | None, reason: str) -> None:
    if receipt is not None:
        receipt._fail(BackplaneDown(reason))
