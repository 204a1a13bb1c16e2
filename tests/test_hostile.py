"""Hostile input: property tests of the parser and the rate limit, and a live server under
attack from fuzzing, flooding, half-open and resetting clients while good clients listen."""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
from contextlib import AsyncExitStack, suppress

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed

from broadcaster.errors import ProtocolError
from broadcaster.policy import TokenBucket
from broadcaster.protocol import Command, Publish, parse_frame
from broadcaster.settings import Settings
from tests.support import (
    JWT_SECRET,
    PUBLISH_TOKEN,
    LiveServer,
    RawClient,
    client,
    closed_after,
    drain,
    flood,
    handshake_refusal,
    receive_envelopes,
    receive_json,
    running_server,
    subscribe,
    token,
    wait_until,
)

# The error codes docs/protocol.md documents for a frame the parser cannot take.
PARSE_ERRORS = {
    "binary_frame",
    "invalid_json",
    "invalid_frame",
    "unknown_op",
    "missing_field",
    "invalid_topic",
}
# Enough examples to reach every branch of the parser, few enough for a fast CI.
EXAMPLES = settings(max_examples=300, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ops = st.sampled_from(["subscribe", "unsubscribe", "publish", "ping"]) | json_values
topics = st.sampled_from(["t", "news.eu", "a" * 128, "a" * 129, "", "bad topic"]) | json_values
objects = st.fixed_dictionaries({}, optional={"op": ops, "topic": topics, "data": json_values})
# Frames that look like commands, whole or cut short anywhere.
command_texts = objects.map(json.dumps).flatmap(
    lambda text: st.sampled_from([text]) | st.integers(0, len(text)).map(lambda n: text[:n])
)


def parse_or_error(frame: str | bytes) -> Command | ProtocolError:
    """Parse ``frame``, returning the ProtocolError rather than raising it."""
    try:
        return parse_frame(frame)
    except ProtocolError as error:
        return error


def check_parse(frame: str | bytes) -> None:
    """Assert that ``frame`` parses into a command, or fails with a documented error code."""
    command = parse_or_error(frame)
    if isinstance(command, ProtocolError):
        assert command.error in PARSE_ERRORS
        assert command.detail
    elif isinstance(command, Publish):
        # What the parser accepts, the hub can encode and every client can decode.
        assert json.loads(command.payload.envelope(command.topic, 1).data)["seq"] == 1


@EXAMPLES
@given(st.text())
def test_any_text_parses_or_gets_a_documented_error(frame: str) -> None:
    """Any text frame, lone surrogates included, is a command or a documented ProtocolError."""
    check_parse(frame)


@EXAMPLES
@given(command_texts)
def test_any_command_like_json_parses_or_gets_a_documented_error(frame: str) -> None:
    """Objects with any op, topic and data, whole or truncated, never raise anything else."""
    check_parse(frame)


@EXAMPLES
@given(st.binary())
def test_any_binary_frame_gets_binary_frame(frame: bytes) -> None:
    """Multiplexed mode answers every binary frame with ``binary_frame``."""
    with pytest.raises(ProtocolError) as raised:
        parse_frame(frame)
    assert raised.value.error == "binary_frame"


@EXAMPLES
@given(
    st.floats(0.1, 1000),
    st.floats(1, 1000),
    st.lists(st.tuples(st.floats(0, 2), st.floats(0, 100)), max_size=50),
)
def test_a_bucket_never_gives_more_than_its_burst_and_its_rate(
    rate: float, capacity: float, steps: list[tuple[float, float]]
) -> None:
    """Over any run of takes, what a bucket gives is at most its capacity plus rate x time."""
    bucket = TokenBucket.full(rate, capacity, now=0.0)
    now = given_out = 0.0
    for elapsed, amount in steps:
        now += elapsed
        if bucket.take(amount, now):
            given_out += amount
    assert given_out <= capacity + rate * now + 1e-6


# --- a live server under attack ----------------------------------------------------------

MESSAGES = 200
GOOD_MUX = 4
GOOD_RAW = 2
ATTACK = Settings(
    publish_tokens=PUBLISH_TOKEN,
    jwt_secret=JWT_SECRET,
    max_message_bytes=4096,
    max_messages_per_second=200,
    max_bytes_per_second=64 * 1024,
    max_handshakes_per_second=10_000,
    handshake_timeout=0.5,
    # Attackers and good clients here all come from 127.0.0.1: a flood penalty would refuse
    # every later connection from it, attack or not (tests/test_ws_protocol.py tests it).
    flood_penalty=0,
    log_format="json",
)
# May subscribe to the feed but publish nowhere: what every attacker holds.
READER = token(subscribe=["feed"])
# Close codes an attacker may get: normal, protocol error, bad UTF-8, policy, too big.
ATTACKER_CLOSES = {1000, 1002, 1007, 1008, 1009}


def random_frame(rng: random.Random) -> str | bytes:
    """One malformed, hostile or merely odd frame."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(200)))
    if kind == 2:
        return "[" * rng.randrange(1, 3000)
    if kind == 3:
        return '{"op": "publish", "topic": "feed", "data": "forged"}'
    if kind == 4:
        topic = rng.choice(["feed", "other", "", "x" * 200, "a b"])
        return json.dumps({"op": rng.choice(["subscribe", "unsubscribe", "dance"]), "topic": topic})
    if kind == 5:
        return json.dumps({"op": "subscribe", "topic": "feed"})[: rng.randrange(1, 30)]
    if kind == 6:
        return '{"op": "publish", "topic": "feed", "data": ' + "1e999" + "}"
    return json.dumps({"op": "ping"})


async def fuzzer(live: LiveServer, seed: int, closes: list[int]) -> None:
    """Send random frames with a subscribe-only token; record how the server closed."""
    rng = random.Random(seed)
    async with client(live.ws_url(f"/ws?token={READER}")) as connection:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, connection)
            with suppress(ConnectionClosed):
                for _ in range(100):
                    await connection.send(random_frame(rng))
                await connection.close()
        closes.append(connection.close_code or 1000)


async def flooder(live: LiveServer) -> None:
    """Send pings without pause until the rate limit closes the connection with 1008."""
    assert await flood(live.ws_url(f"/ws?token={READER}")) == (1008, "rate limit exceeded")


async def oversized(live: LiveServer) -> None:
    """Send one frame over the size limit and expect 1009."""
    async with client(live.ws_url(f"/ws/feed?token={READER}")) as connection:
        assert (await closed_after(connection, "x" * 4097))[0] == 1009


async def half_open(live: LiveServer) -> None:
    """Start a handshake and never finish it; the server drops the socket."""
    async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
        await stream.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
            await stream.receive()


async def garbage(live: LiveServer, seed: int) -> None:
    """Send bytes that are not HTTP at all; the server answers or drops, and moves on."""
    rng = random.Random(seed)
    async with await anyio.connect_tcp("127.0.0.1", live.port) as stream:
        await stream.send(rng.randbytes(512))
        with anyio.fail_after(10), suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while await stream.receive():
                pass


async def resetter(live: LiveServer) -> None:
    """Subscribe, then vanish with a TCP reset instead of a close frame."""
    async with client(live.ws_url(f"/ws?token={READER}")) as connection:
        await subscribe(connection, "feed")
        sock = connection.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.transport.abort()


async def unmasked(live: LiveServer) -> None:
    """Send a frame without the mask every client frame must carry: close 1002."""
    raw = await RawClient.connect(live, f"/ws?token={READER}")
    await raw.stream.send(b"\x81\x02hi")
    with anyio.fail_after(10), suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while data := await raw.stream.receive():
            raw.wire += data
    await raw.stream.aclose()
    assert (raw.wire[0], bytes(raw.wire[2:4])) == (0x88, b"\x03\xea")  # a close frame, code 1002


async def impostor(live: LiveServer, http: httpx.AsyncClient) -> None:
    """Try to publish and subscribe without valid credentials; every try is refused."""
    forged = token(subscribe=["*"], publish=["*"], secret="x" * 64)
    assert (await http.post("/publish/feed", content="forged")).status_code == 401
    bearer = {"authorization": f"Bearer {forged}"}
    assert (await http.post("/publish/feed", content="forged", headers=bearer)).status_code == 403
    assert (await handshake_refusal(live.ws_url("/ws/feed")))[:2] == (403, "missing_token")
    refusal = await handshake_refusal(live.ws_url(f"/ws/feed?token={forged}"))
    assert refusal[:2] == (403, "invalid_token")


async def test_good_clients_receive_everything_while_the_server_is_attacked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under fuzzing, flooding, half-open handshakes, resets and forged credentials, every
    good client gets every message exactly once and in order, and nothing crashes."""
    payloads = [{"n": n} for n in range(MESSAGES)]
    closes: list[int] = []
    with capture_logs() as logs, anyio.fail_after(60):
        async with (
            running_server(ATTACK) as live,
            httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
            AsyncExitStack() as stack,
        ):
            mux = [
                await stack.enter_async_context(client(live.ws_url(f"/ws?token={READER}")))
                for _ in range(GOOD_MUX)
            ]
            for connection in mux:
                await subscribe(connection, "feed")
            raw = [
                await stack.enter_async_context(client(live.ws_url(f"/ws/feed?token={READER}")))
                for _ in range(GOOD_RAW)
            ]
            good = GOOD_MUX + GOOD_RAW
            await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"feed": good})

            async def publish_all() -> None:
                for payload in payloads:
                    response = await http.post(
                        "/publish/feed",
                        json=payload,
                        headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
                    )
                    assert response.status_code == 200

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_all)
                for seed in range(10):
                    tg.start_soon(fuzzer, live, seed, closes)
                    tg.start_soon(garbage, live, seed)
                for _ in range(3):
                    tg.start_soon(flooder, live)
                for _ in range(20):
                    tg.start_soon(half_open, live)
                    tg.start_soon(resetter, live)
                tg.start_soon(oversized, live)
                tg.start_soon(unmasked, live)
                tg.start_soon(impostor, live, http)

            for connection in mux:
                envelopes = await receive_envelopes(connection, MESSAGES)
                assert [e["seq"] for e in envelopes] == list(range(1, MESSAGES + 1))
                assert [e["data"] for e in envelopes] == payloads
                # A ping is a barrier: nothing was delivered beyond the messages published.
                await connection.send('{"op": "ping"}')
                assert await receive_json(connection) == {"op": "pong"}
            for connection in raw:
                with anyio.fail_after(10):
                    received = [json.loads(await connection.recv()) for _ in range(MESSAGES)]
                assert received == payloads
            await wait_until(lambda: live.broadcaster.connections == good)
            assert live.broadcaster.hub.statistics().topics == {"feed": good}
            assert (await http.get("/healthz")).status_code == 200
    assert set(closes) <= ATTACKER_CLOSES
    assert len(closes) == 10
    crashes = [e for e in logs if e.get("log_level") == "error" or e.get("code") == 1011]
    assert crashes == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_half_open_handshake_is_dropped_after_the_handshake_timeout() -> None:
    """A client that sends part of a handshake and stops is disconnected; a slow one too."""
    settings = Settings(handshake_timeout=0.2, log_format="json")
    async with running_server(settings) as live:
        await half_open(live)
        async with await anyio.connect_tcp("127.0.0.1", live.port) as idle:
            with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
                await idle.receive()
        # A whole handshake in time is not affected.
        async with client(live.ws_url()) as connection:
            await subscribe(connection, "t")
