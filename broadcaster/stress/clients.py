"""Fake WebSocket clients on picows, and the tallies of what they receive.

The publisher starts each message's data with its per-topic counter and its send time in
nanoseconds (``time.time_ns()``, comparable across processes on one machine), then pads it
to the message size: ``b"17 1795600741784948197 xxxx..."``. A raw-mode frame is exactly that
data; a multiplexed frame wraps it in an envelope, ``{"topic":T,"seq":N,"data":"17 ..."}``, or
holds a JSON array of envelopes when the server coalesced queued messages. Receivers take
the sequence number from the envelope's ``seq`` in multiplexed mode and from the counter in
raw mode, and find the fields with ``bytes.find`` rather than decoding JSON, so that one
process can count several hundred thousand messages a second.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import anyio
from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

if TYPE_CHECKING:
    from picows import WSFrame, WSParsedURL, WSTransport


class Kind(StrEnum):
    """How a fake client reads."""

    FAST = "fast"
    SLOW = "slow"
    STALLED = "stalled"
    CHURN = "churn"
    RECONNECT = "reconnect"


# Latency histogram in microseconds: exact below 64 µs, then 32 buckets per power of two
# (about 3 % wide), so that merging clients and processes is adding lists.
SUB_BUCKETS = 32
HISTOGRAM_SIZE = 1024
# Largest frame a receiver accepts: coalesced frames hold a whole outbox.
MAX_FRAME_BYTES = 1 << 30
# Seconds picows waits for the server's handshake response before it closes the socket.
HANDSHAKE_SECONDS = 10.0
# SO_RCVBUF of connections that read freely. picows doubles its read buffer whenever a read
# fills it, so under a backlog the kernel's autotuned buffer (up to tcp_rmem's maximum)
# would become the size of every read: memory and time per read without bound, and an
# event loop that gets round to its other work only every few seconds. 256 KiB is still a
# wide window on loopback.
FREE_RECEIVE_BUFFER = 256 * 1024

_SEQ = b'"seq":'
_DATA = b'"data":"'
_CONTROL = b'{"op":'


def bucket(micros: int) -> int:
    """Return the histogram bucket of a latency in microseconds."""
    if micros < 2 * SUB_BUCKETS:
        return max(micros, 0)
    shift = micros.bit_length() - 6
    return min(shift * SUB_BUCKETS + (micros >> shift), HISTOGRAM_SIZE - 1)


def bucket_micros(index: int) -> float:
    """Return the latency in microseconds in the middle of a histogram bucket."""
    if index < 2 * SUB_BUCKETS:
        return float(index)
    shift = index // SUB_BUCKETS - 1
    top = index % SUB_BUCKETS + SUB_BUCKETS
    return (top << shift) + (1 << shift) / 2


def message_data(counter: int, sent_ns: int, size: int, padding: bytes) -> bytes:
    """Return a message's data: counter, send time, padding up to ``size`` bytes."""
    head = b"%d %d " % (counter, sent_ns)
    return head + padding[: size - len(head)]


