"""The Python publishers against real servers: receipts, batching under load, refusals, retries."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from broadcaster.app import create_app
from broadcaster.client import HTTPPublisher, PublishError, Receipt, WSPublisher
from broadcaster.publisher import retry_after
from broadcaster.settings import Settings
from tests.support import (
    JWT_SECRET,
    client,
    receive_envelopes,
    running_server,
    subscribe,
    token,
)


async def test_http_publishes_get_receipts_and_batch_under_load() -> None:
    """500 overlapping publishes to one topic arrive in order in far fewer requests, each
    with its receipt; a broadcast gets a receipt per topic."""
    async with (
        running_server() as live,
        client(live.ws_url()) as ws,
        HTTPPublisher(live.http_url, trust_env=False) as publisher,
    ):
        await subscribe(ws, "t")
        first = await publisher.publish("t", {"n": 0})
        receipts = await asyncio.gather(*(publisher.publish("t", {"n": n}) for n in range(1, 500)))
        spread = await publisher.broadcast(["a", "b", "t"], "all")
        delivered = await receive_envelopes(ws, 501)
    assert first == Receipt("t", first.epoch, 1, 1)
    assert [r.seq for r in receipts] == list(range(2, 501))
    assert [e["data"] for e in delivered[:500]] == [{"n": n} for n in range(500)]
    assert [(r.topic, r.seq) for r in spread] == [("a", 1), ("b", 1), ("t", 501)]
    assert publisher.requests < 50


async def test_http_refusals_name_the_error() -> None:
    """A forbidden topic fails alone, alone or in a batch; a broadcast that is partly allowed
    carries the receipts it got; a request without a token fails every message with 401."""
    settings = Settings(log_format="json", jwt_secret=JWT_SECRET)
    grant = token(publish=["news.*"])
    async with (
        running_server(settings) as live,
        HTTPPublisher(live.http_url, token=grant, trust_env=False) as publisher,
        HTTPPublisher(live.http_url, trust_env=False) as anonymous,
    ):
        with pytest.raises(PublishError) as alone:
            await publisher.publish("sport", 1)
        outcomes = await asyncio.gather(
            publisher.publish("news.eu", 1),
            publisher.publish("sport", 2),
            publisher.broadcast(["news.us", "sport"], 3),
            return_exceptions=True,
        )
        with pytest.raises(PublishError) as unauthorized:
            await anonymous.publish("news.eu", 1)
    assert (alone.value.status, alone.value.error) == (403, "forbidden_topic")
    assert isinstance(outcomes[0], Receipt)
    assert isinstance(outcomes[1], PublishError)
    assert outcomes[1].error == "forbidden_topic"
    assert isinstance(outcomes[2], PublishError)
    assert [r.topic for r in outcomes[2].receipts] == ["news.us"]
    assert (unauthorized.value.status, unauthorized.value.error) == (401, "missing_token")


async def test_http_retries_a_503_after_retry_after_then_gives_up() -> None:
    """A server whose hub is not running answers 503: the publisher sends again once after
    Retry-After, then fails with the server's error."""
    transport = httpx.ASGITransport(app=create_app(Settings(log_format="json")))
    async with HTTPPublisher("http://test", retries=1, transport=transport) as publisher:
        with pytest.raises(PublishError) as refused:
            await publisher.publish("t", 1)
    assert (refused.value.status, refused.value.error) == (503, "hub_stopped")
    assert (refused.value.retry_after, publisher.requests) == (1.0, 2)


async def test_http_an_unreachable_server_fails_the_publish() -> None:
    """No server listening: the publish raises httpx's connection error."""
    async with HTTPPublisher("http://127.0.0.1:9", trust_env=False) as publisher:
        with pytest.raises(httpx.ConnectError):
            await publisher.publish("t", 1)


def test_retry_after_reads_seconds_and_dates_within_bounds() -> None:
    """Seconds and HTTP dates are read, capped at 30 s; a missing header means 1 s."""
    answers = [
        httpx.Response(503, headers={"retry-after": "2.5"}),
        httpx.Response(503, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}),
        httpx.Response(503, headers={"retry-after": "3600"}),
        httpx.Response(503),
    ]
    assert [retry_after(answer) for answer in answers] == [2.5, 0.0, 30.0, 1.0]


async def test_a_publisher_outside_its_context_says_so() -> None:
    """Publishing before ``async with`` is a RuntimeError, not a hang."""
    with pytest.raises(RuntimeError, match="async with"):
        await HTTPPublisher("http://127.0.0.1:9").publish("t", 1)
    with pytest.raises(RuntimeError, match="async with"):
        await WSPublisher("ws://127.0.0.1:9/ws").publish("t", 1)


async def test_ws_publishes_are_acked_with_their_position() -> None:
    """Overlapping publishes are each acked with their seq; a broadcast with one per topic;
    unacked publishes reach subscribers too; a forbidden topic fails alone."""
    settings = Settings(log_format="json", jwt_secret=JWT_SECRET)
    grant = token(publish=["t", "a"], subscribe=["*"])
    async with (
        running_server(settings) as live,
        client(live.ws_url(f"/ws?token={grant}")) as ws,
        WSPublisher(live.ws_url(), token=grant) as publisher,
    ):
        await subscribe(ws, "t")
        receipts = await asyncio.gather(*(publisher.publish("t", n) for n in range(100)))
        spread = await publisher.broadcast(["a", "t"], "both")
        await publisher.publish_unacked("t", "quiet")
        with pytest.raises(PublishError) as refused:
            await publisher.publish("sport", 1)
        delivered = await receive_envelopes(ws, 102)
    assert [r.seq for r in receipts] == list(range(1, 101))
    assert [(r.topic, r.seq) for r in spread] == [("a", 1), ("t", 101)]
    assert delivered[-1]["data"] == "quiet"
    assert refused.value.error == "forbidden_topic"


async def test_ws_a_lost_connection_fails_what_waits_and_what_follows() -> None:
    """The server closes the connection for a message too big: that publish and the next
    fail with ``connection_closed`` and the close code."""
    settings = Settings(log_format="json", max_message_bytes=1024)
    async with running_server(settings) as live, WSPublisher(live.ws_url()) as publisher:
        with pytest.raises(PublishError) as lost:
            await publisher.publish("t", "x" * 2000)
        with pytest.raises(PublishError) as after:
            await publisher.publish("t", "small")
    assert (lost.value.error, after.value.error) == ("connection_closed", "connection_closed")
    assert "1009" in lost.value.detail
