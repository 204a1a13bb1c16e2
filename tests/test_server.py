"""End-to-end: a real uvicorn server on 127.0.0.1 and real WebSocket clients."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from broadcaster.policy import Overflow
from broadcaster.settings import Settings
from tests.support import (
    LiveServer,
    client,
    receive_envelopes,
    receive_json,
    running_server,
    subscribe,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from websockets.asyncio.client import ClientConnection

    from broadcaster.hub import Subscriber

BIG = 64 * 1024
# Enough 64 KiB messages to fill a stalled client's socket buffers (a few MiB) and its outbox.
COUNT = 300
# Messages a fast client may be behind: well within its outbox of 8.
WINDOW = 4


def stalled_settings(overflow: Overflow) -> Settings:
    """Small outboxes and big messages, so that a stalled client overflows quickly."""
    return Settings(
        overflow=overflow,
        queue_max_messages=8,
        queue_max_bytes=8 * BIG + 1024,
        max_message_bytes=BIG,
        log_format="json",
    )


async def test_fan_out_reaches_every_client_in_order() -> None:
    """Fifty multiplexed clients each receive every message of their topic, in order."""
    async with running_server() as live, AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(live.ws_url())) for _ in range(50)]
        for connection in clients:
            await subscribe(connection, "news")
        for n in range(100):
            await live.broadcaster.publish("news", {"n": n})
        for connection in clients:
            envelopes = await receive_envelopes(connection, 100)
            assert [e["seq"] for e in envelopes] == list(range(1, 101))
            assert [e["data"] for e in envelopes] == [{"n": n} for n in range(100)]
            assert {e["topic"] for e in envelopes} == {"news"}


async def test_raw_mode_echoes_frames_verbatim_to_every_subscriber() -> None:
    """In raw mode text stays text, bytes stay bytes, and the sender gets its own frame."""
    async with (
        running_server() as live,
        client(live.ws_url("/ws/chat")) as alice,
        client(live.ws_url("/ws/chat")) as bob,
    ):
        await wait_until(lambda: live.broadcaster.hub.statistics().topics.get("chat") == 2)
        await alice.send("hello")
        await bob.send(b"\x00\xff")
        for connection in (alice, bob):
            with anyio.fail_after(10):
                assert await connection.recv() == "hello"
                assert await connection.recv() == b"\x00\xff"


async def test_raw_and_multiplexed_clients_share_a_topic() -> None:
    """A raw publish reaches multiplexed subscribers as an envelope, bytes as base64."""
    async with (
        running_server() as live,
        client(live.ws_url("/ws/chat")) as raw,
        client(live.ws_url()) as mux,
    ):
        await subscribe(mux, "chat")
        await wait_until(lambda: live.broadcaster.hub.statistics().topics.get("chat") == 2)
        await raw.send("hi")
        await raw.send(b"\x01")
        assert await receive_envelopes(mux, 2) == [
            {"topic": "chat", "seq": 1, "data": "hi"},
            {"topic": "chat", "seq": 2, "data": "AQ==", "encoding": "base64"},
        ]


async def test_http_publish_reports_seq_and_subscribers() -> None:
    """POST /publish embeds JSON bodies as JSON and text bodies as strings."""
    async with running_server() as live, client(live.ws_url()) as mux:
        await subscribe(mux, "prices")
        async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
            first = await http.post("/publish/prices", json={"eur": 1.08})
            second = await http.post("/publish/prices", content="plain")
            empty = await http.post("/publish/nobody", content="x")
            topics = await http.get("/topics")
            health = await http.get("/healthz")
        assert first.json() == {"topic": "prices", "seq": 1, "subscribers": 1}
        assert second.json() == {"topic": "prices", "seq": 2, "subscribers": 1}
        assert empty.json() == {"topic": "nobody", "seq": 0, "subscribers": 0}
        assert topics.json() == {"prices": 1}
        assert health.json()["status"] == "ok"
        assert [e["data"] for e in await receive_envelopes(mux, 2)] == [{"eur": 1.08}, "plain"]


async def publish_while_draining(
    live: LiveServer, fast: list[ClientConnection], count: int
) -> list[list[int]]:
    """Publish ``count`` big messages to ``feed`` while the fast clients read them, never more
    than ``WINDOW`` ahead of the slowest: a fast client keeps up, it does not buffer a burst."""
    received: list[list[int]] = [[] for _ in fast]
    progress = anyio.Event()

    async def drain(index: int) -> None:
        while len(received[index]) < count:
            frame = await receive_json(fast[index])
            received[index].extend(
                e["seq"] for e in (frame if isinstance(frame, list) else [frame])
            )
            progress.set()

    async with anyio.create_task_group() as tg:
        for index in range(len(fast)):
            tg.start_soon(drain, index)
        for sent in range(count):
            while min(map(len, received)) < sent - WINDOW:
                progress = anyio.Event()
                await progress.wait()
            await live.broadcaster.publish("feed", "x" * (BIG - 100))
    return received


async def read_until_closed(connection: ClientConnection) -> tuple[list[int], int, str]:
    """Read a resumed client to the end: the seqs it saw, then the close code and reason."""
    seqs: list[int] = []
    with anyio.fail_after(20), suppress(ConnectionClosed):
        async for text in connection:
            frame = json.loads(text)
            seqs.extend(e["seq"] for e in (frame if isinstance(frame, list) else [frame]))
    assert connection.close_code is not None
    return seqs, connection.close_code, connection.close_reason or ""


@asynccontextmanager
async def stalled_scenario(
    overflow: Overflow,
) -> AsyncIterator[tuple[LiveServer, ClientConnection, Subscriber, list[ClientConnection]]]:
    """A server, one client that never reads, its server-side subscriber, five fast clients."""
    async with (
        running_server(stalled_settings(overflow)) as live,
        client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled,
        AsyncExitStack() as stack,
    ):
        await subscribe(stalled, "marker", "feed")
        (laggard,) = [s for s in live.broadcaster.hub.subscribers() if "marker" in s.topics]
        fast = [
            await stack.enter_async_context(client(live.ws_url(), max_size=None)) for _ in range(5)
        ]
        for connection in fast:
            await subscribe(connection, "feed")
        yield live, stalled, laggard, fast


async def test_stalled_client_is_disconnected_with_1013() -> None:
    """Under ``disconnect`` a client that stops reading is cut off, told why, and unsubscribed."""
    async with stalled_scenario(Overflow.DISCONNECT) as (live, stalled, laggard, fast):
        received = await publish_while_draining(live, fast, COUNT)
        assert received == [list(range(1, COUNT + 1))] * len(fast)
        await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"feed": 5})
        assert laggard.outbox.statistics().closed
        seqs, code, reason = await read_until_closed(stalled)
        assert (code, reason) == (1013, "slow consumer")
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < COUNT


@pytest.mark.parametrize("overflow", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST])
async def test_stalled_client_stays_within_its_bound_and_sees_the_gap(overflow: Overflow) -> None:
    """Under a drop policy a stalled client stays connected, bounded, and sees a seq gap."""
    async with stalled_scenario(overflow) as (live, stalled, laggard, fast):
        received = await publish_while_draining(live, fast, COUNT)
        assert received == [list(range(1, COUNT + 1))] * len(fast)
        stats = laggard.outbox.statistics()
        assert stats.dropped > 0
        assert not stats.closed
        assert stats.queued_messages <= stats.max_messages
        assert stats.queued_bytes <= stats.max_bytes
        assert live.broadcaster.hub.statistics().topics["feed"] == 6

        seqs: list[int] = []

        async def resume() -> None:
            while not seqs or seqs[-1] != COUNT + 1:
                frame = await receive_json(stalled)
                seqs.extend(e["seq"] for e in (frame if isinstance(frame, list) else [frame]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            await wait_until(lambda: laggard.outbox.statistics().queued_messages == 0)
            await live.broadcaster.publish("feed", "end")
        assert seqs == sorted(set(seqs))
        assert COUNT - stats.dropped <= len(seqs) - 1 < COUNT
        if overflow is Overflow.DROP_OLDEST:
            assert COUNT in seqs
