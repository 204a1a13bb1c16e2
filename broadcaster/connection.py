"""One WebSocket connection: a reader, and a sender that drains its outbox into the socket.

The reader turns client frames into hub commands. Where the socket offers a
:class:`~broadcaster.writer.Lane` (the server's fastlane), the app's shared
:class:`~broadcaster.writer.Writer` is the sender, and the reader is the connection's only task.
Elsewhere a sender task of its own drains the outbox, in one task group with the reader, and
whichever ends first cancels the other. Either way, the connection then leaves the hub
(synchronously, so neither cancellation nor a full mailbox can lose it) and the socket is
closed with the code that says why.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Protocol

import anyio

from broadcaster.auth import FULL, Grant
from broadcaster.errors import (
    BackplaneDown,
    CloseCode,
    Closing,
    Flooding,
    HubBusy,
    HubStopped,
    LagCause,
    ProtocolError,
    ShuttingDown,
    SlowConsumer,
)
from broadcaster.mailbox import Receipt, Source, Subscriber
from broadcaster.metrics import Totals
from broadcaster.outbox import Outbox
from broadcaster.policy import TokenBucket
from broadcaster.protocol import (
    Command,
    Frame,
    Mode,
    Payload,
    Ping,
    Publish,
    Subscribe,
    ack_frame,
    error_frame,
    parse_frame,
)
from broadcaster.writer import BATCH_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from structlog.typing import FilteringBoundLogger

    from broadcaster.hub import Hub
    from broadcaster.settings import Settings
    from broadcaster.writer import Lane, Writer

# Control frames a client may have waiting before its reader stops reading from it.
CONTROL_BACKLOG = 32
# Seconds a close handshake may take before the socket is given up.
CLOSE_TIMEOUT = 5.0


class Socket(Protocol):
    """The little a connection needs of a WebSocket; tests pass fakes."""

    @property
    def lane(self) -> Lane | None:
        """The socket's write path that never waits, if the server offers one."""

    async def receive(self) -> str | bytes | None:
        """Return the next client message, or ``None`` once the client has gone."""

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
        grant: what the client's credential allows, and until when; past its expiry the
            connection is closed with 1008 ``token expired``.
        last: for a raw-mode socket, the latest messages of its topic to replay first.
        writer: the app's shared writer, which serves sockets that offer a lane; without it
            every connection has a sender task of its own.
        conn_id, peer: how operators tell this connection from others.
        totals: where the connection adds what it did when it ends, for the metrics.
        clock: monotonic seconds, for the rate limits; tests pass a clock of their own.
    """

    # Thousands of idle connections each hold one: no per-instance dict.
    __slots__ = (
        "_client_publish",
        "_clock",
        "_grant",
        "_hub",
        "_idle_timeout",
        "_lane",
        "_last",
        "_limits",
        "_log",
        "_max_message_bytes",
        "_scope",
        "_send_timeout",
        "_socket",
        "_subscriber",
        "_subscribing",
        "_topic",
        "_totals",
        "outbox",
    )

    def __init__(
        self,
        socket: Socket,
        hub: Hub,
        settings: Settings,
        logger: FilteringBoundLogger,
        topic: str | None = None,
        *,
        grant: Grant = FULL,
        last: int | None = None,
        writer: Writer | None = None,
        conn_id: str = "",
        peer: str | None = None,
        totals: Totals | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._socket = socket
        self._hub = hub
        self._send_timeout = settings.send_timeout
        self._idle_timeout = settings.idle_timeout
        # Whether the last subscription command was a subscribe; see _serve.
        self._subscribing = False
        self._totals = totals or Totals()
        self._log = logger
        self._topic = topic
        self._grant = grant
        self._last = last
        self._client_publish = settings.client_publish
        self._max_message_bytes = settings.max_message_bytes
        self._clock = clock
        # A socket with a lane (the server's own protocol) holds every frame to the size and
        # rate limits as it arrives; elsewhere the connection checks whole messages here.
        self._limits: tuple[TokenBucket, TokenBucket] | None = None
        if socket.lane is None:
            now, rate = clock(), settings.max_messages_per_second
            self._limits = (
                TokenBucket.full(rate, max(1.0, rate), now),
                TokenBucket.full(settings.max_bytes_per_second, settings.max_bytes_per_second, now),
            )
        lane = socket.lane if writer is not None else None
        self._lane = lane
        # The task group's scope, for a connection with a sender task of its own (see _fail).
        self._scope: anyio.CancelScope | None = None
        self.outbox = Outbox(
            max_messages=settings.queue_max_messages,
            max_bytes=settings.queue_max_bytes,
            overflow=settings.overflow,
            lag_timeout=settings.lag_timeout,
            logger=logger,
            on_fail=self._fail,
            on_ready=None if writer is None or lane is None else partial(writer.schedule, lane),
        )
        mode = Mode.MUX if topic is None else Mode.RAW
        self._subscriber = Subscriber(
            self.outbox, mode, conn_id=conn_id, peer=peer, opened_at=time.monotonic()
        )

    def _fail(self, error: Closing) -> None:
        # The outbox failed: end the reader, which waits on the socket (or, briefly, on the
        # hub). A lane closes the socket itself, which ends that wait without the cost of a
        # cancel scope per connection; a sender task of its own may be stuck in a socket
        # write, so there the connection's scope is cancelled.
        if self._lane is not None:
            self._lane.close(error.code, error.reason)
        elif self._scope is not None:
            self._scope.cancel()

    async def run(self) -> Closing | None:
        """Serve until the client leaves, lags, or the server stops; then close the socket.

        Returns:
            why the server closed the connection, or ``None`` if the client left.
        """
        started = time.monotonic()
        self._totals.accepted += 1
        # Debug level, like a close the client chose: a reconnect storm of thousands must not
        # become thousands of lines; the metrics count every connection.
        self._log.debug(
            "connection_opened",
            mode=self._subscriber.mode.value,
            topic=self._topic,
            fastlane=self._lane is not None,
        )
        closing: Closing | None = None
        # Chosen here rather than checked in a wrapper: a coroutine frame that stays for the
        # connection's life costs every idle connection its memory.
        serve = self._serve if self._grant.expires is None else self._serve_until_expiry
        try:
            if self._lane is not None:
                await serve()
            else:
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    tg.start_soon(self._send_loop)
                    # The reader is the group's host task: one task fewer per connection.
                    await serve()
                    tg.cancel_scope.cancel()
        except* HubStopped:
            closing = Closing(CloseCode.INTERNAL_ERROR, "hub stopped")
        except* Closing as group:
            closing = _first_closing(group)
        except* Exception:
            self._log.exception("connection_crashed")
            closing = Closing(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            lane = self._socket.lane
            closing = self.outbox.error or closing or (lane.closing if lane else None)
            self.outbox.close()
            self._hub.leave_nowait(self._subscriber)
            self._count(closing)
            if closing is not None:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await self._socket.close(closing.code, closing.reason)
            # Info when the server closed it for a reason of its own, the close an operator
            # looks for; the rest (the client left, shutdown) at debug.
            notable = closing is not None and not isinstance(closing, ShuttingDown)
            (self._log.info if notable else self._log.debug)(
                "connection_closed",
                code=closing.code.value if closing else None,
                reason=closing.reason if closing else "client left",
                cause=closing.cause.value if isinstance(closing, SlowConsumer) else None,
                dropped=self.outbox.statistics().dropped,
                seconds=round(time.monotonic() - started, 3),
            )
        return closing

    def _count(self, closing: Closing | None) -> None:
        totals, stats = self._totals, self.outbox.statistics()
        totals.closed[str(closing.code.value) if closing else "none"] += 1
        if isinstance(closing, SlowConsumer):
            totals.slow_consumers[closing.cause.value] += 1
        totals.dropped += stats.dropped
        totals.sent += stats.sent

    async def _serve_until_expiry(self) -> None:
        assert self._grant.expires is not None
        deadline = anyio.current_time() + self._grant.expires - time.time()
        with anyio.CancelScope(deadline=deadline) as expiry:
            await self._serve()
        if expiry.cancelled_caught:
            raise Closing(CloseCode.POLICY_VIOLATION, "token expired")

    async def _serve(self) -> None:
        self._hub.join(self._subscriber)
        if self._topic is not None:
            await self._hub.subscribe(self._subscriber, self._topic, last=self._last)
        raw_refusal = None if self._topic is None else self._raw_publish_refusal(self._topic)
        while True:
            # The socket is awaited here, not through a helper: a quiet subscriber's reader
            # waits in this frame for as long as it stays, and every frame costs memory.
            if self._topic is None and not self._subscriber.topics and not self._subscribing:
                message = await self._receive_before_idle_timeout()
            else:
                message = await self._socket.receive()
            if message is None:
                return
            if self._limits is not None:
                self._check_rate(self._limits, message)
            if self._topic is not None:
                if raw_refusal is not None:
                    raise raw_refusal
                try:
                    await self._hub.publish_eagerly(self._topic, Payload(message), Source.WS)
                except BackplaneDown:
                    self._totals.refused["backplane_down"] += 1
                continue
            await self.outbox.wait_control_room(CONTROL_BACKLOG)
            try:
                command = parse_frame(message)
                self._authorize(command)
            except ProtocolError as error:
                self.outbox.offer(error_frame(error))
                continue
            if isinstance(command, Ping):
                await self._hub.ping(self._subscriber)
            elif isinstance(command, Publish):
                try:
                    if command.id is None:
                        await self._hub.publish_eagerly(command.topic, command.payload, Source.WS)
                    else:
                        await self._publish_acked(command, command.id)
                except BackplaneDown as error:
                    self._totals.refused["backplane_down"] += 1
                    refusal = ProtocolError("backplane_down", str(error), command.id, command.topic)
                    self.outbox.offer(error_frame(refusal))
            elif isinstance(command, Subscribe):
                self._subscribing = True
                await self._hub.subscribe(
                    self._subscriber, command.topic, since=command.since, last=command.last
                )
            else:
                self._subscribing = False
                await self._hub.unsubscribe(self._subscriber, command.topic)

    async def _publish_acked(self, command: Publish, ack: str | int) -> None:
        """Publish, and have the hub queue the ack (or the refusal) once it has the position:
        the reader does not wait for it, so a publisher may have many acks outstanding."""
        on_done = partial(self._ack, ack, command.topic)
        try:
            self._hub.publish_nowait(command.topic, command.payload, Source.WS, on_done)
        except HubBusy:
            await self._hub.publish_pending(command.topic, command.payload, Source.WS, on_done)

    def _ack(self, ack: str | int, topic: str, outcome: Receipt | BackplaneDown | None) -> None:
        # Runs in the hub's task: it only queues a control frame. None: the hub stopped, and
        # the connection is closing with 1011.
        if isinstance(outcome, Receipt):
            self.outbox.offer(ack_frame(ack, topic, outcome.epoch, outcome.seq))
        elif outcome is not None:
            self._totals.refused["backplane_down"] += 1
            refusal = ProtocolError("backplane_down", str(outcome), ack, topic)
            self.outbox.offer(error_frame(refusal))

    def _check_rate(self, limits: tuple[TokenBucket, TokenBucket], message: str | bytes) -> None:
        """Hold the client to the message size and its messages and bytes a second.

        Raises:
            Closing: 1009 ``message too big``, 1008 ``rate limit exceeded``.
        """
        if isinstance(message, str) and not message.isascii():
            size = len(message.encode())
        else:
            size = len(message)
        if size > self._max_message_bytes:
            raise Closing(CloseCode.MESSAGE_TOO_BIG, "message too big")
        now, (frames, size_limit) = self._clock(), limits
        if not (frames.take(1, now) and size_limit.take(size, now)):
            raise Flooding()

    def _raw_publish_refusal(self, topic: str) -> Closing | None:
        """What closes a raw-mode socket that sends a frame it may not publish."""
        if not self._client_publish:
            return Closing(CloseCode.POLICY_VIOLATION, "publishing disabled")
        if not self._grant.publish.matches(topic):
            return Closing(CloseCode.POLICY_VIOLATION, "publishing not permitted")
        return None

    def _authorize(self, command: Command) -> None:
        """Check a multiplexed command against the grant.

        Raises:
            ProtocolError: ``publish_disabled`` or ``forbidden_topic``.
        """
        if isinstance(command, Publish):
            if not self._client_publish:
                detail = "this server takes no client publishes"
                raise ProtocolError("publish_disabled", detail, command.id, command.topic)
            if not self._grant.publish.matches(command.topic):
                detail = "the token does not allow publishing here"
                raise ProtocolError("forbidden_topic", detail, command.id, command.topic)
        elif isinstance(command, Subscribe) and not self._grant.subscribe.matches(command.topic):
            detail = "the token does not allow this topic"
            raise ProtocolError("forbidden_topic", detail, topic=command.topic)

    async def _receive_before_idle_timeout(self) -> str | bytes | None:
        # A multiplexed connection with no subscription that sends nothing for the idle
        # timeout is closed. A subscribe on its way to the hub counts as a subscription (see
        # _serve): the deadline's timer would otherwise stay armed until the next frame,
        # which for a quiet subscriber is never.
        with anyio.move_on_after(self._idle_timeout):
            return await self._socket.receive()
        if not self._subscriber.topics:
            raise Closing(CloseCode.POLICY_VIOLATION, "idle timeout")
        return await self._socket.receive()

    async def _send_loop(self) -> None:
        try:
            while True:
                frames = await self.outbox.receive_batch(BATCH_BYTES)
                with anyio.fail_after(self._send_timeout):
                    await self._socket.send(frames)
        except TimeoutError:
            raise SlowConsumer(LagCause.SEND_TIMEOUT) from None
        except (anyio.BrokenResourceError, anyio.EndOfStream):
            assert self._scope is not None
            self._scope.cancel()


def _first_closing(group: BaseExceptionGroup[Closing]) -> Closing:
    exception = group.exceptions[0]
    while isinstance(exception, BaseExceptionGroup):
        exception = exception.exceptions[0]
    return exception
