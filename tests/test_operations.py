"""Operating a server: readiness, heartbeats, idle connections, draining on SIGTERM."""

from __future__ import annotations

import json
import signal
from contextlib import suppress

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from broadcaster.settings import Settings
from tests.support import (
    RawClient,
    client,
    handshake_refusal,
    receive_json,
    running_server,
    serving,
    subscribe,
    wait_until,
)


async def wait_for_status(http: httpx.AsyncClient, path: str, expected: int) -> None:
    """Ask ``path`` until it answers ``expected``, within a deadline."""
    with anyio.fail_after(10):
        while (await http.get(path)).status_code != expected:
            pass


async def test_readyz_is_200_while_the_hub_runs() -> None:
    """/readyz answers 200 ready on a running server."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        response = await http.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_a_client_that_stops_answering_pings_is_closed_and_unsubscribed() -> None:
    """With no pong within the ping timeout, the connection ends and leaves the hub."""
    settings = Settings(ping_interval=0.1, ping_timeout=0.1, log_format="json")
    async with running_server(settings) as live:
        silent = await RawClient.connect(live, "/ws/quiet")
        await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"quiet": 1})
        # The raw client reads nothing, so it never answers a ping.
        await wait_until(lambda: live.broadcaster.hub.statistics().subscribers == 0, deadline=5)
        await silent.stream.aclose()


async def test_a_connection_subscribed_to_nothing_is_closed_when_idle() -> None:
    """IDLE_TIMEOUT closes a connection without subscriptions with 1008; others stay."""
    settings = Settings(idle_timeout=0.2, log_format="json")
    async with (
        running_server(settings) as live,
        client(live.ws_url()) as idle,
        client(live.ws_url()) as busy,
    ):
        await subscribe(busy, "t")
        with anyio.fail_after(10), pytest.raises(ConnectionClosed):
            await idle.recv()
        assert (idle.close_code, idle.close_reason) == (1008, "idle timeout")
        await busy.send('{"op": "ping"}')
        assert await receive_json(busy) == {"op": "pong"}
        assert live.broadcaster.hub.statistics().topics == {"t": 1}


async def test_sigterm_drains_queued_messages_then_closes_with_1001() -> None:
    """On SIGTERM /readyz turns 503, handshakes are refused, outboxes flush, then 1001 and 0."""
    count = 120
    # An outbox that holds every message: the kernel holds next to nothing of a backlog.
    env = {
        "BROADCASTER_DRAIN_TIMEOUT": "20",
        "BROADCASTER_QUEUE_MAX_MESSAGES": str(count),
        "BROADCASTER_QUEUE_MAX_BYTES": str(count * 32_000),
    }
    with serving(env) as (process, port):
        base = f"http://127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(base_url=base, trust_env=False) as http,
            client(f"ws://127.0.0.1:{port}/ws", receive_buffer=4096, max_size=None) as reader,
        ):
            assert (await http.get("/readyz")).status_code == 200
            await subscribe(reader, "feed")
            for n in range(count):
                response = await http.post("/publish/feed", json={"n": n, "pad": "x" * 30_000})
                assert response.status_code == 200
            process.send_signal(signal.SIGTERM)
            await wait_for_status(http, "/readyz", 503)
            status, error, _ = await handshake_refusal(f"ws://127.0.0.1:{port}/ws")
            assert (status, error) == (503, "draining")
            seen: list[int] = []
            with anyio.fail_after(20), suppress(ConnectionClosed):
                async for text in reader:
                    seen.append(json.loads(text)["data"]["n"])
            assert (reader.close_code, reader.close_reason) == (1001, "server shutting down")
            assert seen == list(range(count))
        with anyio.fail_after(20):
            assert await anyio.to_thread.run_sync(process.wait) == 0


async def test_a_second_signal_stops_the_drain_at_once() -> None:
    """A second SIGTERM during a drain that cannot finish ends the process without waiting for
    it, and still shuts the app down cleanly."""
    env = {"BROADCASTER_DRAIN_TIMEOUT": "600"}
    with serving(env) as (process, port):
        base = f"http://127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(base_url=base, trust_env=False) as http,
            client(f"ws://127.0.0.1:{port}/ws", receive_buffer=4096, max_size=None) as stalled,
        ):
            await subscribe(stalled, "feed")
            for _ in range(200):
                await http.post("/publish/feed", content="x" * 30_000)
            process.send_signal(signal.SIGTERM)
            await wait_for_status(http, "/readyz", 503)
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                status = await anyio.to_thread.run_sync(process.wait)
        assert status == 0
        # The app still shuts down in order: nothing is cancelled under it and logged as an error.
        assert process.stderr is not None
        lines = [json.loads(line) for line in process.stderr.read().splitlines()]
        assert [line["event"] for line in lines if line["level"] == "error"] == []
        assert "hub_stopped" in [line["event"] for line in lines]
