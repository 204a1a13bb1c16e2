"""broadcaster's own WebSocket protocol under uvicorn: every frame charged, every byte sent
bounded, and closes that say why."""

from __future__ import annotations

import base64
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import anyio
import anyio.abc
import pytest
from structlog.testing import capture_logs
from wsproto.events import CloseConnection, Ping

from broadcaster.settings import Settings
from broadcaster.ws_protocol import HIGH_WATER, WebSocketProtocol
from tests.support import (
    RawClient,
    client,
    flood,
    handshake_refusal,
    receive_json,
    running_server,
    subscribe,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.support import LiveServer

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (which leaves the payload as it is)."""
    length = len(payload)
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 1 << 16:
        size = bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + length.to_bytes(8, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + size + b"\0\0\0\0" + payload


@asynccontextmanager
async def raw_client(live: LiveServer, path: str) -> AsyncIterator[RawClient]:
    """A connected raw client, closed on exit."""
    raw = await RawClient.connect(live, path)
    async with raw.stream:
        yield raw


def protocols(live: LiveServer) -> list[WebSocketProtocol]:
    """The server's open WebSocket connections."""
    connections = cast("set[object]", live.server.server_state.connections)
    return [c for c in connections if isinstance(c, WebSocketProtocol)]


async def close_seen(raw: RawClient) -> tuple[int, str]:
    """Read what the server sends until its close frame; return its code and reason."""
    with anyio.fail_after(10):
        while True:
            for event in raw._feed(await raw._read()):
                if isinstance(event, CloseConnection):
                    return event.code, event.reason or ""


async def send_until_closed(
    raw: RawClient, chunk: bytes, limit: int = 2_000, first: bytes = b""
) -> None:
    """Send ``first``, then ``chunk`` over and over (at most ``limit`` times) until the server
    stops taking it."""
    with anyio.move_on_after(10):
        await raw.stream.send(first)
        for _ in range(limit):
            try:
                await raw.stream.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return


FLOODS = {
    "continuation": (frame(TEXT, b"a", fin=False), frame(CONTINUATION, fin=False)),
    "ping": (b"", frame(PING, b"p" * 125)),
    "pong": (b"", frame(PONG, b"p" * 125)),
    "tiny message": (b"", frame(BINARY, b"x")),
}


@pytest.mark.parametrize("kind", FLOODS)
async def test_a_flood_of_any_frame_kind_is_closed_with_1008_and_spares_others(kind: str) -> None:
    """Frames of every kind count against the rate limit; the flooder alone is closed."""
    first, each = FLOODS[kind]
    settings = Settings(max_messages_per_second=500, log_format="json")
    async with running_server(settings) as live, client(live.ws_url()) as good:
        await subscribe(good, "t")
        async with raw_client(live, "/ws/flood") as raw:
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_until_closed, raw, each * 100, 2_000, first)
                assert await close_seen(raw) == (1008, "rate limit exceeded")
            await live.broadcaster.publish("t", "still here")
            assert await receive_json(good) == {"topic": "t", "seq": 1, "data": "still here"}
            await wait_until(lambda: live.broadcaster.metrics.totals.closed["1008"] == 1)


async def test_fragments_count_toward_the_message_size_as_they_arrive() -> None:
    """A message whose fragments pass MAX_MESSAGE_BYTES is closed with 1009 before it ends."""
    settings = Settings(max_message_bytes=1024, log_format="json")
    async with running_server(settings) as live:
        async with raw_client(live, "/ws") as raw:
            await raw.stream.send(frame(TEXT, b"a" * 500, fin=False))
            for _ in range(3):
                await raw.stream.send(frame(CONTINUATION, b"a" * 500, fin=False))
            assert await close_seen(raw) == (1009, "message too big")


async def test_a_client_that_pings_and_never_reads_is_owed_one_pong() -> None:
    """Reading stops while writes are paused, so pongs never pile up past the high-water mark."""
    async with running_server() as live:
        async with raw_client(live, "/ws/quiet") as raw:
            (protocol,) = protocols(live)
            pings = frame(PING, b"p" * 125) * 100
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_until_closed, raw, pings, 5_000)
                await wait_until(lambda: not protocol.statistics().reading)
                assert protocol.statistics().write_buffer <= HIGH_WATER + 256
                tg.cancel_scope.cancel()


async def test_each_socket_gets_the_configured_send_buffer() -> None:
    """The kernel's send buffer is the setting, not autotuned to megabytes."""
    settings = Settings(socket_send_buffer=32 * 1024, log_format="json")
    async with running_server(settings) as live, client(live.ws_url()) as connection:
        await subscribe(connection, "t")
        (protocol,) = protocols(live)
        assert protocol.statistics().send_buffer == 32 * 1024


