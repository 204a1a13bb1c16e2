"""HTTP bounded in time, size and number: a live server attacked with raw sockets on
127.0.0.1, and the connection gate on its own."""

from __future__ import annotations

import json
import logging
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import httpx
import uvicorn
from structlog.testing import capture_logs

from broadcaster.app import create_app
from broadcaster.http_gate import GateStatistics, HTTPGate, HTTPLimits
from broadcaster.http_protocol import BODY_RATE_GRACE, HTTPProtocol
from broadcaster.policy import PenaltyBox
from broadcaster.server import bind, uvicorn_config
from broadcaster.settings import Settings
from tests.support import (
    PUBLISH_TOKEN,
    client,
    json_settings,
    running_server,
    scrape,
    subscribe,
    wait_until,
)

if TYPE_CHECKING:
    from collections import Counter

    import pytest
    from anyio.abc import SocketStream

    from tests.support import LiveServer

# Requests that close their connection once answered, so that a test can read to the end.
HEAD = (
    b"POST /publish/t HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    b"Content-Length: 100\r\n\r\n"
)
# The same, on a connection that stays open for another request.
KEEP_ALIVE_HEAD = HEAD.replace(b"Connection: close\r\n", b"")
GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
# Seconds between two bytes of a trickled body: the attacker's pace, not a synchronisation.
TRICKLE = 0.05
# Seconds a refusal may come after its deadline on a busy machine.
SLACK = 5.0


@dataclass
class Answer:
    """An HTTP response as read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error(self) -> str:
        """The ``error`` code of a JSON refusal."""
        return str(json.loads(self.body)["error"])


def parse(wire: bytes) -> Answer:
    """Parse one response (with a Content-Length) from the bytes a server sent."""
    head, _, rest = wire.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return Answer(int(lines[0].split()[1]), headers, rest[: int(headers["content-length"])])


async def read_all(stream: SocketStream) -> bytes:
    """Read until the server closes the connection (or resets it)."""
    wire = bytearray()
    with anyio.fail_after(10), suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            wire += await stream.receive()
    return bytes(wire)


async def exchange(port: int, request: bytes, local_host: str | None = None) -> Answer:
    """Send ``request`` on a new connection and read the answer until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", port, local_host=local_host) as stream:
        with suppress(anyio.BrokenResourceError):
            await stream.send(request)
        return parse(await read_all(stream))


def refused(live: LiveServer) -> Counter[str]:
    """The refusals the server has counted, by error code."""
    return live.broadcaster.metrics.totals.refused


def gate(live: LiveServer) -> HTTPGate:
    """The server's HTTP connection gate."""
    protocol = live.server.config.http_protocol_class
    assert issubclass(protocol, HTTPProtocol)
    assert protocol.gate is not None
    return protocol.gate


async def requests_done(live: LiveServer) -> None:
    """Wait until the app has finished every request it started."""
    await wait_until(lambda: not live.server.server_state.tasks)


# --- the request head ---------------------------------------------------------------------


async def test_a_head_over_the_size_limit_is_answered_431() -> None:
    """A request head over MAX_HEADER_BYTES gets 431 header_too_large and is counted."""
    async with running_server(json_settings(max_header_bytes=1024)) as live:
        big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
        answer = await exchange(live.port, big)
        assert (answer.status, answer.error) == (431, "header_too_large")
        assert answer.headers["connection"] == "close"
        assert refused(live) == {"header_too_large": 1}
        # A head within the limit is served, body and all.
        fits = HEAD.replace(b"100", b"2") + b"hi"
        assert (await exchange(live.port, fits)).status == 200
        samples = await scrape(live)
        assert samples[("broadcaster_refused_total", (("reason", "header_too_large"),))] == 1


