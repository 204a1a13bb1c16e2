"""Nodes sharing a real Redis or NATS server: cross-node delivery, order, outages."""

from __future__ import annotations

import base64
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from broadcaster.settings import Settings
from tests.brokers import KINDS, running_broker
from tests.support import (
    client,
    node_health,
    receive_envelopes,
    receive_json,
    running_server,
    scrape,
    serving,
    subscribe,
    subscribed_to,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from websockets.asyncio.client import ClientConnection

    from broadcaster.backplane.bridge import Bridge
    from tests.brokers import Broker
    from tests.support import LiveServer

    Node = tuple[LiveServer, ClientConnection]

COUNT = 200


def node_settings(url: str, **overrides: Any) -> Settings:
    """A node on the broker at ``url``, quick to notice a lost broker and to come back."""
    options: dict[str, Any] = {
        "backplane": url,
        "backplane_timeout": 2,
        "backplane_reconnect_min": 0.05,
        "backplane_reconnect_max": 0.2,
        "log_format": "json",
    }
    return Settings(**(options | overrides))


def bridge(live: LiveServer) -> Bridge:
    """The node's bridge to the broker."""
    assert live.broadcaster.bridge is not None
    return live.broadcaster.bridge


async def numbers(connection: ClientConnection, count: int) -> list[int]:
    """Receive ``count`` envelopes and return their ``data.n``."""
    return [envelope["data"]["n"] for envelope in await receive_envelopes(connection, count)]


@asynccontextmanager
async def two_nodes(kind: str, **overrides: Any) -> AsyncIterator[tuple[Broker, Node, Node]]:
    """A broker, two nodes on it, and a client on each subscribed to ``feed``, once both nodes
    have the broker's subscription."""
    async with running_broker(kind) as broker:
        settings = node_settings(broker.url, **overrides)
        async with (
            running_server(settings) as a,
            running_server(settings) as b,
            client(a.ws_url()) as on_a,
            client(b.ws_url()) as on_b,
        ):
            await subscribe(on_a, "feed")
            await subscribe(on_b, "feed")
            await wait_until(lambda: bridge(a).statistics().subscribed == 1)
            await wait_until(lambda: bridge(b).statistics().subscribed == 1)
            yield broker, (a, on_a), (b, on_b)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_publish_reaches_every_node_once_and_in_order(kind: str) -> None:
    """Publishes on node A reach A's and B's subscribers, raw and multiplexed, once, in order."""
    async with (
        two_nodes(kind) as (_, (a, on_a), (b, on_b)),
        client(b.ws_url("/ws/feed")) as raw_on_b,
        httpx.AsyncClient(base_url=b.http_url, trust_env=False) as http_b,
    ):
        await wait_until(lambda: b.broadcaster.hub.statistics().topics == {"feed": 2})
        for n in range(COUNT):
            await on_a.send(json.dumps({"op": "publish", "topic": "feed", "data": {"n": n}}))
        assert await numbers(on_a, COUNT) == list(range(COUNT))
        assert await numbers(on_b, COUNT) == list(range(COUNT))
        with anyio.fail_after(10):
            raw = [json.loads(await raw_on_b.recv()) for _ in range(COUNT)]
        assert raw == [{"n": n} for n in range(COUNT)]
        # The other way, and bytes: each node's next frame is this one, so none came twice.
        published = await http_b.post(
            "/publish/feed",
            content=b"\x00end",
            headers={"content-type": "application/octet-stream"},
        )
        assert published.json()["subscribers"] == 2
        end = {"data": base64.b64encode(b"\x00end").decode(), "encoding": "base64"}
        for connection in (on_a, on_b):
            envelope = await receive_json(connection)
            assert {key: envelope[key] for key in end} == end
        with anyio.fail_after(10):
            assert await raw_on_b.recv() == b"\x00end"
        await a.broadcaster.publish("feed", "text")
        assert (await receive_json(on_b))["data"] == "text"
        with anyio.fail_after(10):
            assert await raw_on_b.recv() == "text"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_broker_outage_keeps_local_delivery_and_the_nodes_rejoin(kind: str) -> None:
    """With history off and the broker killed, each node still serves its own clients and
    /readyz says 503; once it is back both nodes resubscribe, and what was published meanwhile
    is counted."""
    async with (
        two_nodes(kind, history_size=0) as (broker, (a, on_a), (b, on_b)),
        httpx.AsyncClient(base_url=a.http_url, trust_env=False) as http_a,
    ):
        await http_a.post("/publish/feed", json={"n": 0})
        assert await numbers(on_b, 1) == [0]
        with capture_logs() as logs:
            broker.kill()
            await wait_until(lambda: not bridge(a).statistics().up)
            await wait_until(lambda: not bridge(b).statistics().up)
            readiness = await http_a.get("/readyz")
            assert readiness.status_code == 503
            assert readiness.json()["status"] == "backplane_down"
            assert (await http_a.get("/healthz")).json()["backplane"]["up"] is False
            await http_a.post("/publish/feed", json={"n": 1})
            assert await numbers(on_a, 2) == [0, 1]
            await broker.start()
            await wait_until(lambda: bridge(a).statistics().up)
            await wait_until(lambda: bridge(b).statistics().up)
        assert (await http_a.get("/readyz")).status_code == 200
        assert bridge(b).statistics().subscribed == 1
        await http_a.post("/publish/feed", json={"n": 2})
        # Message 1 was published during the outage: B never gets it; A got it locally.
        assert await numbers(on_b, 1) == [2]
        assert await numbers(on_a, 1) == [2]
        samples = await scrape(a)
        unrelayed = ("broadcaster_backplane_messages_dropped_total", (("reason", "broker_down"),))
        assert samples[unrelayed] == 1
        assert samples[("broadcaster_backplane_links_total", ())] == 2
        events = [(log["event"], log.get("dropped")) for log in logs]
        assert ("backplane_down", None) in events
        assert ("backplane_unrelayed_ended", 1) in events


async def test_the_broker_is_subscribed_to_exactly_the_topics_clients_want() -> None:
    """Redis carries one channel per topic with local subscribers, following joins and leaves."""
    async with running_broker("redis") as broker, running_server(node_settings(broker.url)) as node:
        redis = Redis.from_url(broker.url)
        try:

            async def channels() -> set[bytes]:
                return set(await redis.pubsub_channels())

            async with client(node.ws_url()) as first, client(node.ws_url()) as second:
                await subscribe(first, "a", "b", "c")
                await subscribe(second, "c", "d")
                await wait_until(lambda: bridge(node).statistics().subscribed == 4)
                assert await channels() == {
                    b"broadcaster:a",
                    b"broadcaster:b",
                    b"broadcaster:c",
                    b"broadcaster:d",
                }
                await first.send(json.dumps({"op": "unsubscribe", "topic": "a"}))
                await first.send(json.dumps({"op": "unsubscribe", "topic": "c"}))
                await wait_until(lambda: bridge(node).statistics().subscribed == 3)
                assert await channels() == {b"broadcaster:b", b"broadcaster:c", b"broadcaster:d"}
            await wait_until(lambda: bridge(node).statistics().subscribed == 0)
            with anyio.fail_after(10):
                while await channels():
                    pass
        finally:
            await redis.aclose()


async def test_two_server_processes_share_messages_through_redis() -> None:
    """Two `broadcaster serve` processes on one Redis: each client gets every message once."""
    async with running_broker("redis") as broker:
        env = {"BROADCASTER_BACKPLANE": broker.url}
        with serving(env) as (_, port_a), serving(env) as (_, port_b):
            async with (
                client(f"ws://127.0.0.1:{port_a}/ws") as on_a,
                client(f"ws://127.0.0.1:{port_b}/ws") as on_b,
                httpx.AsyncClient(trust_env=False) as http,
            ):
                await subscribe(on_a, "feed")
                await subscribe(on_b, "feed")
                for port in (port_a, port_b):
                    await node_health(f"http://127.0.0.1:{port}", 1, subscribed_to(1))
                for n in range(COUNT):
                    await http.post(f"http://127.0.0.1:{port_a}/publish/feed", json={"n": n})
                assert await numbers(on_a, COUNT) == list(range(COUNT))
                assert await numbers(on_b, COUNT) == list(range(COUNT))
