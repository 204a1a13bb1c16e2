"""/metrics, /connections and /readyz after scripted scenarios: the numbers match what happened."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import httpx

from broadcaster.policy import Overflow
from broadcaster.settings import Settings
from tests.support import (
    client,
    receive_envelopes,
    receive_json,
    running_server,
    scrape,
    subscribe,
    wait_until,
)

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

BIG = 60_000
COUNT = 200


def settings(overflow: Overflow) -> Settings:
    """Small outboxes, so that a stalled client overflows within COUNT big messages."""
    return Settings(
        overflow=overflow,
        queue_max_messages=8,
        queue_max_bytes=16 * BIG,
        max_message_bytes=BIG + 1024,
        log_format="json",
    )


async def test_metrics_count_exactly_what_a_drop_oldest_run_did() -> None:
    """Publishes by source, sends, drops and connections equal what the clients saw."""
    async with (
        running_server(settings(Overflow.DROP_OLDEST)) as live,
        client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled,
        client(live.ws_url()) as publisher,
        AsyncExitStack() as stack,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        fast = [
            await stack.enter_async_context(client(live.ws_url(), max_size=None)) for _ in range(3)
        ]
        for connection in [stalled, *fast]:
            await subscribe(connection, "t")
        received: list[int] = []

        async def read_fast(connection: ClientConnection) -> None:
            received.append(len(await receive_envelopes(connection, COUNT + 2)))

        async with anyio.create_task_group() as tg:
            for connection in fast:
                tg.start_soon(read_fast, connection)
            for _ in range(COUNT):
                response = await http.post("/publish/t", content="x" * BIG)
                assert response.status_code == 200
            await publisher.send(json.dumps({"op": "publish", "topic": "t", "data": "ws"}))
            await publisher.send('{"op": "ping"}')
            assert await receive_json(publisher) == {"op": "pong"}
            await live.broadcaster.publish("t", "app")
        assert received == [COUNT + 2] * 3

        seqs: list[int] = []
        while not seqs or seqs[-1] != COUNT + 2:
            frame = await receive_json(stalled)
            seqs.extend(e["seq"] for e in (frame if isinstance(frame, list) else [frame]))
        gaps = COUNT + 2 - len(seqs)
        assert gaps > 0
        samples = await scrape(live)

    assert samples[("broadcaster_messages_published_total", (("source", "http"),))] == COUNT
    assert samples[("broadcaster_messages_published_total", (("source", "ws"),))] == 1
    assert samples[("broadcaster_messages_published_total", (("source", "app"),))] == 1
    assert samples[("broadcaster_messages_dropped_total", (("policy", "drop_oldest"),))] == gaps
    assert samples[("broadcaster_messages_sent_total", ())] == 3 * (COUNT + 2) + len(seqs)
    assert samples[("broadcaster_connections", ())] == 5
    assert samples[("broadcaster_connections_accepted_total", ())] == 5
    assert samples[("broadcaster_subscriptions", ())] == 4
    assert samples[("broadcaster_topics", ())] == 1
    assert samples[("broadcaster_fanout_seconds_count", ())] == COUNT + 2
    assert samples[("broadcaster_outbox_depth_messages_count", ())] == 5


async def test_metrics_count_a_slow_consumer_disconnect_and_closes_by_code() -> None:
    """A stalled client cut off under disconnect shows as one 1013 close, cause queue_full."""
    async with (
        running_server(settings(Overflow.DISCONNECT)) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        async with client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled:
            await subscribe(stalled, "t")
            for _ in range(COUNT):
                if live.broadcaster.hub.statistics().subscribers == 0:
                    break
                await http.post("/publish/t", content="x" * BIG)
            await wait_until(lambda: live.broadcaster.hub.statistics().subscribers == 0)
            async with client(live.ws_url()) as leaver:
                await subscribe(leaver, "u")
        await wait_until(lambda: live.broadcaster.hub.statistics().subscribers == 0)
        samples = await scrape(live)
        worst = (await http.get("/connections")).json()
    assert samples[("broadcaster_connections_closed_total", (("code", "1013"),))] == 1
    assert samples[("broadcaster_connections_closed_total", (("code", "none"),))] == 1
    assert samples[("broadcaster_slow_consumer_disconnects_total", (("cause", "queue_full"),))] == 1
    assert samples[("broadcaster_connections_accepted_total", ())] == 2
    assert samples[("broadcaster_connections", ())] == 0
    assert worst == []


async def test_connections_lists_the_slowest_first() -> None:
    """/connections puts the connection holding the most queued bytes first, with its stats."""
    async with (
        running_server(settings(Overflow.DROP_OLDEST)) as live,
        client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled,
        client(live.ws_url()) as reader,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        await subscribe(stalled, "t")
        await subscribe(reader, "t")
        for _ in range(COUNT):
            await http.post("/publish/t", content="x" * BIG)
            await receive_json(reader)
        await wait_until(
            lambda: (
                max(s.outbox.statistics().dropped for s in live.broadcaster.hub.subscribers()) > 0
            )
        )
        rows = (await http.get("/connections", params={"limit": 1})).json()
        too_many = await http.get("/connections", params={"limit": 0})
    assert len(rows) == 1
    (row,) = rows
    assert row["queued_bytes"] > 0
    assert row["dropped"] > 0
    assert row["oldest_queued_seconds"] >= 0
    assert row["mode"] == "mux"
    assert row["subscriptions"] == 1
    assert row["peer"].startswith("127.0.0.1:")
    assert too_many.status_code == 422
