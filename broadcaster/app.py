"""The FastAPI face: routes, the hub's lifespan, and ``create_app``.

This is the only module that imports FastAPI. :class:`Broadcaster` holds one hub and the
routes that reach it, so it can be mounted into an existing app as well as served alone.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import anyio
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from broadcaster.backplane import NODE_ID_BYTES, open_backplane
from broadcaster.backplane.bridge import Bridge
from broadcaster.connection import FASTLANE, Connection
from broadcaster.errors import HubBusy, HubStopped, ProtocolError
from broadcaster.hub import Hub, Source, Subscriber
from broadcaster.log import get_logger
from broadcaster.metrics import CONTENT_TYPE_LATEST, Metrics
from broadcaster.protocol import Payload, parse_json_body, validate_topic
from broadcaster.settings import MEMORY, Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from broadcaster.outbox import OutboxStatistics
    from broadcaster.protocol import Frame


class _StarletteSocket:
    """The :class:`broadcaster.connection.Socket` over a Starlette WebSocket.

    Frames go through the fastlane when the server offers one (see
    :class:`broadcaster.server.FastLane`), and as plain ASGI messages otherwise; the bytes on
    the wire are the same.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        lane = websocket.scope.get("extensions", {}).get(FASTLANE)
        self._lane: _Lane | None = lane["lane"] if lane else None
        self.fastlane = self._lane is not None

    async def receive(self) -> str | bytes | None:
        message = await self._websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text: str | None = message.get("text")
        return text if text is not None else message["bytes"]

    def writable(self) -> bool:
        # Plain ASGI says nothing about the transport: assume a send may wait.
        return self._lane is not None and self._lane.writable()

    async def send(self, frames: Sequence[Frame]) -> None:
        if self._lane is not None:
            await self._lane.write(b"".join([frame.wire for frame in frames]))
            return
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


class _Lane(Protocol):
    def writable(self) -> bool: ...

    async def write(self, wire: bytes) -> None: ...


