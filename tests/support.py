"""Real servers and real clients on 127.0.0.1 for the integration tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import anyio
import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from broadcaster.app import Broadcaster, create_app
from broadcaster.server import bind, uvicorn_config
from broadcaster.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from anyio.abc import SocketStream
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from websockets.datastructures import Headers

# How often wait_until looks again; the deadline, not this, bounds the wait.
POLL_INTERVAL = 0.005
# Credentials for servers that require them.
PUBLISH_TOKEN = "publish-token-0123456789"
JWT_SECRET = "jwt-secret-" + "0123456789" * 6


def json_settings(**overrides: Any) -> Settings:
    """Default settings with JSON logs, and ``overrides``."""
    return Settings.model_validate({"log_format": "json", **overrides})


def token(
    *,
    subscribe: object = None,
    publish: object = None,
    lifetime: float | None = 3600,
    secret: str | EllipticCurvePrivateKey = JWT_SECRET,
    algorithm: str = "HS256",
) -> str:
    """Sign a JWT with these topic claims, expiring ``lifetime`` seconds from now (never
    when ``None``); a claim that is ``None`` is left out. ``secret`` is an HS* secret or an
    ES256 private key."""
    claims: dict[str, object] = {"sub": "test"}
    if subscribe is not None:
        claims["subscribe"] = subscribe
    if publish is not None:
        claims["publish"] = publish
    if lifetime is not None:
        claims["exp"] = int(time.time() + lifetime)
    return jwt.encode(claims, secret, algorithm=algorithm)


def pem(key: PublicKeyTypes) -> str:
    """The PEM text of a public key."""
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


# Seconds a server process gets to stop on SIGTERM before it is killed.
STOP_SECONDS = 20


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


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(live: LiveServer) -> Samples:
    """Return every sample at /metrics, keyed by name and labels."""
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


Health = dict[str, dict[str, Any]]


async def node_health(base_url: str, nodes: int, until: Callable[[Health], bool]) -> Health:
    """Ask ``/healthz`` over a new connection each time, keeping each node's last answer by its
    id, until ``nodes`` nodes have answered and ``until`` holds for the answers.

    Behind one port with several workers, each new connection may land on another worker.
    """
    answers: Health = {}
    with anyio.fail_after(10):
        while len(answers) < nodes or not until(answers):
            async with httpx.AsyncClient(base_url=base_url, trust_env=False) as http:
                answer = (await http.get("/healthz")).json()
            answers[answer["node"]] = answer
    return answers


def subscribed_to(topics: int) -> Callable[[Health], bool]:
    """Whether every node has its backplane up with ``topics`` topics subscribed."""
    return lambda answers: all(
        answer["backplane"] == {"up": True, "topics": topics} for answer in answers.values()
    )


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


async def handshake_refusal(url: str, **options: Any) -> tuple[int, str | None, Headers]:
    """Attempt a handshake that must be refused; return its status, error code and headers.

    Every refusal carries its status's standard reason phrase, which some clients show.
    """
    with pytest.raises(InvalidStatus) as refused:
        async with client(url, **options):
            pass
    response = refused.value.response
    assert response.reason_phrase == HTTPStatus(response.status_code).phrase
    return response.status_code, json.loads(response.body or b"{}").get("error"), response.headers


async def drain(connection: ClientConnection) -> None:
    """Read whatever the server sends until it closes the connection."""
    with anyio.fail_after(30), suppress(ConnectionClosed):
        async for _ in connection:
            pass


async def closed_after(connection: ClientConnection, frame: str | bytes) -> tuple[int, str]:
    """Send ``frame``, read until the server closes, and return the close code and reason."""
    await connection.send(frame)
    await drain(connection)
    return connection.close_code or 0, connection.close_reason or ""


async def flood(url: str, frame: str = '{"op": "ping"}', limit: int = 10_000) -> tuple[int, str]:
    """Connect and send ``frame`` without pause, reading what comes back, until the server
    closes the connection (at most ``limit`` times); return the close code and reason."""
    async with client(url) as connection, anyio.create_task_group() as tg:
        tg.start_soon(drain, connection)
        with suppress(ConnectionClosed):
            for _ in range(limit):
                await connection.send(frame)
                # A send that fits the buffer does not yield: let the client read the close.
                await anyio.lowlevel.checkpoint()
    return connection.close_code or 0, connection.close_reason or ""


async def receive_json(connection: ClientConnection) -> Any:
    """Receive one text frame and decode it."""
    with anyio.fail_after(10):
        return json.loads(await connection.recv())


async def subscribe(connection: ClientConnection, *topics: str) -> None:
    """Subscribe a multiplexed connection and wait for every acknowledgement."""
    for topic in topics:
        await connection.send(json.dumps({"op": "subscribe", "topic": topic}))
        answer = await receive_json(connection)
        assert answer == {"op": "subscribed", "topic": topic, "epoch": ANY, "seq": ANY}


async def receive_envelopes(connection: ClientConnection, count: int) -> list[dict[str, Any]]:
    """Receive ``count`` message envelopes, accepting objects and coalesced arrays."""
    envelopes: list[dict[str, Any]] = []
    while len(envelopes) < count:
        frame = await receive_json(connection)
        envelopes.extend(frame if isinstance(frame, list) else [frame])
    return envelopes


@contextmanager
def serving(
    env: dict[str, str] | None = None, *args: str
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start ``broadcaster serve --port 0 ARGS`` and read the port it bound from its first log
    line; stop it with SIGTERM (then SIGKILL) on exit, so that it writes its coverage data.

    Its other log lines are left unread: a test must not log more than a pipe holds.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "broadcaster", "serve", "--port", "0", *args],
        env={**os.environ, **(env or {}), "BROADCASTER_LOG_FORMAT": "json"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first = json.loads(process.stderr.readline())
        assert first["event"] == "server_starting"
        yield process, first["port"]
    finally:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


class RawClient:
    """A WebSocket client that keeps every byte the server sent after the handshake."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.protocol = WSConnection(ConnectionType.CLIENT)
        self.wire = bytearray()
        self.messages: list[str | bytes] = []
        self._partial: list[str | bytes] = []

    @classmethod
    async def connect(cls, live: LiveServer, path: str) -> RawClient:
        """Connect and complete the opening handshake."""
        client = cls(await anyio.connect_tcp("127.0.0.1", live.port))
        await client.stream.send(client.protocol.send(Request(host="127.0.0.1", target=path)))
        while not any(isinstance(e, AcceptConnection) for e in client._feed(await client._read())):
            pass
        client.wire.clear()
        return client

    async def send_text(self, text: str) -> None:
        """Send one text message."""
        await self.stream.send(self.protocol.send(TextMessage(data=text)))

    async def read_messages(self, count: int) -> None:
        """Read until ``count`` messages have arrived in all."""
        with anyio.fail_after(10):
            while len(self.messages) < count:
                data = await self._read()
                self.wire += data
                for event in self._feed(data):
                    if isinstance(event, Message):
                        self._partial.append(event.data)
                        if event.message_finished:
                            joined = self._partial[0][:0].join(self._partial)  # type: ignore[arg-type]
                            self.messages.append(joined)
                            self._partial.clear()

    async def _read(self) -> bytes:
        return await self.stream.receive()

    def _feed(self, data: bytes) -> list[object]:
        self.protocol.receive_data(data)
        return list(self.protocol.events())


@dataclass
class Event:
    """One Server-Sent Event, or a comment (``event`` ``":"``, the text in ``data``)."""

    event: str = "message"
    data: str = ""
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    """Parse a streamed ``text/event-stream`` response into events as they arrive."""
    event = Event()
    async for line in response.aiter_lines():
        if not line:
            if event.data or event.event != "message" or event.id is not None:
                yield event
            event = Event()
        elif line.startswith(":"):
            yield Event(":", line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                event.data = f"{event.data}\n{value}" if event.data else value
            elif name == "event":
                event.event = value
            elif name == "id":
                event.id = value