@dataclass(slots=True)
class Tally:
    """What one client received: counts, ``seq`` gaps, latencies, arrivals over time.

    ``last_seq`` is 0 for a client subscribed before the first publish, so that messages
    dropped before its first delivery count as a gap; churn sessions set it to ``None``.
    """

    received: int = 0
    gaps: int = 0
    reordered: int = 0
    unparsed: int = 0
    max_latency_us: int = 0
    last_seq: int | None = 0
    # The first seq of a churn session, which starts with last_seq None.
    first_seq: int = 0
    last_counter: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_SIZE)
    # Messages received per time bin, by the bin of their send time; set by begin().
    bins: list[int] = field(default_factory=lambda: [0])
    t0_ns: int = 0
    bin_ns: int = 1

    def begin(self, t0_ns: int, bin_ns: int, bin_count: int) -> None:
        """Start the clock that time bins count from."""
        self.t0_ns = t0_ns
        self.bin_ns = bin_ns
        self.bins = [0] * bin_count

    def mux(self, payload: bytes, now_ns: int) -> int:
        """Count the envelopes of a multiplexed frame; return how many it held."""
        count = 0
        position = payload.find(_SEQ)
        while position != -1:
            try:
                end = payload.index(b",", position)
                seq = int(payload[position + 6 : end])
                start = payload.index(_DATA, end) + 8
                space = payload.index(b" ", start)
                after = payload.index(b" ", space + 1)
                self.count(seq, int(payload[start:space]), int(payload[space + 1 : after]), now_ns)
            except ValueError:
                self.unparsed += 1
                return count
            count += 1
            position = payload.find(_SEQ, after)
        return count

    def raw(self, payload: bytes, now_ns: int) -> int:
        """Count a raw-mode frame, whose counter is its sequence number; return 1 or 0."""
        try:
            space = payload.index(b" ")
            after = payload.index(b" ", space + 1)
            counter = int(payload[:space])
            self.count(counter, counter, int(payload[space + 1 : after]), now_ns)
        except ValueError:
            self.unparsed += 1
            return 0
        return 1

    def count(self, seq: int, counter: int, sent_ns: int, now_ns: int) -> None:
        """Count one message: its ``seq``, the publisher's counter and its send time."""
        self.received += 1
        last = self.last_seq
        if last is None:
            self.first_seq = seq
        elif seq != last + 1:
            if seq > last:
                self.gaps += seq - last - 1
            else:
                self.reordered += 1
        self.last_seq = seq
        # The highest, not the latest: messages published through two nodes may arrive in
        # another order than their counters.
        self.last_counter = max(self.last_counter, counter)
        micros = (now_ns - sent_ns) // 1000
        self.histogram[bucket(micros)] += 1
        if micros > self.max_latency_us:
            self.max_latency_us = micros
        index = (sent_ns - self.t0_ns) // self.bin_ns
        bins = self.bins
        bins[min(max(index, 0), len(bins) - 1)] += 1


def answer_close(transport: WSTransport, frame: WSFrame) -> tuple[int, str]:
    """Echo the server's close frame, drop the connection, and return its code and reason."""
    code = frame.get_close_code()
    transport.send_close(code)
    transport.disconnect()
    number = code.value if isinstance(code, WSCloseCode) else int(code)
    return number, frame.get_close_reason() or ""


