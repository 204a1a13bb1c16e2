"""The FastAPI face: :class:`Broadcaster`, the hub's lifespan and its connections, and
``create_app``.

With :mod:`broadcaster.routes`, the only module that imports FastAPI. :class:`Broadcaster`
holds one hub and the routes that reach it, so it can be mounted into an existing app as well
as served alone.
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect

from broadcaster.auth import Authenticator, Grant, origin_allowed
from broadcaster.backplane import NODE_ID_BYTES, open_backplane
from broadcaster.backplane.bridge import Bridge
from broadcaster.connection import Connection
from broadcaster.errors import (
    RETRY,
    Flooding,
    ProtocolError,
    Refused,
)
from broadcaster.http_gate import flooding
from broadcaster.hub import Hub
from broadcaster.log import get_logger
from broadcaster.mailbox import Source
from broadcaster.metrics import Metrics
from broadcaster.policy import AddressLimiter, PenaltyBox
from broadcaster.protocol import (
    Payload,
    parse_query_count,
    validate_topic,
)
from broadcaster.publishing import HTTPPublish
from broadcaster.routes import refusal, routes
from broadcaster.settings import MEMORY, Settings
from broadcaster.sse import EventStream, resume_point
from broadcaster.stream import History
from broadcaster.writer import FASTLANE, Writer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from starlette.datastructures import Address
    from starlette.types import Receive, Scope, Send

    from broadcaster.connection import Socket
    from broadcaster.protocol import Frame
    from broadcaster.writer import Lane


class _StarletteSocket:
    """The :class:`broadcaster.connection.Socket` over a Starlette WebSocket.

    It offers the server's fastlane as its lane when there is one (see
    :class:`broadcaster.ws_protocol.WebSocketProtocol`); its own :meth:`send` writes plain ASGI
    messages. The bytes on the wire are the same.
    """

    __slots__ = ("_websocket", "lane")

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        extension = websocket.scope.get("extensions", {}).get(FASTLANE)
        self.lane: Lane | None = extension["lane"] if extension else None

    async def receive(self) -> str | bytes | None:
        message = await self._websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text: str | None = message.get("text")
        return text if text is not None else message["bytes"]

    async def send(self, frames: Sequence[Frame]) -> None:
        try:
            for frame in frames:
                key = "text" if isinstance(frame.data, str) else "bytes"
                await self._websocket.send({"type": "websocket.send", key: frame.data})
        except (WebSocketDisconnect, OSError, RuntimeError):
            raise anyio.BrokenResourceError from None

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._websocket.close(code, reason)
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass  # the client is gone already; there is nobody to tell


class Broadcaster:
    """A hub, the bridge that shares it with other nodes (unless the backplane is
    ``memory``), and the routes that serve them.

    Args:
        settings: queue bounds, policies and timeouts.
        on_hub_failure: called if the hub or the writer crashes; the CLI uses it to stop the
            server, since a server without them would accept connections that never receive
            anything.

    Mount it into an existing app::

        live = Broadcaster(Settings())
        app = FastAPI(lifespan=lambda app: live.lifespan())
        app.include_router(live.router, prefix="/live")
    """

    def __init__(
        self, settings: Settings, on_hub_failure: Callable[[], None] = lambda: None
    ) -> None:
        self.settings = settings
        # Tells this node's publishes from other nodes' on the broker, and this worker from
        # others in /healthz.
        self.node = secrets.token_bytes(NODE_ID_BYTES)
        # With history on a broker (Redis; NATS is refused at start), the broker numbers
        # every topic's messages and keeps their history, shared by every node.
        shared = settings.backplane != MEMORY and settings.history_messages > 0
        self.bridge = (
            None
            if settings.backplane == MEMORY
            else Bridge(
                open_backplane(settings),
                self.node,
                settings,
                get_logger("broadcaster.backplane"),
                sequenced=shared,
            )
        )
        self.metrics = Metrics(settings.overflow)
        self.hub = Hub(
            mailbox_size=settings.hub_mailbox_size,
            logger=get_logger("broadcaster.hub"),
            max_subscriptions=settings.max_subscriptions,
            observe_fanout=self.metrics.fanout_seconds.observe,
            relay=self.bridge,
            sequencer=self.bridge if shared else None,
            history=History(
                size=settings.history_messages,
                max_bytes=settings.history_max_bytes,
                ttl=settings.history_ttl,
                total_bytes=settings.history_total_bytes,
                recovery_max=settings.recovery_max,
            ),
        )
        self.metrics.watch(self.hub, self.bridge)
        self.writer = Writer(settings.send_timeout)
        self.draining = False
        self._drain_asked = anyio.Event()
        self.drained = anyio.Event()
        self._on_drained: Callable[[], None] = lambda: None
        self._on_hub_failure = on_hub_failure
        self._log = get_logger("broadcaster.connection")
        self.auth = Authenticator(settings)
        self._handshakes = AddressLimiter(
            settings.max_handshakes_per_second, settings.handshake_addresses
        )
        self.publishing = HTTPPublish(self.hub, self.auth, settings, self.count_refusal)
        # Addresses whose connection was closed for flooding, refused for FLOOD_PENALTY: by
        # the server's HTTP gate as they connect, and here for servers without one.
        self.penalties = PenaltyBox(settings.flood_penalty, settings.handshake_addresses)
        # WebSocket and SSE connections admitted and not yet ended, for
        # BROADCASTER_MAX_CONNECTIONS.
        self._open = 0
        # Open SSE streams, to end when a drain has flushed them.
        self._streams: set[EventStream] = set()
        self.router = routes(self)

    @property
    def connections(self) -> int:
        """WebSocket and SSE connections admitted and not yet ended."""
        return self._open

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the hub, the writer, and the bridge when there is one, for as long as the context
        is open."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._supervise, "hub", self.hub.run)
            await tg.start(self._supervise, "writer", self.writer.run)
            if self.bridge is not None:
                deliver = partial(self.hub.publish_eagerly, source=Source.BACKPLANE)
                run = partial(self.bridge.run, place=self.hub.place, answer=self.hub.recovered)
                await tg.start(run, deliver)
            tg.start_soon(self._drain_when_asked)
            yield
            tg.cancel_scope.cancel()

    def request_drain(self, on_drained: Callable[[], None]) -> None:
        """Start draining (from the event loop's thread) and call ``on_drained`` when done.

        ``/readyz`` answers 503 at once and new WebSocket handshakes are refused with 503;
        outboxes get ``BROADCASTER_DRAIN_TIMEOUT`` seconds to flush. The server then stops,
        which closes every socket with 1001.
        """
        self.draining = True
        self._on_drained = on_drained
        self._drain_asked.set()

    async def _drain_when_asked(self) -> None:
        await self._drain_asked.wait()
        log = get_logger("broadcaster.app")
        log.info("drain_started", connections=self.hub.statistics().subscribers)
        with anyio.move_on_after(self.settings.drain_timeout) as deadline:
            for subscriber in self.hub.subscribers():
                await subscriber.outbox.wait_empty()
        left = sum(s.outbox.statistics().queued_messages for s in self.hub.subscribers())
        log.info("drain_finished", timed_out=deadline.cancelled_caught, messages_left=left)
        # The server closes WebSockets with 1001 as it stops; an HTTP response it would wait
        # for instead, so SSE streams end here.
        for events in self._streams:
            events.stop()
        self.drained.set()
        self._on_drained()

    async def publish(self, topic: str, data: Any) -> None:
        """Publish a JSON value to ``topic`` from application code, waiting for mailbox room.

        Raises:
            ProtocolError: ``topic`` is not a valid topic name.
            HubStopped: the hub is not running.
            BackplaneDown: history is shared through a broker that is down.
        """
        await self.hub.publish(validate_topic(topic), Payload.from_data(data))

    async def _supervise(
        self,
        actor: str,
        run: Callable[..., Awaitable[None]],
        *,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        try:
            await run(task_status=task_status)
        except Exception:
            get_logger("broadcaster.app").exception("actor_crashed", actor=actor)
            self._on_hub_failure()
            raise

    async def serve(self, websocket: WebSocket, topic: str | None) -> None:
        """Serve one WebSocket handshake on ``/ws`` (``topic`` ``None``) or ``/ws/{topic}``:
        refuse it, or accept it and run its connection until it ends."""
        peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else None
        try:
            grant = self._admit(websocket, topic)
            last = self._raw_last(websocket, topic)
        except Refused as refused:
            self.count_refusal(refused, peer)
            await websocket.send_denial_response(refusal(refused))
            return
        socket = _StarletteSocket(websocket)
        await self._connect(socket, websocket.accept, topic, grant, last, websocket.client)

    async def serve_events(self, scope: Scope, receive: Receive, send: Send, topic: str) -> None:
        """Serve one ``GET /sse/{topic}``: refuse it, or stream the topic as Server-Sent
        Events until the client goes (see :mod:`broadcaster.sse`)."""
        request = HTTPConnection(scope, receive)
        peer = f"{request.client.host}:{request.client.port}" if request.client else None
        try:
            grant = self._admit(request, topic)
            try:
                since, last = resume_point(request.headers, request.query_params)
            except ProtocolError as error:
                raise Refused(400, error.error, error.detail) from None
        except Refused as refused:
            self.count_refusal(refused, peer)
            await refusal(refused)(scope, receive, send)
            return
        events = EventStream(
            scope,
            receive,
            send,
            topic,
            since=since,
            last=last,
            ping_interval=self.settings.ping_interval,
        )
        self._streams.add(events)
        try:
            await self._connect(events, events.start, None, grant, None, request.client)
            await events.finish()
        finally:
            self._streams.discard(events)

    async def _connect(
        self,
        socket: Socket,
        accept: Callable[[], Awaitable[None]],
        topic: str | None,
        grant: Grant,
        last: int | None,
        client: Address | None,
    ) -> None:
        """Accept an admitted connection and run it until it ends."""
        peer = f"{client.host}:{client.port}" if client else None
        conn_id = secrets.token_hex(6)
        log = self._log.bind(conn_id=conn_id, peer=peer)
        self._open += 1
        try:
            await accept()
            closing = await Connection(
                socket,
                self.hub,
                self.settings,
                log,
                topic,
                grant=grant,
                last=last,
                writer=self.writer,
                conn_id=conn_id,
                peer=peer,
                totals=self.metrics.totals,
            ).run()
        finally:
            self._open -= 1
        if isinstance(closing, Flooding) and client is not None:
            self.penalties.punish(client.host, time.monotonic())

    def _admit(self, connection: HTTPConnection, topic: str | None) -> Grant:
        """Decide, before accepting, whether a handshake may open a connection.

        The cheap checks come first, so that a flood costs as little as possible.

        Raises:
            Refused: 503 ``draining`` or ``too_many_connections``, 429 ``rate_limited`` or
                ``flooding``,
                403 ``origin_not_allowed``, ``missing_token``, ``invalid_token``,
                ``token_expired`` or ``forbidden_topic``, 400 ``invalid_topic``.
        """
        if self.draining:
            raise Refused(503, "draining", "the server is shutting down")
        address, now = connection.client.host if connection.client else "", time.monotonic()
        if self.penalties.refuses(address, now):
            raise flooding(self.penalties.seconds)
        if not self._handshakes.allow(address, now):
            raise Refused(429, "rate_limited", "too many handshakes; retry shortly", RETRY)
        allowed = self.settings.allowed_origins
        # The header is looked up only when there is an allowlist to hold it to.
        if allowed and not origin_allowed(connection.headers.get("origin"), allowed):
            raise Refused(403, "origin_not_allowed", "pages of this origin may not connect")
        if self._open >= self.settings.max_connections:
            raise Refused(503, "too_many_connections", "the server is full; retry later", RETRY)
        if topic is not None:
            try:
                validate_topic(topic)
            except ProtocolError as error:
                raise Refused(400, error.error, error.detail) from None
        grant = self.auth.handshake(connection.headers, connection.query_params)
        if topic is not None and not grant.subscribe.matches(topic):
            raise Refused(403, "forbidden_topic", "the token does not allow this topic")
        return grant

    @staticmethod
    def _raw_last(websocket: WebSocket, topic: str | None) -> int | None:
        """Read a raw-mode socket's ``?last=K``: replay the latest K messages first.

        Raises:
            Refused: 400 ``invalid_last``.
        """
        text = websocket.query_params.get("last")
        if topic is None or text is None:
            return None
        try:
            return parse_query_count(text, "last", "invalid_last")
        except ProtocolError as error:
            raise Refused(400, error.error, error.detail) from None

    def count_refusal(self, refused: Refused, peer: str | None) -> None:
        """Count a refused request or connection, and log it at debug level.

        Debug level: a flood of refusals must not become a flood of log lines; the
        ``broadcaster_refused`` metric counts them all. The server's HTTP protocol counts its
        own refusals (431, 408, too many connections) here too.
        """
        self.metrics.totals.refused[refused.error] += 1
        self._log.debug("request_refused", peer=peer, status=refused.status, error=refused.error)


def create_app(
    settings: Settings | None = None, on_hub_failure: Callable[[], None] = lambda: None
) -> FastAPI:
    """Return a FastAPI app serving one broadcaster.

    Args:
        settings: defaults to ``Settings()``, read from ``BROADCASTER_*`` variables.
        on_hub_failure: see :class:`Broadcaster`.
    """
    live = Broadcaster(settings or Settings(), on_hub_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with live.lifespan():
            yield

    app = _App(live, title="broadcaster", lifespan=lifespan)
    app.include_router(live.router)
    app.state.broadcaster = live
    return app


# The answer to a plain HTTP request on a WebSocket path.
UPGRADE_REQUIRED = JSONResponse(
    {
        "error": "upgrade_required",
        "detail": "this path speaks WebSocket: connect with a WebSocket client "
        "(ws://HOST:PORT/ws, or /ws/TOPIC for raw mode)",
    },
    426,
    headers={"Upgrade": "websocket", "Connection": "Upgrade"},
)


class _App(FastAPI):
    """FastAPI, with the broadcaster's WebSocket upgrades, HTTP publishes and event streams
    served before its middleware and router.

    Each handshake and publish would otherwise pass through a dozen ASGI layers, and each
    connection keep their coroutines for its whole life; the routes stay in the router (and
    the OpenAPI schema) for apps that mount :attr:`Broadcaster.router` themselves.
    """

    def __init__(self, live: Broadcaster, **options: Any) -> None:
        super().__init__(**options)
        self._live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path = _path(scope)
            publish = _segment(path, "/publish/")
            websocket = path == "/ws" or _segment(path, "/ws/") is not None
            if scope["type"] == "http" and scope["method"] == "POST":
                if publish is not None:
                    await self._live.publishing.serve(publish, scope, receive, send)
                    return
                if path == "/publish":
                    response = await self._live.publishing.respond_batch(scope, receive)
                    await response(scope, receive, send)
                    return
            events = _segment(path, "/sse/")
            if scope["type"] == "http" and scope["method"] == "GET" and events is not None:
                await self._live.serve_events(scope, receive, send, events)
                return
            if scope["type"] == "websocket" and websocket:
                topic = _segment(path, "/ws/")
                await self._live.serve(WebSocket(scope, receive, send), topic)
                return
            if scope["type"] == "http" and websocket:
                # A browser or curl that asked for a WebSocket path without upgrading.
                await UPGRADE_REQUIRED(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _segment(path: str, prefix: str) -> str | None:
    """What follows ``prefix`` in ``path`` when it is one non-empty path segment."""
    rest = path[len(prefix) :]
    return rest if path.startswith(prefix) and rest and "/" not in rest else None


def _path(scope: Scope) -> str:
    """The request's path below the app's root path."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