async def test_a_client_with_unread_messages_and_no_pong_is_a_slow_consumer() -> None:
    """A ping unanswered behind messages the client has not read closes it with 1013."""
    settings = Settings(ping_interval=0.2, ping_timeout=0.2, log_format="json")
    async with running_server(settings) as live:
        async with raw_client(live, "/ws/feed") as raw:
            await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"feed": 1})
            with capture_logs() as events:
                await live.broadcaster.publish("feed", "unread")
                assert await close_seen(raw) == (1013, "slow consumer")
                await wait_until(lambda: live.broadcaster.hub.statistics().topics == {})
            totals = live.broadcaster.metrics.totals
            assert totals.slow_consumers["ping_timeout"] == 1
            (closed,) = [e for e in events if e["event"] == "connection_closed"]
            assert (closed["code"], closed["cause"]) == (1013, "ping_timeout")


async def test_a_client_that_stops_answering_pings_is_closed_with_1008() -> None:
    """A client with nothing unread that stops answering pings is closed as unresponsive."""
    settings = Settings(ping_interval=0.2, ping_timeout=0.2, log_format="json")
    async with running_server(settings) as live:
        async with raw_client(live, "/ws/quiet") as raw:
            assert await close_seen(raw) == (1008, "ping timeout")


async def test_pings_are_answered_and_keep_a_connection_open() -> None:
    """The server pings on its interval, and a client that answers is kept."""
    settings = Settings(ping_interval=0.1, ping_timeout=0.5, log_format="json")
    async with running_server(settings) as live:
        async with raw_client(live, "/ws/quiet") as raw:
            answered = 0
            with anyio.fail_after(10):
                while answered < 5:
                    for event in raw._feed(await raw._read()):
                        assert not isinstance(event, CloseConnection)
                        if isinstance(event, Ping):
                            await raw.stream.send(raw.protocol.send(event.response()))
                            answered += 1
            await live.broadcaster.publish("quiet", "hello")
            await raw.read_messages(1)
            assert raw.messages == ["hello"]


async def test_shutdown_closes_with_1001_and_logs_why() -> None:
    """Stopping the server closes each socket with 1001, and the log says so."""
    with capture_logs() as events:
        async with running_server() as live, client(live.ws_url()) as connection:
            await subscribe(connection, "t")
            live.server.should_exit = True
            with anyio.fail_after(10):
                await connection.wait_closed()
            assert (connection.close_code, connection.close_reason) == (
                1001,
                "server shutting down",
            )
    (closed,) = [e for e in events if e["event"] == "connection_closed"]
    assert (closed["code"], closed["reason"]) == (1001, "server shutting down")


async def handshake(live: LiveServer, request: bytes) -> bytes:
    """Send a raw upgrade request and return the response head."""
    async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
        await stream.send(request)
        response = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in response:
                response += await stream.receive()
    return response


def upgrade(version: bytes = b"13", key: bytes | None = None, extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16)) if key is None else key
    return (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: "
        + version
        + b"\r\nSec-WebSocket-Key: "
        + key
        + b"\r\n"
        + extra
        + b"\r\n"
    )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade(version=b"8"), b"426"),
        (upgrade(key=b"short"), b"400"),
        (upgrade().replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"), b"101"),
        (upgrade(extra=b"Sec-WebSocket-Protocol: chat, other\r\n"), b"101"),
    ],
)
async def test_the_handshake_is_checked(request_bytes: bytes, status: bytes) -> None:
    """Bad versions get 426 with the version we speak, bad keys 400, good requests 101."""
    async with running_server() as live:
        response = await handshake(live, request_bytes)
    assert response.split(b" ")[1] == status
    if status == b"426":
        assert b"sec-websocket-version: 13" in response.lower()


async def test_messages_of_both_kinds_and_fragments_reach_the_app() -> None:
    """A fragmented text message and a binary one are published whole, then a close is
    answered."""
    async with running_server() as live, client(live.ws_url("/ws/mixed")) as listener:
        async with raw_client(live, "/ws/mixed") as raw:
            await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"mixed": 2})
            await raw.stream.send(
                frame(TEXT, "hé".encode(), fin=False) + frame(CONTINUATION, b"llo")
            )
            await raw.stream.send(frame(BINARY, b"\x00\x01"))
            with anyio.fail_after(10):
                assert [await listener.recv(), await listener.recv()] == ["héllo", b"\x00\x01"]
            await raw.stream.send(frame(CLOSE, (1000).to_bytes(2, "big")))
            assert await close_seen(raw) == (1000, "")


async def test_a_flooders_address_is_refused_for_the_penalty() -> None:
    """After a close for flooding, the address gets 429 ``flooding`` until its penalty ends."""
    settings = Settings(max_messages_per_second=100, flood_penalty=600, log_format="json")
    async with running_server(settings) as live:
        assert await flood(live.ws_url()) == (1008, "rate limit exceeded")
        status, error, headers = await handshake_refusal(live.ws_url())
        assert (status, error, headers["retry-after"]) == (429, "flooding", "600")
        assert live.broadcaster.metrics.totals.refused["flooding"] == 1


async def test_no_penalty_when_it_is_off() -> None:
    """FLOOD_PENALTY=0 lets a flooder's address connect again at once."""
    settings = Settings(max_messages_per_second=100, flood_penalty=0, log_format="json")
    async with running_server(settings) as live:
        assert await flood(live.ws_url()) == (1008, "rate limit exceeded")
        async with client(live.ws_url()) as again:
            await subscribe(again, "t")