class Broadcaster:
    """A hub, the bridge that shares it with other nodes (unless the backplane is
    ``memory``), and the routes that serve them.

    Args:
        settings: queue bounds, policies and timeouts.
        on_hub_failure: called if the hub crashes; the CLI uses it to stop the server, since
            a server whose hub is gone would accept connections that never receive anything.

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
        self.bridge = (
            None
            if settings.backplane == MEMORY
            else Bridge(
                open_backplane(settings),
                self.node,
                settings,
                get_logger("broadcaster.backplane"),
            )
        )
        self.metrics = Metrics(settings.overflow)
        self.hub = Hub(
            mailbox_size=settings.hub_mailbox_size,
            logger=get_logger("broadcaster.hub"),
            observe_fanout=self.metrics.fanout_seconds.observe,
            relay=self.bridge,
        )
        self.metrics.watch(self.hub, self.bridge)
        self.draining = False
        self._drain_asked = anyio.Event()
        self._on_drained: Callable[[], None] = lambda: None
        self._on_hub_failure = on_hub_failure
        self._log = get_logger("broadcaster.connection")
        self.router = self._routes()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the hub, and the bridge when there is one, for as long as the context is open."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._supervise)
            if self.bridge is not None:
                deliver = partial(self.hub.publish_eagerly, source=Source.BACKPLANE)
                await tg.start(self.bridge.run, deliver)
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
        self._on_drained()

    async def publish(self, topic: str, data: Any) -> None:
        """Publish a JSON value to ``topic`` from application code, waiting for mailbox room.

        Raises:
            ProtocolError: ``topic`` is not a valid topic name.
            HubStopped: the hub is not running.
        """
        await self.hub.publish(validate_topic(topic), Payload.from_data(data))

    async def _supervise(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await self.hub.run(task_status=task_status)
        except Exception:
            get_logger("broadcaster.hub").exception("hub_crashed")
            self._on_hub_failure()
            raise

    async def _serve(self, websocket: WebSocket, topic: str | None) -> None:
        if self.draining:
            body = {"error": "draining", "detail": "the server is shutting down"}
            await websocket.send_denial_response(JSONResponse(body, 503))
            return
        peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else None
        conn_id = uuid.uuid4().hex[:12]
        log = self._log.bind(conn_id=conn_id, peer=peer)
        socket = _StarletteSocket(websocket)
        await websocket.accept()
        await Connection(
            socket,
            self.hub,
            self.settings,
            log,
            topic,
            fastlane=socket.fastlane,
            conn_id=conn_id,
            peer=peer,
            totals=self.metrics.totals,
        ).run()

    def _routes(self) -> APIRouter:
        router = APIRouter()

        # Plain Starlette routes: FastAPI's dependency solving would cost every one of
        # thousands of idle connections a few KiB for nothing.
        @router.websocket_route("/ws")
        async def multiplexed(websocket: WebSocket) -> None:
            await self._serve(websocket, None)

        @router.websocket_route("/ws/{topic}")
        async def raw(websocket: WebSocket) -> None:
            topic = websocket.path_params["topic"]
            try:
                validate_topic(topic)
            except ProtocolError as error:
                body = {"error": error.error, "detail": error.detail}
                await websocket.send_denial_response(JSONResponse(body, 400))
                return
            await self._serve(websocket, topic)

        @router.post("/publish/{topic}")
        async def publish(topic: str, request: Request) -> JSONResponse:
            try:
                validate_topic(topic)
            except ProtocolError as error:
                raise HTTPException(400, error.detail) from None
            body = await self._read_body(request)
            try:
                payload = self._http_payload(request, body)
                pending = self.hub.publish_nowait(topic, payload, Source.HTTP)
            except HubBusy:
                raise HTTPException(
                    503, "the hub is busy; retry shortly", headers={"Retry-After": "1"}
                ) from None
            except HubStopped:
                raise HTTPException(503, "the hub is not running") from None
            receipt = await pending.wait()
            return JSONResponse(
                {"topic": receipt.topic, "seq": receipt.seq, "subscribers": receipt.subscribers}
            )

        @router.get("/healthz")
        async def healthz() -> JSONResponse:
            stats = self.hub.statistics()
            bridge = self.bridge.statistics() if self.bridge is not None else None
            body = {
                "status": "ok" if stats.running else "down",
                "node": self.node.hex(),
                "pid": os.getpid(),
                "connections": stats.subscribers,
                "backplane": None
                if bridge is None
                else {"up": bridge.up, "topics": bridge.subscribed},
            }
            return JSONResponse(body, 200 if stats.running else 503)

        @router.get("/readyz")
        async def readyz() -> JSONResponse:
            if self.draining:
                return JSONResponse({"status": "draining"}, 503)
            if not self.hub.statistics().running:
                return JSONResponse({"status": "down"}, 503)
            if self.bridge is not None:
                bridge = self.bridge.statistics()
                if not bridge.up:
                    body = {"status": "backplane_down", "detail": bridge.error or "connecting"}
                    return JSONResponse(body, 503)
            return JSONResponse({"status": "ready"})

        @router.get("/topics")
        async def topics() -> dict[str, int]:
            return dict(self.hub.statistics().topics)

        @router.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

        @router.get("/connections")
        async def connections(
            limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        ) -> list[dict[str, Any]]:
            """The connections holding the most queued bytes: who is slow right now."""
            now = time.monotonic()
            rows = [_describe(s, s.outbox.statistics(), now) for s in self.hub.subscribers()]
            rows.sort(key=lambda row: row["queued_bytes"], reverse=True)
            return rows[:limit]

        return router

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the body is larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"the body is larger than {limit} bytes")
        return bytes(body)

    @staticmethod
    def _http_payload(request: Request, body: bytes) -> Payload:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == "application/json":
            try:
                return parse_json_body(body)
            except ProtocolError as error:
                raise HTTPException(400, f"the body is not valid JSON: {error.detail}") from None
        if media_type == "application/octet-stream":
            return Payload(body)
        try:
            return Payload(body.decode())
        except UnicodeDecodeError:
            return Payload(body)


def _describe(subscriber: Subscriber, stats: OutboxStatistics, now: float) -> dict[str, Any]:
    oldest = None if stats.oldest_born is None else round(now - stats.oldest_born, 3)
    return {
        "conn_id": subscriber.conn_id,
        "peer": subscriber.peer,
        "mode": subscriber.mode.value,
        "subscriptions": len(subscriber.topics),
        "queued_messages": stats.queued_messages,
        "queued_bytes": stats.queued_bytes,
        "oldest_queued_seconds": oldest,
        "dropped": stats.dropped,
        "sent": stats.sent,
        "connected_seconds": round(now - subscriber.opened_at, 3),
    }


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

    app = FastAPI(title="broadcaster", lifespan=lifespan)
    app.include_router(live.router)
    app.state.broadcaster = live
    return app