class Receiver(WSListener):
    """One subscriber connection: counts what arrives, and can pause or ration its reading.

    Args:
        tally: where messages are counted.
        raw: the socket is on ``/ws/{topic}`` rather than the multiplexed ``/ws``.

    Pausing stops reading from the socket itself (``pause_reading`` on the transport), so
    the server meets real TCP backpressure rather than a client that buffers in memory.
    """

    def __init__(self, tally: Tally, *, raw: bool) -> None:
        super().__init__()
        self.tally = tally
        self.raw = raw
        self.transport: WSTransport | None = None
        self.subscribed = anyio.Event()
        self.finished = anyio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.left = False
        self.errors: list[str] = []
        # Messages it may read before it pauses (slow clients); None reads freely.
        self.budget: float | None = None
        self.paused = False
        # The last counter the publisher sent to this topic, once the publisher is done.
        self.target: int | None = None
        # time.time_ns() at the end of the drain: later frames are not counted, and the
        # client leaves.
        self.deadline_ns: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Keep the transport, which pausing and leaving need."""
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Count a message frame, note a control frame, answer a close frame."""
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            now_ns = time.time_ns()
            if self.deadline_ns is not None and now_ns > self.deadline_ns:
                # Too late to count. An overloaded process can spend seconds in one read's
                # frames; skipping them keeps the end of a run within its deadline.
                self.leave()
                return
            payload = frame.get_payload_as_bytes()
            if self.raw:
                count = self.tally.raw(payload, now_ns)
            else:
                # The server sends each control frame on its own, "op" first; the
                # subscribed one carries a "seq" that is not a message's.
                if payload.startswith(_CONTROL):
                    self._control(payload)
                    count = 0
                else:
                    count = self.tally.mux(payload, now_ns)
            if self.budget is not None:
                self.budget -= count
                if self.budget <= 0:
                    self.pause()
            if self.target is not None and self.tally.last_counter >= self.target:
                self.finished.set()
        elif msg_type is WSMsgType.CLOSE:
            if self.left:
                transport.disconnect()
            else:
                # The server closed first: this is the code and reason the report shows.
                self.close_code, self.close_reason = answer_close(transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Stop waiting on a connection that has ended."""
        self.finished.set()

    def pause_writing(self) -> None:
        """Ignore: receivers write nothing but a subscribe and a close."""

    def resume_writing(self) -> None:
        """Ignore: receivers write nothing but a subscribe and a close."""

    def pause(self) -> None:
        """Stop reading from the socket, so that the kernel's buffers fill up."""
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.underlying_transport.pause_reading()

    def resume(self) -> None:
        """Read from the socket again."""
        if self.paused and self.transport is not None and not self.transport.is_disconnected:
            self.paused = False
            self.transport.underlying_transport.resume_reading()

    def expect(self, target: int) -> None:
        """Set the last counter to wait for; ``finished`` is set once it has arrived."""
        self.target = target
        if self.tally.last_counter >= target:
            self.finished.set()

    def leave(self, *, reset: bool = False) -> None:
        """Close with 1000, or with a TCP reset (``SO_LINGER`` 0) and no close frame."""
        transport = self.transport
        if self.left or transport is None or transport.is_disconnected:
            return
        self.left = True
        if reset:
            sock = transport.underlying_transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.disconnect(graceful=False)
            return
        transport.send_close(WSCloseCode.OK)
        transport.disconnect()

    def _control(self, payload: bytes) -> None:
        frames = json.loads(payload)
        for item in frames if isinstance(frames, list) else [frames]:
            if item.get("op") == "subscribed":
                self.subscribed.set()
            elif item.get("op") == "error":
                self.errors.append(f"{item.get('error')}: {item.get('detail')}")


async def connect(
    url: str,
    listener: WSListener,
    *,
    receive_buffer: int = FREE_RECEIVE_BUFFER,
    source: str | None = None,
) -> WSTransport:
    """Open a WebSocket to ``url`` with picows and return its transport.

    Callers bound the wait with a cancel scope; picows itself gives up on a handshake
    after ``HANDSHAKE_SECONDS`` and closes the socket.

    Args:
        url: ``ws://host:port/path``.
        listener: receives the connection's frames.
        receive_buffer: ``SO_RCVBUF`` for the socket, set before it connects so that the
            TCP window is that small from the start.
        source: the local address to connect from; ``None`` lets the kernel choose.

    Raises:
        OSError: the connection failed (``TimeoutError`` for a handshake that took too long).
        picows.WSError: the server refused the handshake.
    """

    def make_socket(parsed: WSParsedURL) -> socket.socket:
        family = socket.AF_INET6 if ":" in parsed.host else socket.AF_INET
        # IPPROTO_TCP given, not left 0: asyncio sets TCP_NODELAY only on such sockets.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source is not None:
            sock.bind((source, 0))
        return sock

    transport, _ = await ws_connect(
        lambda: listener,
        url,
        socket_factory=make_socket,
        websocket_handshake_timeout=HANDSHAKE_SECONDS,
        max_frame_size=MAX_FRAME_BYTES,
    )
    return transport


async def subscribe(transport: WSTransport, receiver: Receiver, topic: str) -> None:
    """Subscribe a multiplexed connection to ``topic`` and wait for the acknowledgement.

    Callers bound the wait: a connection that ends first is never acknowledged.
    """
    transport.send(WSMsgType.TEXT, b'{"op":"subscribe","topic":"' + topic.encode() + b'"}')
    await receiver.subscribed.wait()