async def test_a_request_with_too_many_headers_is_answered_431() -> None:
    """More than MAX_HEADERS headers get 431 too_many_headers; exactly as many are served."""
    async with running_server(json_settings(max_headers=5)) as live:
        extra = b"".join(b"X-%d: 1\r\n" % n for n in range(3))
        answer = await exchange(live.port, GET.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n"))
        assert answer.status == 200  # Host, Connection and three more
        extra += b"X-3: 1\r\n"
        answer = await exchange(live.port, GET.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n"))
        assert (answer.status, answer.error) == (431, "too_many_headers")
        assert refused(live) == {"too_many_headers": 1}


# Chunks of 1 KiB an endless sender sends at most: far more than kernel buffers hold.
ENDLESS_CHUNKS = 16 * 1024


async def stream_endlessly(live: LiveServer, start: bytes) -> tuple[Answer, int]:
    """Send ``start``, then 1 KiB chunks until the server answers; return its answer and how
    many chunks were sent."""
    sent = 0
    answered = anyio.Event()
    wire = b""

    async def read(stream: SocketStream) -> None:
        nonlocal wire
        wire = await read_all(stream)
        answered.set()

    async with (
        await anyio.connect_tcp("127.0.0.1", live.port) as stream,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(read, stream)
        with suppress(anyio.BrokenResourceError):
            await stream.send(start)
            while sent < ENDLESS_CHUNKS and not answered.is_set():
                await stream.send(b"a" * 1024)
                sent += 1
        await answered.wait()
    return parse(wire), sent


async def test_a_header_streamed_forever_is_cut_off_at_the_limit() -> None:
    """A header that never ends is answered 431 while its client is still sending it."""
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: "
    async with running_server(json_settings(max_header_bytes=4096)) as live:
        answer, sent = await stream_endlessly(live, start)
        assert (answer.status, answer.error) == (431, "header_too_large")
        assert sent < ENDLESS_CHUNKS
        assert refused(live) == {"header_too_large": 1}


async def test_a_trailer_streamed_forever_is_cut_off() -> None:
    """A chunked body's trailer, which httptools buffers like a header, is bounded like one."""
    chunked = (
        b"POST /publish/t HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Endless: "
    )
    async with running_server(json_settings(max_header_bytes=4096)) as live:
        answer, sent = await stream_endlessly(live, chunked)
        assert (answer.status, answer.error) == (431, "header_too_large")
        assert sent < ENDLESS_CHUNKS
        assert refused(live) == {"header_too_large": 1}


async def test_a_body_in_many_small_chunks_is_published() -> None:
    """The framing of a body sent a byte a chunk stays within its allowance."""
    body = b"".join(b"1\r\n%d\r\n" % (n % 10) for n in range(1000)) + b"0\r\n\r\n"
    request = (
        b"POST /publish/t HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    async with running_server(json_settings(max_header_bytes=1024)) as live:
        assert (await exchange(live.port, request + body)).status == 200
        assert refused(live) == {}


async def test_a_head_that_never_completes_is_dropped_and_counted() -> None:
    """A partial head is dropped after HANDSHAKE_TIMEOUT without an answer, and counted."""
    async with running_server(json_settings(handshake_timeout=0.2)) as live:
        async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert await read_all(stream) == b""
        assert refused(live) == {"head_timeout": 1}


async def test_bytes_that_are_not_http_are_answered_400_and_counted() -> None:
    """uvicorn's 400 for bytes it cannot parse is counted as invalid_request."""
    async with running_server() as live:
        answer = await exchange(live.port, b"\x00\x01 not HTTP\r\n\r\n")
        assert answer.status == 400
        assert refused(live) == {"invalid_request": 1}


async def test_the_protocol_served_bare_applies_the_default_limits() -> None:
    """Served as uvicorn's ``http`` class without a gate, the protocol applies the default
    limits to each connection."""
    settings = json_settings()
    sock = bind(settings.model_copy(update={"port": 0}))
    config = uvicorn_config(create_app(settings), settings)
    config.http = HTTPProtocol
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        await wait_until(lambda: server.started)
        port = sock.getsockname()[1]
        assert (await exchange(port, GET)).status == 200
        many = b"".join(b"X-%d: 1\r\n" % n for n in range(HTTPLimits().max_headers))
        answer = await exchange(port, GET.replace(b"\r\n\r\n", b"\r\n" + many + b"\r\n"))
        assert (answer.status, answer.error) == (431, "too_many_headers")
        server.should_exit = True


# --- the request body ---------------------------------------------------------------------


async def trickle(live: LiveServer, head: bytes = HEAD) -> tuple[bytes, float]:
    """Send ``head`` and then a body a byte at a time, until the server answers; return
    what it sent and how long after the head it closed."""
    wire = b""
    async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
        await stream.send(head)
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                nonlocal wire
                wire = await read_all(stream)
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            with suppress(anyio.BrokenResourceError):
                for _ in range(99):  # one byte short of the declared length
                    await stream.send(b"x")
                    await anyio.sleep(TRICKLE)
        return wire, anyio.current_time() - started


async def test_a_trickled_body_is_answered_408_at_its_deadline() -> None:
    """A body still arriving BODY_TIMEOUT after its head gets 408 body_timeout, and the app,
    which sees the client leave, does not count it again."""
    async with running_server(json_settings(body_timeout=0.5, body_min_rate=0)) as live:
        with capture_logs() as logs:
            wire, took = await trickle(live)
            await requests_done(live)
        answer = parse(wire)
        assert (answer.status, answer.error) == (408, "body_timeout")
        assert 0.5 <= took < 0.5 + SLACK
        assert refused(live) == {"body_timeout": 1}
        refusals = [e for e in logs if e["event"] == "request_refused"]
        assert [(e["log_level"], e["status"]) for e in refusals] == [("debug", 408)]


async def test_a_body_slower_than_the_minimum_rate_is_answered_408() -> None:
    """A body averaging under BODY_MIN_RATE once its grace is over gets 408 body_too_slow."""
    async with running_server(json_settings(body_timeout=60, body_min_rate=1000)) as live:
        wire, took = await trickle(live)
        answer = parse(wire)
        assert (answer.status, answer.error) == (408, "body_too_slow")
        assert BODY_RATE_GRACE <= took < BODY_RATE_GRACE + SLACK
        assert refused(live) == {"body_too_slow": 1}


async def test_a_body_left_unsent_after_the_app_answered_is_closed_uncounted() -> None:
    """A request the app refused before reading its body is closed at the body deadline,
    counted once, for the app's own refusal."""
    settings = json_settings(body_timeout=0.5, publish_tokens=PUBLISH_TOKEN)
    async with running_server(settings) as live:
        wire, took = await trickle(live, KEEP_ALIVE_HEAD)
        assert parse(wire).status == 401
        assert 0.5 <= took < 0.5 + SLACK
        assert refused(live) == {"missing_token": 1}


async def test_publishers_that_leave_mid_body_are_counted_without_error_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 publishers that disconnect mid-body log no error and count as client_disconnected."""

    async def leave_mid_body(live: LiveServer) -> None:
        async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
            await stream.send(HEAD + b"only part of it")

    async with running_server() as live:
        with capture_logs() as logs:
            for _ in range(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(leave_mid_body, live)
            await wait_until(lambda: refused(live)["client_disconnected"] == 200)
            await requests_done(live)
        assert refused(live) == {"client_disconnected": 200}
        assert [e for e in logs if e["log_level"] not in ("debug", "info")] == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        samples = await scrape(live)
        assert samples[("broadcaster_refused_total", (("reason", "client_disconnected"),))] == 200


async def test_bodies_within_the_bounds_are_published() -> None:
    """A body sent in pieces, and a pipelined second request, are served with tight bounds."""
    settings = json_settings(body_timeout=5, max_header_bytes=1024, max_headers=10)
    async with running_server(settings) as live:
        request = KEEP_ALIVE_HEAD.replace(b"100", b"10")
        async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
            await stream.send(request + b"01234")
            await stream.send(b"56789" + GET)
            wire = await read_all(stream)
        first, _, second = wire.partition(b"}")
        assert parse(first + b"}").status == 200
        assert parse(second).status == 200
        assert refused(live) == {}


# --- connections ----------------------------------------------------------------------------


async def test_connections_past_the_per_address_limit_are_answered_429() -> None:
    """One address past MAX_HTTP_CONNECTIONS_PER_ADDRESS gets 429 with Retry-After; another
    address, and the same one once a connection ends, are served."""
    async with (
        running_server(json_settings(max_http_connections_per_address=2)) as live,
        AsyncExitStack() as stack,
    ):
        held = [await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", live.port))]
        held.append(
            await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", live.port))
        )
        await wait_until(lambda: gate(live).statistics().open == 2)
        answer = await exchange(live.port, GET)
        assert (answer.status, answer.error) == (429, "too_many_http_connections_from_address")
        assert answer.headers["retry-after"] == "1"
        assert (await exchange(live.port, GET, local_host="127.0.0.2")).status == 200
        await held[0].aclose()
        await wait_until(lambda: gate(live).statistics() == GateStatistics(1, 1))
        assert (await exchange(live.port, GET)).status == 200
        assert refused(live) == {"too_many_http_connections_from_address": 1}


async def test_connections_past_the_server_limit_are_answered_503() -> None:
    """Past MAX_HTTP_CONNECTIONS any address gets 503 with Retry-After, without the app."""
    async with (
        running_server(json_settings(max_http_connections=2)) as live,
        AsyncExitStack() as stack,
    ):
        for host in ("127.0.0.1", "127.0.0.2"):
            await stack.enter_async_context(
                await anyio.connect_tcp("127.0.0.1", live.port, local_host=host)
            )
        await wait_until(lambda: gate(live).statistics() == GateStatistics(2, 2))
        answer = await exchange(live.port, GET, local_host="127.0.0.3")
        assert (answer.status, answer.error) == (503, "too_many_http_connections")
        assert answer.headers["retry-after"] == "1"
        assert refused(live) == {"too_many_http_connections": 1}
        assert live.server.server_state.total_requests == 0


async def test_websockets_stop_counting_as_http_connections_once_upgraded() -> None:
    """More WebSockets than MAX_HTTP_CONNECTIONS open, and HTTP is still served beside them."""
    async with (
        running_server(json_settings(max_http_connections=2)) as live,
        AsyncExitStack() as stack,
    ):
        for _ in range(4):
            connection = await stack.enter_async_context(client(live.ws_url()))
            await subscribe(connection, "t")
        assert gate(live).statistics() == GateStatistics(0, 0)
        async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
            assert (await http.get("/healthz")).json()["connections"] == 4
        await wait_until(lambda: gate(live).statistics() == GateStatistics(0, 0))
        assert refused(live) == {}


# --- the gate alone -------------------------------------------------------------------------


def test_the_gate_counts_connections_per_server_and_per_address() -> None:
    """Slots are taken up to both limits, given back, and idle addresses are forgotten."""
    gate = HTTPGate(HTTPLimits(max_connections=3, max_connections_per_address=2))
    assert gate.admit("a") is None
    assert gate.admit("a") is None
    per_address = gate.admit("a")
    assert per_address is not None
    assert (per_address.status, per_address.error) == (
        429,
        "too_many_http_connections_from_address",
    )
    assert gate.admit("b") is None
    full = gate.admit("c")
    assert full is not None
    assert (full.status, full.error, full.headers) == (
        503,
        "too_many_http_connections",
        {"Retry-After": "1"},
    )
    gate.release("b")
    gate.release("a")
    assert gate.statistics() == GateStatistics(1, 1)
    gate.release("a")
    assert gate.statistics() == GateStatistics(0, 0)


def test_limits_follow_the_settings() -> None:
    """Each limit comes from its BROADCASTER_ setting."""
    limits = HTTPLimits.from_settings(
        Settings(
            handshake_timeout=1,
            max_header_bytes=2048,
            max_headers=3,
            body_timeout=4,
            body_min_rate=5,
            max_http_connections=6,
            max_http_connections_per_address=7,
        )
    )
    assert limits == HTTPLimits(1, 2048, 3, 4, 5, 6, 7)


def test_the_gate_refuses_a_flooders_address_as_it_connects() -> None:
    """An address serving a flood penalty is refused before its request is read; others are
    not, and nothing is held for the refused connection."""
    penalties = PenaltyBox(600, 10)
    gate = HTTPGate(HTTPLimits(), penalties=penalties)
    penalties.punish("flooder", time.monotonic())
    refused = gate.admit("flooder")
    assert refused is not None
    assert (refused.status, refused.error, refused.headers) == (
        429,
        "flooding",
        {"Retry-After": "600"},
    )
    assert gate.admit("other") is None
    assert gate.statistics() == GateStatistics(1, 1)
