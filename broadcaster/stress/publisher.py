"""The publisher: messages to every topic in turn, at a fixed rate or flat out.

Over WebSocket it sends ``{"op":"publish",...}`` frames on one multiplexed connection, or raw
frames on one ``/ws/{topic}`` connection per topic (which, being subscribers too, get their own
messages back and read them so they never lag). Over HTTP it POSTs each message to
``/publish/{topic}``, one request at a time per topic so that each topic's counter reaches the
server in order. With further nodes, successive messages go to the nodes in turn, so that
every topic gets messages through each of them. A fixed rate is kept against the clock,
catching up after a stall; the achieved rate is what was actually sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import anyio
from picows import WSCloseCode, WSListener, WSMsgType

from broadcaster.protocol import Mode
from broadcaster.stress.clients import answer_close, connect, message_data

if TYPE_CHECKING:
    import httpx
    from picows import WSFrame, WSTransport

# Messages sent flat out between two checkpoints, so that the loop can read and flush.
BATCH = 64
# Pause after an HTTP 503 before the same message is offered again: short, because the
# point of the tool is to keep the server busy, not to honour Retry-After politely.
BUSY_RETRY_SECONDS = 0.01


class Via(StrEnum):
    """How the publisher reaches the server."""

    WS = "ws"
    HTTP = "http"


@dataclass(frozen=True, slots=True)
class PublisherPlan:
    """What to publish, where, how fast and for how long.

    Args:
        base_url: the server's ``ws://host:port`` (and any mount prefix).
        mode: raw frames on ``/ws/{topic}`` or publish ops on ``/ws`` (WebSocket only).
        via: WebSocket or HTTP.
        topics: published to in turn.
        size: bytes of each message's data.
        rate: messages a second over all topics; 0 publishes flat out.
        duration: seconds to publish for.
        connect_timeout: seconds to connect.
        other_urls: further nodes sharing a backplane with ``base_url``'s; messages go to
            each node in turn (multiplexed WebSocket or HTTP).
    """

    base_url: str
    mode: Mode
    via: Via
    topics: tuple[str, ...]
    size: int
    rate: float
    duration: float
    connect_timeout: float
    other_urls: tuple[str, ...] = ()

    @property
    def urls(self) -> tuple[str, ...]:
        """Every node published to."""
        return (self.base_url, *self.other_urls)


@dataclass(frozen=True, slots=True)
class PublisherResult:
    """What the publisher did: messages the server accepted, per topic and per time bin."""

    published: dict[str, int]
    bins: dict[str, list[int]]
    seconds: float
    rejected: int
    close_code: int | None
    close_reason: str
    error: str | None

    @property
    def total(self) -> int:
        """Messages published over all topics."""
        return sum(self.published.values())

    @property
    def achieved_rate(self) -> float:
        """Messages a second actually published."""
        return self.total / self.seconds if self.seconds > 0 else 0.0


class _Writer(WSListener):
    """A publishing connection: follows flow control and notes a close from the server."""

    def __init__(self) -> None:
        super().__init__()
        self.writable = anyio.Event()
        self.writable.set()
        self.closed = anyio.Event()
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Answer a close frame; drop anything else (raw sockets get their own messages)."""
        if frame.msg_type is WSMsgType.CLOSE and self.close_code is None:
            self.close_code, self.close_reason = answer_close(transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Wake a sender waiting for room on a connection that is gone."""
        self.closed.set()
        self.writable.set()

    def pause_writing(self) -> None:
        """The socket's write buffer is full: wait for the server to read."""
        if self.writable.is_set():
            self.writable = anyio.Event()

    def resume_writing(self) -> None:
        """The server has read enough to write again."""
        self.writable.set()


class Publisher:
    """Publishes a plan's messages; :meth:`open` connects, :meth:`run` publishes.

    Args:
        plan: what to publish.

    ``sent`` counts messages as they go, for progress displays. :meth:`aclose` closes its
    connections.
    """

    def __init__(self, plan: PublisherPlan) -> None:
        self.plan = plan
        self.sent = 0
        self._padding = b"x" * plan.size
        self._counters = [0] * len(plan.topics)
        self._writers: list[tuple[WSTransport, _Writer]] = []
        self._rejected = 0
        self._error: str | None = None
        self._bins: list[list[int]] = []
        self._t0_ns = 0
        self._bin_ns = 1

    async def open(self) -> None:
        """Connect the WebSocket connections (nothing to do over HTTP).

        Raises:
            OSError: a connection failed (``TimeoutError`` when it took too long).
            picows.WSError: the server refused a handshake.
        """
        if self.plan.via is Via.HTTP:
            return
        if self.plan.mode is Mode.RAW:
            urls = [f"{self.plan.base_url}/ws/{topic}" for topic in self.plan.topics]
        else:
            urls = [f"{url}/ws" for url in self.plan.urls]
        for url in urls:
            writer = _Writer()
            with anyio.fail_after(self.plan.connect_timeout):
                transport = await connect(url, writer)
            self._writers.append((transport, writer))

    async def run(self, t0_ns: int, bin_ns: int, bin_count: int) -> PublisherResult:
        """Publish for the plan's duration and return what was published.

        Args:
            t0_ns: the run's start, in ``time.time_ns()``; time bins count from it.
            bin_ns: the width of a time bin.
            bin_count: how many time bins there are; later messages go in the last.
        """
        self._t0_ns, self._bin_ns = t0_ns, bin_ns
        self._bins = [[0] * bin_count for _ in self.plan.topics]
        started = time.monotonic()
        end = started + self.plan.duration
        if self.plan.via is Via.HTTP:
            # Not cancelled at the end: a request cut short may have been published already,
            # uncounted. Each topic's loop stops sending at the end instead.
            await self._run_http(started, end)
        else:
            with anyio.move_on_after(self.plan.duration):
                await self._run_ws(started)
        if self._error is None:
            # At a fixed rate the last message goes out 1/rate before the end; the
            # publishing phase still lasts the whole duration.
            await anyio.sleep(max(end - time.monotonic(), 0))
        seconds = time.monotonic() - started
        closed = next((w for _, w in self._writers if w.close_code is not None), None)
        return PublisherResult(
            published=dict(zip(self.plan.topics, self._counters, strict=True)),
            bins=dict(zip(self.plan.topics, self._bins, strict=True)),
            seconds=seconds,
            rejected=self._rejected,
            close_code=closed.close_code if closed else None,
            close_reason=closed.close_reason if closed else "",
            error=self._error,
        )

    async def aclose(self) -> None:
        """Close the WebSocket connections with 1000 and wait for the server to close them.

        Callers bound the wait; connections still open when it ends are aborted.
        """
        try:
            for transport, _ in self._writers:
                transport.send_close(WSCloseCode.OK)
            for transport, _ in self._writers:
                await transport.wait_disconnected()
        finally:
            for transport, _ in self._writers:
                transport.disconnect(graceful=False)

    def _record(self, index: int, sent_ns: int) -> None:
        self._counters[index] += 1
        self.sent += 1
        bins = self._bins[index]
        bins[min(max((sent_ns - self._t0_ns) // self._bin_ns, 0), len(bins) - 1)] += 1

    async def _run_ws(self, started: float) -> None:
        topics, rate, size = self.plan.topics, self.plan.rate, self.plan.size
        raw = self.plan.mode is Mode.RAW
        prefixes = [b'{"op":"publish","topic":"%s","data":"' % topic.encode() for topic in topics]
        # At a fixed rate, exactly rate times duration messages; flat out, as many as time allows.
        count = math.ceil(rate * self.plan.duration) if rate else math.inf
        sent = 0
        while sent < count:
            if rate:
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
            index = sent % len(topics)
            transport, writer = self._writers[index if raw else sent % len(self._writers)]
            if writer.closed.is_set():
                self._error = "the server closed the publisher's connection"
                return
            if not writer.writable.is_set():
                await writer.writable.wait()
                continue
            now_ns = time.time_ns()
            data = message_data(self._counters[index] + 1, now_ns, size, self._padding)
            transport.send(WSMsgType.TEXT, data if raw else prefixes[index] + data + b'"}')
            self._record(index, now_ns)
            sent += 1
            if not rate and sent % BATCH == 0:
                await anyio.lowlevel.checkpoint()

    async def _run_http(self, started: float, end: float) -> None:
        # Imported here: only the HTTP publisher needs httpx.
        import httpx

        timeout = httpx.Timeout(self.plan.connect_timeout)
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            anyio.create_task_group() as tg,
        ):
            for index in range(len(self.plan.topics)):
                tg.start_soon(self._post_loop, client, index, (started, end), tg.cancel_scope)

    async def _post_loop(
        self,
        client: httpx.AsyncClient,
        index: int,
        period: tuple[float, float],
        scope: anyio.CancelScope,
    ) -> None:
        import httpx

        topic, rate, size = self.plan.topics[index], self.plan.rate, self.plan.size
        topics = len(self.plan.topics)
        bases = ["http" + url.removeprefix("ws") for url in self.plan.urls]
        started, end = period
        headers = {"content-type": "text/plain"}
        # This topic's share of rate times duration messages; flat out, as many as time allows.
        count = math.ceil((rate * self.plan.duration - index) / topics) if rate else math.inf
        while self._counters[index] < count:
            if rate:
                # This topic's share of the schedule: every topics-th slot, offset by index.
                slot = self._counters[index] * topics + index
                delay = started + slot / rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
            if time.monotonic() >= end:
                return
            now_ns = time.time_ns()
            data = message_data(self._counters[index] + 1, now_ns, size, self._padding)
            try:
                base = bases[self._counters[index] % len(bases)]
                response = await client.post(
                    f"{base}/publish/{topic}", content=data, headers=headers
                )
            except httpx.HTTPError as error:
                self._error = f"POST /publish/{topic}: {error!r}"
                scope.cancel()
                return
            if response.status_code == 503:
                self._rejected += 1
                await anyio.sleep(BUSY_RETRY_SECONDS)
                continue
            if response.status_code != 200:
                self._error = f"POST /publish/{topic}: HTTP {response.status_code} {response.text}"
                scope.cancel()
                return
            self._record(index, now_ns)
