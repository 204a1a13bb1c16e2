"""Real servers and real clients on 127.0.0.1 for the integration tests."""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from broadcaster.app import Broadcaster, create_app
from broadcaster.server import bind, uvicorn_config
from broadcaster.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

# How often wait_until looks again; the deadline, not this, bounds the wait.
POLL_INTERVAL = 0.005


async def wait_until(predicate: Callable[[], bool], deadline: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test if it does not within ``deadline``.

    For state that offers no event to wait on, such as uvicorn's ``started`` flag or a
    server-side outbox seen from a client's test.
    """
    with anyio.fail_after(deadline):
        while not predicate():  # noqa: ASYNC110 - these states have no event to wait on
            await anyio.sleep(POLL_INTERVAL)


@dataclass
class LiveServer:
    """A uvicorn server running the app in this test's event loop."""

    server: uvicorn.Server
    broadcaster: Broadcaster
    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def running_server(
    settings: Settings | None = None, *, plain_asgi: bool = False
) -> AsyncIterator[LiveServer]:
    """Serve a fresh app on a pre-bound 127.0.0.1 port; stop it on exit.

    Args:
        settings: the server's settings.
        plain_asgi: serve with uvicorn's stock wsproto protocol, which offers no fastlane,
            as another ASGI server would.
    """
    settings = settings or Settings(log_format="json")
    sock = bind(settings.model_copy(update={"port": 0}))
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    if plain_asgi:
        config.ws = "wsproto"
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        await wait_until(lambda: server.started)
        yield LiveServer(server, app.state.broadcaster, sock.getsockname()[1])
        server.should_exit = True


@asynccontextmanager
async def client(
    url: str, *, receive_buffer: int | None = None, **options: Any
) -> AsyncIterator[ClientConnection]:
    """Connect a WebSocket client; ``receive_buffer`` shrinks its socket's SO_RCVBUF.

    A small receive buffer and ``max_queue=1`` make a client that stops reading stall the
    server's writes after a few frames instead of after several MiB.
    """
    sock = None
    if receive_buffer is not None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        host, port = url.split("//")[1].split("/")[0].split(":")
        sock.connect((host, int(port)))
        options.setdefault("max_queue", 1)
    async with connect(url, sock=sock, proxy=None, compression=None, **options) as connection:
        yield connection


async def receive_json(connection: ClientConnection) -> Any:
    """Receive one text frame and decode it."""
    with anyio.fail_after(10):
        return json.loads(await connection.recv())


async def subscribe(connection: ClientConnection, *topics: str) -> None:
    """Subscribe a multiplexed connection and wait for every acknowledgement."""
    for topic in topics:
        await connection.send(json.dumps({"op": "subscribe", "topic": topic}))
        assert await receive_json(connection) == {"op": "subscribed", "topic": topic}


async def receive_envelopes(connection: ClientConnection, count: int) -> list[dict[str, Any]]:
    """Receive ``count`` message envelopes, accepting objects and coalesced arrays."""
    envelopes: list[dict[str, Any]] = []
    while len(envelopes) < count:
        frame = await receive_json(connection)
        envelopes.extend(frame if isinstance(frame, list) else [frame])
    return envelopes
