"""Server-Sent Events on ``/sse/{topic}``: the format, resume from ``Last-Event-ID``, and the
outbox, policies, limits and auth that every connection meets."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from broadcaster.app import Broadcaster
from broadcaster.errors import Closing, ProtocolError, ShuttingDown
from broadcaster.policy import Overflow
from broadcaster.protocol import error_frame
from broadcaster.settings import Settings
from broadcaster.sse import EventStream
from tests.support import (
    JWT_SECRET,
    Event,
    LiveServer,
    running_server,
    scrape,
    sse_events,
    token,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from playwright.async_api import Browser
    from starlette.types import Message


@asynccontextmanager
async def stream(
    live: LiveServer, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[Event]]]:
    """Open an event stream; yield the response and its events."""
    async with (
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
        http.stream("GET", path, headers=headers) as response,
    ):
        yield response, sse_events(response)


async def take(events: AsyncIterator[Event], count: int, *, comments: bool = False) -> list[Event]:
    """The next ``count`` events (comments skipped unless asked for)."""
    taken: list[Event] = []
    with anyio.fail_after(10):
        async for event in events:
            if event.event != ":" or comments:
                taken.append(event)
            if len(taken) == count:
                break
    return taken


async def publish(live: LiveServer, topic: str, *values: Any) -> None:
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        for value in values:
            response = await http.post(f"/publish/{topic}", json=value)
            assert response.status_code == 200


async def test_events_carry_epoch_and_seq_ids_and_the_envelope() -> None:
    """The stream opens with ``subscribed`` at the topic's position, then one event per
    message whose id is ``EPOCH:SEQ`` and whose data is the multiplexed envelope."""
    async with running_server() as live:
        await publish(live, "news", "before")
        async with stream(live, "/sse/news") as (response, events):
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            (subscribed,) = await take(events, 1)
            epoch = subscribed.json()["epoch"]
            assert subscribed.event == "subscribed"
            assert subscribed.json() == {
                "op": "subscribed",
                "topic": "news",
                "epoch": epoch,
                "seq": 1,
            }
            assert subscribed.id == f"{epoch}:1"
            await publish(live, "news", {"a": 1}, "two\nlines")
            first, second = await take(events, 2)
        assert (first.event, first.id, first.json()) == (
            "message",
            f"{epoch}:2",
            {"topic": "news", "seq": 2, "data": {"a": 1}},
        )
        assert (second.id, second.json()["data"]) == (f"{epoch}:3", "two\nlines")


async def test_last_event_id_resumes_with_exactly_the_missed_messages() -> None:
    """A stream reopened with the last id it saw gets what was published meanwhile, once,
    then live messages."""
    async with running_server() as live:
        async with stream(live, "/sse/feed") as (_, events):
            await take(events, 1)
            await publish(live, "feed", 1, 2, 3)
            seen = await take(events, 3)
        last_id = seen[-1].id
        assert last_id is not None
        await publish(live, "feed", 4, 5, 6)
        async with stream(live, "/sse/feed", {"Last-Event-ID": last_id}) as (_, events):
            (subscribed,) = await take(events, 1)
            assert subscribed.json()["recovered"] is True
            missed = await take(events, 3)
            await publish(live, "feed", 7)
            (live_one,) = await take(events, 1)
        assert [event.json()["data"] for event in [*missed, live_one]] == [4, 5, 6, 7]
        epoch = last_id.partition(":")[0]
        assert [event.id for event in missed] == [f"{epoch}:{seq}" for seq in (4, 5, 6)]


async def test_last_event_id_parameter_resumes_and_the_header_wins_over_it() -> None:
    """``?lastEventId=`` resumes a first connection; a browser's header overrides it, as
    when an EventSource reconnects to the same URL."""
    async with running_server() as live:
        await publish(live, "t", 1, 2, 3)
        async with stream(live, "/sse/t") as (_, events):
            epoch = (await take(events, 1))[0].json()["epoch"]
        path = f"/sse/t?lastEventId={epoch}:1"
        async with stream(live, path) as (_, events):
            assert [e.json()["data"] for e in (await take(events, 3))[1:]] == [2, 3]
        async with stream(live, path, {"Last-Event-ID": f"{epoch}:2"}) as (_, events):
            assert [e.json()["data"] for e in (await take(events, 2))[1:]] == [3]
        async with stream(live, "/sse/t?last=2") as (_, events):
            assert [e.json()["data"] for e in (await take(events, 3))[1:]] == [2, 3]


async def test_a_position_history_no_longer_has_is_reported_not_recovered() -> None:
    """An id from another epoch resumes from now, and the ``subscribed`` event says the
    messages in between were not recovered."""
    async with running_server() as live, stream(live, "/sse/t?lastEventId=gone:5") as (_, e):
        (subscribed,) = await take(e, 1)
        assert subscribed.json()["recovered"] is False


@pytest.mark.parametrize(
    ("path", "headers", "error"),
    [
        ("/sse/t", {"Last-Event-ID": "12"}, "invalid_last_event_id"),
        ("/sse/t", {"Last-Event-ID": "e:-1"}, "invalid_last_event_id"),
        ("/sse/t?lastEventId=" + "e" * 65 + ":1", {}, "invalid_last_event_id"),
        ("/sse/t?last=x", {}, "invalid_last"),
        ("/sse/bad%20topic", {}, "invalid_topic"),
    ],
)
async def test_bad_resume_points_and_topics_get_400(
    path: str, headers: dict[str, str], error: str
) -> None:
    """A malformed ``Last-Event-ID``, ``last`` or topic is refused with a 400 naming it."""
    async with running_server() as live, stream(live, path, headers) as (response, _):
        assert response.status_code == 400
        assert json.loads(await response.aread())["error"] == error
        assert (await scrape(live))[("broadcaster_refused_total", (("reason", error),))] == 1


async def test_tokens_are_checked_from_the_query() -> None:
    """With a JWT key, a stream needs a token (``?token=``, since EventSource sets no
    headers) that allows its topic."""
    settings = Settings(log_format="json", jwt_secret=JWT_SECRET)
    async with running_server(settings) as live:
        async with stream(live, "/sse/t") as (response, _):
            assert response.status_code == 403
            assert json.loads(await response.aread())["error"] == "missing_token"
        async with stream(live, f"/sse/t?token={token(subscribe=['other'])}") as (response, _):
            assert response.status_code == 403
            assert json.loads(await response.aread())["error"] == "forbidden_topic"
        async with stream(live, f"/sse/t?token={token(subscribe=['t'])}") as (response, events):
            assert response.status_code == 200
            assert (await take(events, 1))[0].event == "subscribed"


async def test_an_expired_token_ends_the_stream_with_a_close_event() -> None:
    """The stream of a token that expires is told so (1008) before it ends."""
    settings = Settings(log_format="json", jwt_secret=JWT_SECRET)
    async with running_server(settings) as live:
        path = f"/sse/t?token={token(subscribe=['t'], lifetime=2)}"
        async with stream(live, path) as (_, events):
            _, close = await take(events, 2)
    assert (close.event, close.json()) == ("close", {"code": 1008, "reason": "token expired"})


async def test_streams_count_as_connections_and_meet_the_limit() -> None:
    """An SSE client is a connection in the metrics and against ``MAX_CONNECTIONS``."""
    settings = Settings(log_format="json", max_connections=1)
    async with running_server(settings) as live:
        async with stream(live, "/sse/t") as (_, events):
            await take(events, 1)
            samples = await scrape(live)
            assert samples[("broadcaster_connections", ())] == 1
            assert samples[("broadcaster_connections_accepted_total", ())] == 1
            async with stream(live, "/sse/t") as (second, _):
                assert second.status_code == 503
                assert json.loads(await second.aread())["error"] == "too_many_connections"
        await wait_until(lambda: live.broadcaster.connections == 0)
        samples = await scrape(live)
        assert samples[("broadcaster_connections_closed_total", (("code", "none"),))] == 1


async def test_keepalive_comments_are_sent_each_ping_interval() -> None:
    """A quiet stream gets a ``: keepalive`` comment every ping interval."""
    settings = Settings(log_format="json", ping_interval=0.05)
    async with running_server(settings) as live, stream(live, "/sse/t") as (_, events):
        assert [(e.event, e.data) for e in await take(events, 3, comments=True)][1:] == [
            (":", "keepalive"),
            (":", "keepalive"),
        ]


# A server that drops a stream as soon as its client falls a few messages behind.
DROPS_SLOW_STREAMS = Settings(
    log_format="json",
    overflow=Overflow.DISCONNECT,
    queue_max_messages=4,
    socket_send_buffer=4608,
)


async def overflowed_stream(live: LiveServer, topic: str) -> socket.socket:
    """Open ``/sse/{topic}`` on a socket that reads nothing, and publish until the server
    has dropped it as a slow consumer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    sock.sendall(f"GET /sse/{topic} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await wait_until(lambda: live.broadcaster.hub.statistics().topics.get(topic) == 1)
    totals = live.broadcaster.metrics.totals
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        for _ in range(2000):
            await http.post(f"/publish/{topic}", content="x" * 16_000)
            if totals.slow_consumers["queue_full"]:
                break
    assert totals.slow_consumers["queue_full"] == 1
    return sock


async def test_a_slow_stream_is_dropped_by_policy_and_told_why() -> None:
    """A client that stops reading fills its outbox; the disconnect policy drops it with 1013,
    and what it reads afterwards ends with a close event that says so."""
    async with running_server(DROPS_SLOW_STREAMS) as live:
        sock = await overflowed_stream(live, "slow")
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        # The body is chunked: the close event is the last chunk before the terminating one.
        received = bytearray()
        with anyio.fail_after(10):
            while not received.endswith(b"\r\n0\r\n\r\n"):
                received += await reader.read(65536)
        writer.close()
    close = b'event: close\ndata: {"code":1013,"reason":"slow consumer"}\n\n'
    assert received.endswith(close + b"\r\n0\r\n\r\n")


async def test_a_client_that_never_reads_is_dropped_without_an_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that stops reading for good cannot take the close event: once it is dropped
    by policy, its connection is cut rather than held, and nothing is logged as an error."""
    async with running_server(DROPS_SLOW_STREAMS) as live:
        sock = await overflowed_stream(live, "stuck")
        await wait_until(lambda: live.broadcaster.connections == 0, deadline=20)
        async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
            assert (await http.get("/healthz")).json()["connections"] == 0
        sock.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


async def test_a_router_mounted_elsewhere_serves_streams_too() -> None:
    """``Broadcaster.router`` included under a prefix serves ``/sse/{topic}`` as well."""
    live = Broadcaster(Settings(log_format="json"))
    app = FastAPI(lifespan=lambda app: live.lifespan())
    app.include_router(live.router, prefix="/live")
    transport = httpx.ASGITransport(app)
    async with live.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        # ASGITransport answers once the app is done: a refusal is what it can show.
        response = await http.get("/live/sse/t", headers={"Last-Event-ID": "x"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_last_event_id"


async def test_an_event_source_resumes_after_the_server_cuts_it(browser: Browser) -> None:
    """In a browser, a plain ``EventSource`` cut off by the server reconnects by itself and,
    through ``Last-Event-ID``, gets what was published meanwhile: no loss, no duplicate."""
    async with running_server() as live:
        page = await browser.new_page()
        try:
            await page.goto(live.http_url + "/healthz")  # the same origin as the stream
            await page.evaluate(
                """() => {
                    window.got = []; window.subscribed = []; window.closes = [];
                    const source = new EventSource("/sse/cut");
                    source.onmessage = (e) => window.got.push(JSON.parse(e.data).data);
                    source.addEventListener(
                        "subscribed", (e) => window.subscribed.push(JSON.parse(e.data)));
                    source.addEventListener(
                        "close", (e) => window.closes.push(JSON.parse(e.data)));
                }"""
            )
            await page.wait_for_function("window.subscribed.length === 1", timeout=10_000)
            await publish(live, "cut", *range(1, 21))
            await page.wait_for_function("window.got.length === 20", timeout=10_000)
            (subscriber,) = live.broadcaster.hub.subscribers()
            subscriber.outbox.fail(ShuttingDown())
            await wait_until(lambda: live.broadcaster.hub.statistics().subscribers == 0)
            await publish(live, "cut", *range(21, 41))
            await page.wait_for_function(
                "window.subscribed.length === 2 && window.got.length >= 40", timeout=10_000
            )
            got = await page.evaluate("window.got")
            subscribed = await page.evaluate("window.subscribed")
            closes = await page.evaluate("window.closes")
        finally:
            await page.close()
    assert got == list(range(1, 41))
    assert subscribed[1]["recovered"] is True
    assert closes == [{"code": 1001, "reason": "server shutting down"}]


async def test_a_drain_flushes_streams_then_ends_them_with_1001() -> None:
    """After SIGTERM's drain, a stream gets what was queued, then ``close`` 1001, and ends."""
    async with running_server() as live, stream(live, "/sse/t") as (_, events):
        await take(events, 1)
        await publish(live, "t", "last words")
        drained = anyio.Event()
        live.broadcaster.request_drain(drained.set)
        message, close = await take(events, 2)
        assert message.json()["data"] == "last words"
        assert (close.event, close.json()) == (
            "close",
            {"code": 1001, "reason": "server shutting down"},
        )
        with anyio.fail_after(10):
            await drained.wait()
            assert await take(events, 1) == []
        await wait_until(lambda: live.broadcaster.connections == 0)
        samples = await scrape(live)
        assert samples[("broadcaster_connections_closed_total", (("code", "1001"),))] == 1


async def test_streams_hold_an_http_connection_slot_of_their_address() -> None:
    """An open stream counts against ``MAX_HTTP_CONNECTIONS_PER_ADDRESS`` for its life."""
    settings = Settings(log_format="json", max_http_connections_per_address=1)
    async with running_server(settings) as live, stream(live, "/sse/t") as (_, events):
        await take(events, 1)
        async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
            response = await http.get("/healthz")
        assert response.status_code == 429
        assert response.json()["error"] == "too_many_http_connections_from_address"


async def test_a_failed_subscription_ends_the_stream_saying_why() -> None:
    """An error frame (a broker that could not subscribe) becomes a ``refused`` event, then
    ``close`` 1013 with its code, and the stream ends so that the browser subscribes again."""
    sent: list[Message] = []

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    events = EventStream({}, receive, send, "t", since=None, last=None, ping_interval=60)
    assert await events.receive() == '{"op": "subscribe", "topic": "t"}'
    error = error_frame(ProtocolError("backplane_down", "redis: connection refused"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(events.send, [error])
        with anyio.fail_after(10), pytest.raises(Closing) as closing:
            await events.receive()
    assert (closing.value.code, closing.value.reason) == (1013, "backplane_down")
    await events.finish()
    await events.finish()
    assert [message["body"] for message in sent] == [
        b'event: refused\ndata: {"op":"error","error":"backplane_down",'
        b'"detail":"redis: connection refused"}\n\n',
        b'event: close\ndata: {"code":1013,"reason":"backplane_down"}\n\n',
    ]
    assert sent[-1]["more_body"] is False
