"""The uvicorn HTTP protocol broadcaster serves with: HTTP bounded in time, size and number.

uvicorn's httptools protocol takes a request head of any size with any number of headers, a
body at any pace, and any number of connections, each of which an attacker can hold open
with a byte now and then. :class:`HTTPProtocol` bounds each of them:

- a request head must arrive whole within ``head_timeout`` of its first byte (or of the
  connection opening), or the connection is dropped;
- a head over ``max_head_bytes`` (counted as the bytes arrive, so that a header streamed
  forever is cut off at the limit rather than buffered until it ends) or with more than
  ``max_headers`` headers is answered 431 and closed, as is a chunked body whose framing and
  trailers (which httptools buffers like headers) outgrow that limit;
- a body must arrive whole within ``body_timeout`` of its head, and, after a grace of
  :data:`BODY_RATE_GRACE` seconds, at an average of at least ``body_min_rate`` bytes a
  second, or it is answered 408 and closed;
- a server holds at most ``max_connections`` HTTP connections, and at most
  ``max_connections_per_address`` from one client address: past them a new connection is
  answered 503 or 429 (with ``Retry-After``) and closed, without the app ever running.

A refused request's connection lingers briefly before it closes, so that the client can read
the answer (see :meth:`HTTPProtocol._refuse`).

A connection upgraded to a WebSocket stops counting as an HTTP connection when uvicorn hands
its transport to the WebSocket protocol; ``BROADCASTER_MAX_CONNECTIONS`` bounds those.

Every refusal is counted through the server's :class:`broadcaster.http_gate.HTTPGate`. A
request whose body the server cut off is marked in the ASGI scope extension
:data:`broadcaster.errors.SERVER_REFUSAL`, so that the app, which then sees the client as
gone, does not count it twice.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from broadcaster.errors import SERVER_REFUSAL, Refused
from broadcaster.http_gate import HTTPGate, HTTPLimits

if TYPE_CHECKING:
    import asyncio

    from starlette.types import Receive, Scope
    from uvicorn.config import Config
    from uvicorn.server import ServerState

# Seconds a body may take before its rate is judged: room for the round trip of an
# ``Expect: 100-continue`` and for TCP's slow start on a long link.
BODY_RATE_GRACE = 2.0
# Fewest seconds between two looks at a body's progress, so that a slow body costs few timers.
BODY_CHECK_INTERVAL = 0.25
# Bytes of chunk framing allowed per byte of body, on top of the head's limit: a chunk of
# one byte takes five ("1\r\n", then "\r\n" after it).
FRAMING_PER_BODY_BYTE = 8
# The ASGI scope extension through which the app drops a connection whose client stopped
# reading before its response could end: ``scope["extensions"][ABORT]["abort"]()``. Without
# it, the app could only return with the response unfinished, which uvicorn logs as an error.
ABORT = "broadcaster.abort"
# Seconds a dropped connection may take to be seen gone by the server.
DROP_TIMEOUT = 5.0
# Seconds, and bytes read and dropped, after which a refused request's connection is closed
# even though its client is still sending.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024


async def drop_connection(scope: Scope, receive: Receive) -> None:
    """Drop the connection of a response that cannot end because its client stopped reading,
    and return once the server has seen it gone: a response left unfinished on a live
    connection is what uvicorn logs as an error. Servers without :data:`ABORT` are left to
    deal with it themselves."""
    abort = scope.get("extensions", {}).get(ABORT, {}).get("abort")
    if abort is None:
        return
    abort()
    with anyio.move_on_after(DROP_TIMEOUT):
        while (await receive())["type"] != "http.disconnect":
            pass


def refusal_response(refused: Refused, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP response for ``refused``, with a JSON body like the app's refusals, that
    closes the connection."""
    body = json.dumps({"error": refused.error, "detail": refused.detail}).encode()
    head = [STATUS_LINE[refused.status]]
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((name.lower().encode(), value.encode()) for name, value in refused.headers.items()),
    ]
    head.extend(name + b": " + value + b"\r\n" for name, value in headers)
    return b"".join([*head, b"\r\n", body])


class HTTPProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounding each connection in time, size and number.

    :func:`broadcaster.server.uvicorn_config` serves a subclass whose ``gate`` is shared by
    every connection of the server. Without one, each connection gets the default
    :class:`HTTPLimits` and a gate of its own, so that only the connection limits are lost.
    """

    gate: HTTPGate | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._gate = self.gate if self.gate is not None else HTTPGate(HTTPLimits())
        self._limits = self._gate.limits
        # The address whose slot this connection holds, until it ends or upgrades.
        self._address: str | None = None
        # One timer at a time: the head's, then the body's, then the next head's.
        self._timer: asyncio.TimerHandle | None = None
        self._reading_head = True
        self._head_bytes = 0
        self._header_count = 0
        # When the current request's head ended, while its body has not arrived whole.
        self._body_started: float | None = None
        self._body_bytes = 0
        # Bytes received while the body arrives, framing included.
        self._body_wire = 0
        self._verdict: dict[object, object] = {}
        # The server has answered (or dropped) the connection itself; the parser is ignored.
        self._refused = False
        self._lingered = 0
        self._upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        refused = self._gate.admit(address)
        if refused is not None:
            self._refuse(refused)
            return
        self._address = address
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser as uvicorn does, but no more than the head's limit while a head
        is being read: httptools buffers a header until it ends, however long it is."""
        if self._refused:  # lingering after a refusal: drop what the client still sends
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        while self._reading_head:
            room = self._limits.max_head_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                break
            # The head may end within its limit and be followed by a body: feed up to the
            # limit, and see.
            self._head_bytes += room
            super().data_received(data[:room])
            if self._refused or self._upgraded or self.transport.is_closing():
                return
            if self._reading_head:
                limit = self._limits.max_head_bytes
                detail = f"the request head exceeds {limit} bytes"
                self._refuse(Refused(431, "header_too_large", detail), linger=True)
                return
            data = data[room:]
        started = self._body_started
        super().data_received(data)
        if self._refused or self._body_started is None:
            return
        if self._body_started == started:  # the same body, still arriving
            self._body_wire += len(data)
            # Chunk sizes and trailers are not body: httptools buffers a trailer as it does
            # a header, so their bytes are bounded like a head's, plus a little per byte of
            # body for the framing of small chunks.
            framing = self._body_wire - self._body_bytes
            if framing > self._limits.max_head_bytes + FRAMING_PER_BODY_BYTE * self._body_bytes:
                detail = "the body's chunk framing and trailers are too large"
                self._refuse(Refused(431, "header_too_large", detail), linger=True)
                return
        if self._timer is None:
            self._schedule_body_check()

    def on_message_begin(self) -> None:
        """Start the next request's clock at its first byte."""
        if self._refused:
            return
        super().on_message_begin()
        self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Take a header, unless it is one too many."""
        if self._refused:
            return
        self._header_count += 1
        if self._header_count > self._limits.max_headers:
            limit = self._limits.max_headers
            self._refuse(
                Refused(431, "too_many_headers", f"more than {limit} headers"), linger=True
            )
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """Stop the head's clock and start the body's, unless the request upgrades."""
        if self._refused:
            return
        self._stop_timer()
        self._reading_head = False
        self._verdict = {}
        self.scope["extensions"] = {
            SERVER_REFUSAL: self._verdict,
            ABORT: {"abort": self.transport.abort},
        }
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle:  # a request was started (or queued) rather than upgraded
            self._body_started = self.loop.time()
            self._body_bytes = self._body_wire = 0

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        """Stop the body's clock; the next bytes are the next request's head."""
        if self._refused:
            return
        self._stop_timer()
        self._body_started = None
        self._reading_head = True
        # The rest of the chunk being fed (a pipelined head) goes uncounted: at most one
        # read, on top of the limit.
        self._head_bytes = self._header_count = 0
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol as uvicorn does; from now on it is
        not an HTTP connection, and gives its slot back."""
        if self._refused:
            return
        self._stop_timer()
        self._release()
        self._upgraded = True
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        """Answer a request that is not HTTP as uvicorn does, and count it."""
        if self._refused:
            return
        self._refused = True
        self._stop_timer()
        self._gate.count(Refused(400, "invalid_request", msg), self._peer())
        super().send_400_response(msg)

    def _refuse(self, refused: Refused, *, answer: bool = True, linger: bool = False) -> None:
        """Count ``refused``, answer it unless the app's own response has begun, and close.

        With ``linger``, the connection is closed only after the client has had
        :data:`LINGER_SECONDS` to read the answer, while what it still sends is read and
        dropped: closing a socket with unread data resets it, and a reset may destroy the
        answer before the client reads it. A lingering connection keeps its slot.
        The app, if it runs, sees the client as gone once the connection is closed.
        """
        self._refused = True
        self._stop_timer()
        self._verdict["error"] = refused.error
        self._gate.count(refused, self._peer())
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if answer and not started and not self.transport.is_closing():
            self.transport.write(refusal_response(refused, self.server_state.default_headers))
        if not linger or self.transport.is_closing():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _start_head_timer(self) -> None:
        if self._timer is None and not self._refused:
            self._timer = self.loop.call_later(self._limits.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._timer = None
        # Dropped without an answer, as uvicorn drops an idle keep-alive connection: the
        # client may never have sent a byte.
        timeout = self._limits.head_timeout
        refused = Refused(408, "head_timeout", f"no whole request head within {timeout} s")
        self._refuse(refused, answer=False)

    def _schedule_body_check(self) -> None:
        """Look at the body again when it would fall behind its rate, or at its deadline."""
        assert self._body_started is not None
        limits, now = self._limits, self.loop.time()
        due = self._body_started + limits.body_timeout
        if limits.body_min_rate and not self._answered():
            behind = self._body_started + BODY_RATE_GRACE + self._body_bytes / limits.body_min_rate
            due = min(due, max(behind, now + BODY_CHECK_INTERVAL))
        self._timer = self.loop.call_later(max(due - now, 0.0), self._check_body)

    def _check_body(self) -> None:
        self._timer = None
        assert self._body_started is not None
        limits = self._limits
        elapsed = self.loop.time() - self._body_started
        if self._answered():
            # The app has answered without the rest of the body (a 401 or a 413, say): at
            # the deadline, close as for an idle keep-alive connection, with nothing to count.
            if elapsed >= limits.body_timeout:
                self._refused = True
                self.transport.close()
                return
        elif elapsed >= limits.body_timeout:
            detail = f"the body did not arrive within {limits.body_timeout} s"
            self._refuse(Refused(408, "body_timeout", detail), linger=True)
            return
        elif self._body_bytes < limits.body_min_rate * (elapsed - BODY_RATE_GRACE):
            detail = f"the body arrived slower than {limits.body_min_rate} bytes a second"
            self._refuse(Refused(408, "body_too_slow", detail), linger=True)
            return
        self._schedule_body_check()

    def _answered(self) -> bool:
        """Whether the app has begun its response to the current request."""
        cycle = self.cycle
        return cycle is not None and cycle.response_started

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        if self._address is not None:
            self._gate.release(self._address)
            self._address = None

    def _peer(self) -> str | None:
        return f"{self.client[0]}:{self.client[1]}" if self.client else None
