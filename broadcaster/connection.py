"""One WebSocket connection: a reader and a sender task in one task group.

The reader turns client frames into hub commands; the sender drains the outbox into the
socket and is the only task that writes to it. Whichever ends first cancels the other; then
the connection leaves the hub (synchronously, so neither cancellation nor a full mailbox can
lose it) and the socket is closed with the code that says why.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

import anyio

from broadcaster.errors import (
    CloseCode,
    Closing,
    HubStopped,
    LagCause,
    ProtocolError,
    SlowConsumer,
)
from broadcaster.hub import Hub, Source, Subscriber
from broadcaster.metrics import Totals
from broadcaster.outbox import Outbox
from broadcaster.protocol import (
    Frame,
    Mode,
    Payload,
    Ping,
    Publish,
    Subscribe,
    error_frame,
    parse_frame,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from structlog.typing import FilteringBoundLogger

    from broadcaster.settings import Settings

# Control frames a client may have waiting before its reader stops reading from it.
CONTROL_BACKLOG = 32
# Seconds a close handshake may take before the socket is given up.
CLOSE_TIMEOUT = 5.0
# Bytes the sender takes from its outbox for one write; bounds what it holds outside it.
BATCH_BYTES = 256 * 1024
# The ASGI scope extension under which broadcaster's uvicorn protocol offers its FastLane.
FASTLANE = "broadcaster.fastlane"


class Socket(Protocol):
    """The little a connection needs of a WebSocket; tests pass fakes."""

    async def receive(self) -> str | bytes | None:
        """Return the next client message, or ``None`` once the client has gone."""

    def writable(self) -> bool:
        """Whether :meth:`send` would write at once rather than wait for the peer to read."""

    async def send(self, frames: Sequence[Frame]) -> None:
        """Write frames in order. Raises ``anyio.BrokenResourceError`` once the client has gone."""

    async def close(self, code: int, reason: str) -> None:
        """Close the socket; a socket that is already closed is left as it is."""


class Connection:
    """Serve one accepted socket until either side ends it.

    Args:
        socket: the accepted WebSocket; the connection closes it.
        hub: the running hub.
        settings: queue bounds, policy and timeouts.
        logger: bound to this connection's ``conn_id`` and ``peer``.
        topic: the topic a raw-mode socket is subscribed to; ``None`` for multiplexed mode.
        fastlane: whether the socket writes frames through the fastlane; logged on opening.
        conn_id, peer: how operators tell this connection from others.
        totals: where the connection adds what it did when it ends, for the metrics.
    """

    def __init__(
        self,
        socket: Socket,
        hub: Hub,
        settings: Settings,
        logger: FilteringBoundLogger,
        topic: str | None = None,
        *,
        fastlane: bool = False,
        conn_id: str = "",
        peer: str | None = None,
        totals: Totals | None = None,
    ) -> None:
        self._socket = socket
        self._hub = hub
        self._send_timeout = settings.send_timeout
        self._idle_timeout = settings.idle_timeout
        self._totals = totals or Totals()
        self._log = logger
        self._topic = topic
        self._fastlane = fastlane
        # The task group's scope once it runs; the outbox cancels it when it fails, since the
        # sender may be blocked in a socket write.
        self._scope: anyio.CancelScope | None = None
        self.outbox = Outbox(
            max_messages=settings.queue_max_messages,
            max_bytes=settings.queue_max_bytes,
            overflow=settings.overflow,
            lag_timeout=settings.lag_timeout,
            logger=logger,
            on_fail=self._cancel,
        )
        mode = Mode.MUX if topic is None else Mode.RAW
        self._subscriber = Subscriber(
            self.outbox, mode, conn_id=conn_id, peer=peer, opened_at=time.monotonic()
        )

    def _cancel(self, error: Closing) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Serve until the client leaves, lags, or the server stops; then close the socket."""
        started = time.monotonic()
        self._totals.accepted += 1
        self._log.info(
            "connection_opened",
            mode=self._subscriber.mode.value,
            topic=self._topic,
            fastlane=self._fastlane,
        )
        closing: Closing | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                self._hub.join(self._subscriber)
                if self._topic is not None:
                    await self._hub.subscribe(self._subscriber, self._topic)
                tg.start_soon(self._send_loop, tg.cancel_scope)
                # The reader is the group's host task: one task fewer per connection.
                await self._read_loop(tg.cancel_scope)
        except* HubStopped:
            closing = Closing(CloseCode.INTERNAL_ERROR, "hub stopped")
        except* Closing as group:
            closing = _first_closing(group)
        except* Exception:
            self._log.exception("connection_crashed")
            closing = Closing(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            closing = self.outbox.error or closing
            self.outbox.close()
            self._hub.leave_nowait(self._subscriber)
            self._count(closing)
            if closing is not None:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await self._socket.close(closing.code, closing.reason)
            self._log.info(
                "connection_closed",
                code=closing.code.value if closing else None,
                reason=closing.reason if closing else "client left",
                cause=closing.cause.value if isinstance(closing, SlowConsumer) else None,
                dropped=self.outbox.statistics().dropped,
                seconds=round(time.monotonic() - started, 3),
            )

    def _count(self, closing: Closing | None) -> None:
        totals, stats = self._totals, self.outbox.statistics()
        totals.closed[str(closing.code.value) if closing else "none"] += 1
        if isinstance(closing, SlowConsumer):
            totals.slow_consumers[closing.cause.value] += 1
        totals.dropped += stats.dropped
        totals.sent += stats.sent

    async def _receive(self) -> str | bytes | None:
        # A multiplexed connection with no subscription that sends nothing for the idle
        # timeout is closed; the deadline is paid only while it has no subscription.
        while self._topic is None and not self._subscriber.topics:
            with anyio.move_on_after(self._idle_timeout):
                return await self._socket.receive()
            if not self._subscriber.topics:
                raise Closing(CloseCode.POLICY_VIOLATION, "idle timeout")
        return await self._socket.receive()

    async def _read_loop(self, scope: anyio.CancelScope) -> None:
        while (message := await self._receive()) is not None:
            if self._topic is not None:
                await self._hub.publish_eagerly(self._topic, Payload(message), Source.WS)
                continue
            await self.outbox.wait_control_room(CONTROL_BACKLOG)
            try:
                command = parse_frame(message)
            except ProtocolError as error:
                self.outbox.send_nowait(error_frame(error))
                continue
            if isinstance(command, Ping):
                await self._hub.ping(self._subscriber)
            elif isinstance(command, Publish):
                await self._hub.publish_eagerly(command.topic, command.payload, Source.WS)
            elif isinstance(command, Subscribe):
                await self._hub.subscribe(self._subscriber, command.topic)
            else:
                await self._hub.unsubscribe(self._subscriber, command.topic)
        scope.cancel()

    async def _send_loop(self, scope: anyio.CancelScope) -> None:
        try:
            while True:
                frames = await self.outbox.receive_batch(BATCH_BYTES)
                if self._socket.writable():
                    # The common case, and per batch: skip the cost of a deadline.
                    await self._socket.send(frames)
                    continue
                with anyio.fail_after(self._send_timeout):
                    await self._socket.send(frames)
        except TimeoutError:
            raise SlowConsumer(LagCause.SEND_TIMEOUT) from None
        except (anyio.BrokenResourceError, anyio.EndOfStream):
            scope.cancel()


def _first_closing(group: BaseExceptionGroup[Closing]) -> Closing:
    exception = group.exceptions[0]
    while isinstance(exception, BaseExceptionGroup):
        exception = exception.exceptions[0]
    return exception
