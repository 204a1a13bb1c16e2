"""HTTP publishes: single ``POST /publish/{topic}``, batches, and one message to 1,000 topics.

A server is spawned (per-client limits lifted, as ``broadcaster stress --spawn`` does) and kept
on the server's cores; this process, on the load generator's cores, drives it with keep-alive
connections, each sending its next request as soon as the previous answer is read. The load
generator is a few lines of asyncio ``Protocol`` on uvloop writing prepared request bytes, so
it costs a few microseconds a request and needs nothing outside the ``stress`` extra (no
``wrk``). Each run warms up for ``WARM_UP_SECONDS``, then counts answers for
``MEASURE_SECONDS`` and takes the server's CPU time (user + system) around that window:
requests per server CPU second is requests per server core, whatever else the machine runs.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import uvloop
from measure import BROADCASTER, CLASSIC, STOP_SECONDS, Row, median, pinned_server, spread
from picows import WSListener

from broadcaster.stress.clients import connect

if TYPE_CHECKING:
    from measure import Bench
    from picows import WSFrame, WSTransport

    from broadcaster.stress.spawned import SpawnedServer

WARM_UP_SECONDS = 1.0
MEASURE_SECONDS = 5.0
# Connections for single publishes, as in the wrk runs.
SINGLE_CONNECTIONS = 32
BATCH_CONNECTIONS = 4
BATCH_MESSAGES = 1_000
BROADCAST_TOPICS = 1_000
BODY = b"hello from the bench"
CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)
# What each server answers when all is well.
OK = b"200"


def request(path: str, body: bytes, content_type: str = "text/plain") -> bytes:
    """An HTTP/1.1 keep-alive POST, as bytes ready to write."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Requester(asyncio.Protocol):
    """One keep-alive connection sending its requests in turn, one at a time, until stopped."""

    def __init__(self, requests: list[bytes], first: int, answers: Counter[bytes]) -> None:
        self._requests = requests
        self._next = first
        self._answers = answers
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.running = True
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast("asyncio.Transport", transport)
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        self._transport.write(self._requests[self._next % len(self._requests)])
        self._next += 1

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(buffer[:end])
            length = CONTENT_LENGTH.search(head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(buffer) < total:
                return
            self._answers[head[9:12]] += 1
            del buffer[:total]
            if self.running:
                self._send()
            else:
                assert self._transport is not None
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass(frozen=True)
class Load:
    """What one measured window did and what it cost the server."""

    requests: int
    failed: int
    messages_per_request: int
    seconds: float
    server_cpu_seconds: float | None

    @property
    def per_cpu_second(self) -> float | None:
        """Messages published per second of the server's CPU time."""
        if not self.server_cpu_seconds:
            return None
        return self.requests * self.messages_per_request / self.server_cpu_seconds

    @property
    def per_second(self) -> float:
        """Messages published per second of wall-clock time."""
        return self.requests * self.messages_per_request / self.seconds

    @property
    def cpu_ms_per_request(self) -> float | None:
        """The server's CPU time per request, in milliseconds."""
        if self.server_cpu_seconds is None or not self.requests:
            return None
        return self.server_cpu_seconds / self.requests * 1e3


class _Counter(WSListener):
    """A subscriber that reads (and counts) what it is sent, so the server never waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.received += 1


async def _drive(
    port: int,
    requests: list[bytes],
    connections: int,
    subscribe: str | None,
    cpu: SpawnedServer,
) -> tuple[Counter[bytes], float, float | None]:
    """Warm up, then measure one window; return the answers by status, the window's seconds
    and the server's CPU seconds in it."""
    subscriber = None
    if subscribe is not None:
        subscriber = await connect(f"ws://127.0.0.1:{port}{subscribe}", _Counter())
    loop = asyncio.get_running_loop()
    answers: Counter[bytes] = Counter()
    protocols = []
    for index in range(connections):
        _, protocol = await loop.create_connection(
            lambda index=index: _Requester(requests, index, answers),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
        protocols.append(protocol)
    await asyncio.sleep(WARM_UP_SECONDS)
    assert cpu.sampler is not None  # set by start()
    before, started, counted = cpu.sampler.cpu_seconds(), time.monotonic(), Counter(answers)
    await asyncio.sleep(MEASURE_SECONDS)
    after, seconds, window = cpu.sampler.cpu_seconds(), time.monotonic() - started, answers.copy()
    for protocol in protocols:
        protocol.running = False
    await asyncio.wait_for(asyncio.gather(*(p.closed for p in protocols)), STOP_SECONDS)
    if subscriber is not None:
        subscriber.disconnect()
    window.subtract(counted)
    used = after - before if before is not None and after is not None else None
    return window, seconds, used


def load_server(
    server_command: tuple[str, ...],
    server_cpus: tuple[int, ...],
    requests: list[bytes],
    *,
    connections: int,
    messages_per_request: int,
    subscribe: str | None = None,
) -> Load:
    """Spawn a server and measure one window of ``requests`` against it."""
    with pinned_server(server_command, server_cpus) as (server, base):
        port = int(base.rsplit(":", 1)[1])
        answers, seconds, used = uvloop.run(_drive(port, requests, connections, subscribe, server))
    failed = sum(count for status, count in answers.items() if status != OK)
    if failed:
        print(f"bench: {failed} requests failed: {dict(answers)}")
    return Load(answers[OK], failed, messages_per_request, seconds, used)


def _single(server: tuple[str, ...], cpus: tuple[int, ...]) -> Load:
    return load_server(
        server,
        cpus,
        [request("/publish/bench", BODY)],
        connections=SINGLE_CONNECTIONS,
        messages_per_request=1,
        subscribe="/ws/bench",
    )


def _batch(cpus: tuple[int, ...]) -> Load:
    items = [{"topic": f"bench.{n % 10}", "data": {"n": n}} for n in range(BATCH_MESSAGES)]
    body = json.dumps(items, separators=(",", ":")).encode()
    return load_server(
        BROADCASTER,
        cpus,
        [request("/publish", body, "application/json")],
        connections=BATCH_CONNECTIONS,
        messages_per_request=BATCH_MESSAGES,
    )


def _broadcast(server: tuple[str, ...], cpus: tuple[int, ...]) -> Load:
    """One message to 1,000 topics: one request to broadcaster; 1,000 single publishes to a
    server without a broadcast (counted as one broadcast per 1,000 answers)."""
    topics = [f"user.{n}" for n in range(BROADCAST_TOPICS)]
    if server == BROADCASTER:
        body = json.dumps({"topics": topics, "data": "notice"}).encode()
        return load_server(
            server,
            cpus,
            [request("/publish", body, "application/json")],
            connections=1,
            messages_per_request=BROADCAST_TOPICS,
        )
    singles = load_server(
        server,
        cpus,
        [request(f"/publish/{topic}", b"notice") for topic in topics],
        connections=SINGLE_CONNECTIONS,
        messages_per_request=1,
    )
    broadcasts = singles.requests // BROADCAST_TOPICS
    return Load(
        broadcasts, singles.failed, BROADCAST_TOPICS, singles.seconds, singles.server_cpu_seconds
    )


def publishing(bench: Bench) -> list[Row]:
    """Single publishes with one subscriber, 1,000-message batches, and broadcasts to 1,000
    topics, against the classic pattern's ``POST /publish/{topic}`` where it has one."""
    cpus = bench.placement.server_cpus
    single = bench.rotate(
        "publish-single",
        [
            ("classic", lambda: _single(CLASSIC, cpus)),
            ("broadcaster", lambda: _single(BROADCASTER, cpus)),
        ],
    )
    batch = bench.rotate("publish-batch", [("broadcaster", lambda: _batch(cpus))])["broadcaster"]
    broadcast = bench.rotate(
        "publish-broadcast",
        [
            ("classic", lambda: _broadcast(CLASSIC, cpus)),
            ("broadcaster", lambda: _broadcast(BROADCASTER, cpus)),
        ],
    )
    theirs = median([load.per_cpu_second for load in single["classic"]])
    mine = median([load.per_cpu_second for load in single["broadcaster"]])
    batched = median([load.per_cpu_second for load in batch])

    def failures(loads: list[Load]) -> str:
        return f"{sum(load.failed for load in loads)} failed over {len(loads)} runs"

    return [
        Row(
            "publish-single",
            "POST /publish/{topic} per server CPU second (1 subscriber)",
            spread([load.per_cpu_second for load in single["classic"]], ",.0f"),
            spread([load.per_cpu_second for load in single["broadcaster"]], ",.0f"),
            ">= 12,000 and > 2x classic",
            mine is not None and theirs is not None and mine >= 12_000 and mine > 2 * theirs,
        ),
        Row(
            "publish-single",
            f"publishes/s, wall clock, {SINGLE_CONNECTIONS} connections",
            spread([load.per_second for load in single["classic"]], ",.0f"),
            spread([load.per_second for load in single["broadcaster"]], ",.0f"),
            "-",
            None,
        ),
        Row(
            "publish-single",
            "refused or failed publishes",
            failures(single["classic"]),
            failures(single["broadcaster"]),
            "0 failed",
            all(load.failed == 0 for load in single["broadcaster"]),
        ),
        Row(
            "publish-batch",
            f"messages into the hub per server CPU second ({BATCH_MESSAGES:,} a request)",
            "no batch route",
            spread([load.per_cpu_second for load in batch], ",.0f"),
            ">= 200,000",
            batched is not None and batched >= 200_000,
        ),
        Row(
            "publish-batch",
            "messages/s, wall clock",
            "no batch route",
            spread([load.per_second for load in batch], ",.0f"),
            "-",
            None,
        ),
        Row(
            "publish-broadcast",
            f"server CPU ms per message to {BROADCAST_TOPICS:,} topics",
            spread([load.cpu_ms_per_request for load in broadcast["classic"]], ".1f"),
            spread([load.cpu_ms_per_request for load in broadcast["broadcaster"]], ".1f"),
            "one request",
            all(load.failed == 0 for load in broadcast["broadcaster"]),
        ),
        Row(
            "publish-broadcast",
            "requests per message to 1,000 topics",
            f"{BROADCAST_TOPICS:,}",
            "1",
            "-",
            None,
        ),
    ]
