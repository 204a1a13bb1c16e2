"""End-to-end failure paths: bad input, abrupt drops, timeouts and shutdown."""

from __future__ import annotations

import socket
import struct
from contextlib import suppress

import anyio
import httpx
import pytest
from fastapi import FastAPI
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed

from broadcaster.app import Broadcaster
from broadcaster.policy import Overflow
from broadcaster.settings import Settings
from tests.support import (
    client,
    handshake_refusal,
    receive_json,
    running_server,
    subscribe,
    wait_until,
)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("not json", "invalid_json"),
        ('{"op": "subscribe", "topic": NaN}', "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"op": "dance"}', "unknown_op"),
        ('{"topic": "a"}', "unknown_op"),
        ('{"op": "subscribe"}', "missing_field"),
        ('{"op": "publish", "topic": "a"}', "missing_field"),
        ('{"op": "subscribe", "topic": ""}', "invalid_topic"),
        ('{"op": "subscribe", "topic": "has space"}', "invalid_topic"),
        ('{"op": "subscribe", "topic": "' + "t" * 129 + '"}', "invalid_topic"),
        ('{"op": "publish", "topic": 7, "data": 1}', "invalid_topic"),
        (b"\x00binary", "binary_frame"),
    ],
)
async def test_bad_frame_gets_an_error_frame_and_the_connection_stays_open(
    frame: str | bytes, error: str
) -> None:
    """Every malformed frame is answered with its error code; the connection keeps working."""
    async with running_server() as live, client(live.ws_url()) as connection:
        await connection.send(frame)
        answer = await receive_json(connection)
        assert answer["op"] == "error"
        assert answer["error"] == error
        assert answer["detail"]
        await connection.send('{"op": "ping"}')
        assert await receive_json(connection) == {"op": "pong"}


async def test_bad_input_does_not_disturb_other_clients() -> None:
    """A client sending garbage does not delay or break another client's delivery."""
    async with (
        running_server() as live,
        client(live.ws_url()) as rogue,
        client(live.ws_url()) as good,
    ):
        await subscribe(good, "t")
        for _ in range(50):
            await rogue.send("{{{")
        await rogue.send('{"op": "publish", "topic": "t", "data": [1]}')
        assert await receive_json(good) == {"topic": "t", "seq": 1, "data": [1]}
        for _ in range(50):
            assert (await receive_json(rogue))["error"] == "invalid_json"


@pytest.mark.parametrize("path", ["/ws", "/ws/big"])
async def test_oversized_frame_closes_with_1009(path: str) -> None:
    """A frame over BROADCASTER_MAX_MESSAGE_BYTES closes that connection with 1009."""
    settings = Settings(max_message_bytes=1024, log_format="json")
    async with running_server(settings) as live, client(live.ws_url(path)) as connection:
        await connection.send("x" * 1025)
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await connection.recv()
        assert connection.close_code == 1009


async def test_raw_mode_rejects_an_invalid_topic_with_http_400() -> None:
    """A raw-mode URL with an invalid topic is refused at the handshake with 400."""
    async with running_server() as live:
        status, error, _ = await handshake_refusal(live.ws_url("/ws/bad%20topic"))
        assert (status, error) == (400, "invalid_topic")


async def test_abrupt_tcp_reset_leaves_no_subscription() -> None:
    """A client whose TCP connection is reset without a close frame is unsubscribed."""
    async with running_server() as live:
        async with client(live.ws_url()) as connection:
            await subscribe(connection, "a", "b")
            assert live.broadcaster.hub.statistics().topics == {"a": 1, "b": 1}
            sock = connection.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.transport.abort()
        await wait_until(lambda: live.broadcaster.hub.statistics().subscribers == 0)
        assert live.broadcaster.hub.statistics().topics == {}


async def test_shutdown_closes_clients_with_1001() -> None:
    """Stopping the server closes every open WebSocket with 1001."""
    async with running_server() as live, client(live.ws_url()) as connection:
        await subscribe(connection, "a")
        live.server.should_exit = True
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await connection.recv()
        assert connection.close_code == 1001


async def test_stalled_socket_write_is_cut_off_by_the_send_timeout() -> None:
    """A write that cannot finish within SEND_TIMEOUT closes the client with 1013."""
    settings = Settings(
        overflow=Overflow.DROP_OLDEST,
        send_timeout=0.2,
        lag_timeout=600,
        queue_max_messages=10_000,
        queue_max_bytes=64 * 1024 * 1024,
        log_format="json",
    )
    async with (
        running_server(settings) as live,
        client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled,
    ):
        await subscribe(stalled, "feed")
        with capture_logs() as logs:
            while live.broadcaster.hub.statistics().subscribers:
                await live.broadcaster.publish("feed", "x" * 60_000)
        closes = [e for e in logs if e["event"] == "connection_closed"]
        assert [(e["code"], e["cause"]) for e in closes] == [(1013, "send_timeout")]
        with anyio.fail_after(20), suppress(ConnectionClosed):
            async for _ in stalled:
                pass
        assert (stalled.close_code, stalled.close_reason) == (1013, "slow consumer")


async def test_http_publish_rejects_bad_requests() -> None:
    """Bad topics, bodies and oversize bodies get 400 and 413 without reaching anyone."""
    settings = Settings(max_message_bytes=1024, log_format="json")
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        bad_topic = await http.post("/publish/bad%20topic", content="x")
        bad_json = await http.post(
            "/publish/t", content="{", headers={"content-type": "application/json"}
        )
        nan = await http.post(
            "/publish/t", content="NaN", headers={"content-type": "application/json"}
        )
        too_big = await http.post("/publish/t", content="x" * 1025)
        assert [r.status_code for r in (bad_topic, bad_json, nan, too_big)] == [400, 400, 400, 413]
        assert dict(live.broadcaster.hub.statistics().published) == {}


async def test_http_publish_answers_503_when_the_hub_is_not_running() -> None:
    """Without a running hub a publish is refused with 503 instead of hanging."""
    live = Broadcaster(Settings(log_format="json"))
    app = FastAPI()
    app.include_router(live.router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        publish = await http.post("/publish/t", content="x")
        health = await http.get("/healthz")
    assert publish.status_code == 503
    assert health.status_code == 503


async def test_invalid_utf8_text_frame_closes_with_1007_and_spares_others() -> None:
    """A text frame that is not UTF-8 closes that client with 1007; others keep receiving."""
    async with (
        running_server() as live,
        client(live.ws_url()) as rogue,
        client(live.ws_url()) as good,
    ):
        await subscribe(good, "t")
        await rogue.send(b"\xff\xfe", text=True)
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await rogue.recv()
        assert rogue.close_code == 1007
        await live.broadcaster.publish("t", "still here")
        assert await receive_json(good) == {"topic": "t", "seq": 1, "data": "still here"}
