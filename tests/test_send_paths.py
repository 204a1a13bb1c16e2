"""One behaviour, proven on both send paths: the fastlane's shared writer, and the sender task
each connection has on a server that offers no fastlane (plain ASGI)."""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from structlog.testing import capture_logs

from broadcaster.policy import Overflow
from broadcaster.settings import Settings
from tests.support import client, receive_envelopes, running_server, subscribe, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.support import LiveServer

BIG = 64 * 1024
# Big messages that more than fill a client's buffers and its socket's (a few MiB).
STALLING = 300
PATHS = pytest.mark.parametrize("plain_asgi", [False, True], ids=["fastlane", "plain-asgi"])


def settings(**changes: Any) -> Settings:
    """Small outboxes and big messages, so that a client that stops reading falls behind fast."""
    return Settings(
        queue_max_messages=8,
        queue_max_bytes=8 * BIG + 1024,
        max_message_bytes=BIG,
        log_format="json",
        **changes,
    )


async def publish_until(live: LiveServer, done: Callable[[], bool], limit: int = 2_000) -> int:
    """Publish big messages to ``feed`` until ``done()`` holds (at most ``limit``)."""
    for sent in range(1, limit + 1):
        await live.broadcaster.publish("feed", "x" * (BIG - 100))
        if done():
            return sent
        await anyio.lowlevel.checkpoint()
    raise AssertionError("the condition never held")


@PATHS
async def test_messages_arrive_in_order(plain_asgi: bool) -> None:
    """Every subscriber receives every message of its topic, in order."""
    async with (
        running_server(plain_asgi=plain_asgi) as live,
        client(live.ws_url()) as first,
        client(live.ws_url()) as second,
    ):
        for connection in (first, second):
            await subscribe(connection, "t")
        for n in range(50):
            await live.broadcaster.publish("t", n)
        for connection in (first, second):
            assert [e["data"] for e in await receive_envelopes(connection, 50)] == list(range(50))


@PATHS
async def test_a_client_that_overflows_its_outbox_is_closed_with_1013(plain_asgi: bool) -> None:
    """Under ``disconnect`` a client that stops reading is cut off, counted and unsubscribed."""
    async with (
        running_server(settings(overflow=Overflow.DISCONNECT), plain_asgi=plain_asgi) as live,
        client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled,
    ):
        await subscribe(stalled, "feed")
        totals = live.broadcaster.metrics.totals
        await publish_until(live, lambda: totals.slow_consumers["queue_full"] == 1)
        await wait_until(lambda: live.broadcaster.hub.statistics().topics == {})


@PATHS
async def test_a_write_that_never_completes_is_a_send_timeout(plain_asgi: bool) -> None:
    """A socket that takes nothing for SEND_TIMEOUT closes its connection as a slow consumer,
    whatever the policy."""
    config = settings(overflow=Overflow.DROP_OLDEST, send_timeout=0.5)
    async with (
        running_server(config, plain_asgi=plain_asgi) as live,
        client(live.ws_url(), receive_buffer=4096, max_size=None) as stalled,
    ):
        await subscribe(stalled, "feed")
        totals = live.broadcaster.metrics.totals
        # Enough to fill the client's buffers and the kernel's; then the clock runs.
        for _ in range(STALLING):
            await live.broadcaster.publish("feed", "x" * (BIG - 100))
        await wait_until(lambda: totals.slow_consumers["send_timeout"] == 1)
        await wait_until(lambda: live.broadcaster.hub.statistics().topics == {})


@PATHS
async def test_a_client_that_resets_mid_stream_leaves_no_error(plain_asgi: bool) -> None:
    """A connection reset while messages stream to it ends the connection quietly."""
    with capture_logs() as logs:
        async with running_server(settings(), plain_asgi=plain_asgi) as live:
            async with client(live.ws_url(), max_size=None) as leaving:
                await subscribe(leaving, "feed")
                transport = leaving.transport
                sock = transport.get_extra_info("socket")
                # SO_LINGER with a zero timeout: closing sends a reset, not a FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await live.broadcaster.publish("feed", "x" * (BIG - 100))
                transport.abort()
            await publish_until(live, lambda: live.broadcaster.hub.statistics().topics == {})
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert sum(live.broadcaster.metrics.totals.closed.values()) == 1
