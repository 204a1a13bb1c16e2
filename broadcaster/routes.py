"""The routes of a :class:`broadcaster.app.Broadcaster`: the WebSocket and SSE endpoints,
publishing, history, health, metrics, the operators' views and the browser assets.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, HTTPException, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import HTTPConnection
from starlette.routing import Route

from broadcaster.dashboard import check_admin, slowest, snapshot, stream
from broadcaster.errors import RETRY, BackplaneDown, HubStopped, ProtocolError, Refused
from broadcaster.metrics import CONTENT_TYPE_LATEST
from broadcaster.protocol import history_body, parse_history_query, validate_topic

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.types import Receive, Scope, Send

    from broadcaster.app import Broadcaster

# The browser client, its type declarations, the page at / and the dashboard's.
STATIC = Path(__file__).parent / "static"


def routes(live: Broadcaster) -> APIRouter:
    """The HTTP and WebSocket routes of ``live``: what :attr:`Broadcaster.router` holds."""
    router = APIRouter()

    # Plain Starlette routes: FastAPI's dependency solving would cost every one of
    # thousands of idle connections a few KiB for nothing.
    @router.websocket_route("/ws")
    async def multiplexed(websocket: WebSocket) -> None:
        await live.serve(websocket, None)

    @router.websocket_route("/ws/{topic}")
    async def raw(websocket: WebSocket) -> None:
        await live.serve(websocket, websocket.path_params["topic"])

    @router.post("/publish/{topic}")
    async def publish(topic: str, request: Request) -> Response:
        """Publish the body to ``topic``; answer with its receipt (see docs/protocol.md)."""
        return await live.publishing.respond(topic, request.scope, request.receive)

    @router.post("/publish")
    async def publish_batch(request: Request) -> Response:
        """Publish a batch: a JSON array or JSON lines of ``{"topic", "data"}`` items, or
        ``{"topics": [...], "data"}`` broadcasts; answer with one result per item and
        topic, in order (see the README)."""
        return await live.publishing.respond_batch(request.scope, request.receive)

    @router.get("/history/{topic}")
    async def history(topic: str, request: Request) -> Response:
        peer = f"{request.client.host}:{request.client.port}" if request.client else None
        try:
            validate_topic(topic)
            grant = live.auth.handshake(request.headers, request.query_params)
            if not grant.subscribe.matches(topic):
                raise Refused(403, "forbidden_topic", "the token does not allow this topic")
        except ProtocolError as error:
            raise HTTPException(400, {"error": error.error, "detail": error.detail}) from None
        except Refused as refused:
            live.count_refusal(refused, peer)
            raise HTTPException(refused.status, refused.detail, refused.headers) from None
        return await history_page(live, topic, request)

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        stats = live.hub.statistics()
        bridge = live.bridge.statistics() if live.bridge is not None else None
        body = {
            "status": "ok" if stats.running else "down",
            "node": live.node.hex(),
            "pid": os.getpid(),
            "connections": stats.subscribers,
            "backplane": None if bridge is None else {"up": bridge.up, "topics": bridge.subscribed},
        }
        return JSONResponse(body, 200 if stats.running else 503)

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        if live.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not live.hub.statistics().running:
            return JSONResponse({"status": "down"}, 503)
        if live.bridge is not None:
            bridge = live.bridge.statistics()
            if not bridge.up:
                body = {"status": "backplane_down", "detail": bridge.error or "connecting"}
                return JSONResponse(body, 503)
        return JSONResponse({"status": "ready"})

    @router.get("/topics")
    async def topics(request: Request) -> Response:
        """Each topic's subscriber count; needs the admin token."""
        return admin_refusal(live, request) or JSONResponse(dict(live.hub.statistics().topics))

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(live.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    client_js = (STATIC / "client.js").read_bytes()
    client_types = (STATIC / "client.d.ts").read_bytes()
    dashboard_html = (STATIC / "dashboard.html").read_bytes()
    dashboard_js = (STATIC / "dashboard.js").read_bytes()

    @router.get("/client.js", include_in_schema=False)
    async def client() -> Response:
        # Deno and other runtimes that load modules by URL find the types in this header.
        types = {"X-TypeScript-Types": "./client.d.ts"}
        return Response(client_js, media_type="text/javascript", headers=types)

    @router.get("/client.d.ts", include_in_schema=False)
    async def client_declarations() -> Response:
        return Response(client_types, media_type="application/typescript; charset=utf-8")

    if live.settings.demo:
        index_html = (STATIC / "index.html").read_bytes()

        @router.get("/", include_in_schema=False)
        async def index() -> Response:
            return HTMLResponse(index_html)

    @router.get("/connections")
    async def connections(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 20
    ) -> Response:
        """The connections holding the most queued bytes: who is slow right now; needs the
        admin token."""
        return admin_refusal(live, request) or JSONResponse(slowest(live.hub, limit))

    @router.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        """The live dashboard page; needs the admin token (``?token=`` in a browser)."""
        refusal = admin_refusal(live, request)
        return refusal or Response(dashboard_html, media_type="text/html")

    @router.get("/dashboard.js")
    async def dashboard_script() -> Response:
        """The dashboard page's script; it holds no data."""
        return Response(dashboard_js, media_type="text/javascript")

    async def dashboard_events(scope: Scope, receive: Receive, send: Send) -> None:
        refusal = admin_refusal(live, HTTPConnection(scope, receive))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        make = partial(snapshot, live.metrics.registry, live.hub, live.bridge)
        await stream(scope, receive, send, make, live.settings.send_timeout, live.drained)

    async def events(scope: Scope, receive: Receive, send: Send) -> None:
        await live.serve_events(scope, receive, send, scope["path_params"]["topic"])

    # Plain ASGI endpoints: each streams for as long as its client stays.
    router.routes.append(Route("/dashboard/events", _Endpoint(dashboard_events), methods=["GET"]))
    router.routes.append(Route("/sse/{topic}", _Endpoint(events), methods=["GET"]))
    return router


class _Endpoint:
    """An ASGI callable that Starlette's router serves as it is, rather than as a function
    taking a request."""

    __slots__ = ("_serve",)

    def __init__(self, serve: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(scope, receive, send)


def admin_refusal(live: Broadcaster, request: HTTPConnection) -> Response | None:
    """The refusal of a request for an operators' view, ``None`` to serve it."""
    host = request.client.host if request.client else ""
    try:
        check_admin(live.settings.admin_token, request.headers, request.query_params, host)
    except Refused as refused:
        live.count_refusal(refused, f"{host}:{request.client.port}" if request.client else None)
        return refusal(refused)
    return None


async def history_page(live: Broadcaster, topic: str, request: Request) -> Response:
    """Answer ``GET /history/{topic}``; the caller has checked the grant.

    Raises:
        HTTPException: 400 on a bad parameter, 503 when the hub is not running or the
            broker that keeps a shared history is down.
    """
    try:
        since, limit = parse_history_query(request.query_params, live.settings.recovery_max)
    except ProtocolError as error:
        raise HTTPException(400, {"error": error.error, "detail": error.detail}) from None
    if live.bridge is not None and live.bridge.sequenced:
        try:
            position, shared, entries = await live.bridge.page(topic, since, limit)
        except BackplaneDown as error:
            raise HTTPException(503, str(error), RETRY) from None
        envelopes = [payload.envelope(topic, seq) for seq, payload in entries]
        return Response(
            history_body(topic, position, shared, envelopes), media_type="application/json"
        )
    try:
        position, recovered, frames = live.hub.history(topic, since, limit)
    except HubStopped:
        raise HTTPException(503, "the hub is not running") from None
    body = history_body(topic, position, None if since is None else recovered, frames)
    return Response(body, media_type="application/json")


def refusal(refused: Refused) -> JSONResponse:
    """The JSON answer to a refused request."""
    body = {"error": refused.error, "detail": refused.detail}
    return JSONResponse(body, refused.status, headers=refused.headers)
