"""Server-Sent Events: one topic's messages as a ``text/event-stream``, for ``EventSource``.

An SSE client is served by a :class:`broadcaster.connection.Connection` like any WebSocket
client, in multiplexed mode: the same outbox, overflow policy, limits, token checks and
metrics. :class:`EventStream` is the socket that connection talks to. Its reader side hands
the connection one ``subscribe`` (with the position to resume from) and then a ``ping`` every
ping interval until the client goes; the hub's ``pong`` goes out as a ``: keepalive`` comment,
which keeps proxies from timing the stream out. Its writer side turns each message envelope
into an event whose ``id`` is ``EPOCH:SEQ``, so that a browser's automatic ``Last-Event-ID``
resumes from history. A close becomes an ``event: close`` that says why, then the end of the
response.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anyio

from broadcaster.errors import CloseCode, Closing, ProtocolError, ShuttingDown
from broadcaster.http_protocol import drop_connection
from broadcaster.protocol import Position, parse_epoch, parse_query_count

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from starlette.types import Receive, Scope, Send

    from broadcaster.protocol import Frame
    from broadcaster.writer import Lane

# The header a browser's EventSource sends when it reconnects, and the query parameter a
# client may use instead (a first connection cannot set headers).
LAST_EVENT_ID = "last-event-id"
LAST_EVENT_ID_PARAMETER = "lastEventId"
# Milliseconds a browser waits before it reconnects, sent at the start of each stream.
RETRY_MILLISECONDS = 1000
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
KEEPALIVE = b": keepalive\n\n"
PING = '{"op":"ping"}'
# Seconds the end of a response may take to be written before the connection is dropped: a
# client that stopped reading would otherwise hold it, and its memory, for good.
FINISH_TIMEOUT = 5.0


def resume_point(
    headers: Mapping[str, str], query: Mapping[str, str]
) -> tuple[Position | None, int | None]:
    """Read where a stream starts: after ``Last-Event-ID`` (the header, else the
    ``lastEventId`` parameter), or with the latest ``?last=K`` messages, or from now.

    ``Last-Event-ID`` wins over ``last``: a browser reconnecting to a ``?last=K`` URL resumes
    where it was rather than rewinding again. An empty ``Last-Event-ID`` means from now.

    Raises:
        ProtocolError: ``invalid_last_event_id`` (not ``EPOCH:SEQ``) or ``invalid_last``.
    """
    text = headers.get(LAST_EVENT_ID) or query.get(LAST_EVENT_ID_PARAMETER)
    if text:
        return parse_event_id(text), None
    last = query.get("last")
    return None, None if last is None else parse_query_count(last, "last", "invalid_last")


def parse_event_id(text: str) -> Position:
    """Read an event id, ``EPOCH:SEQ``, as the position it names.

    Raises:
        ProtocolError: ``invalid_last_event_id``.
    """
    epoch, colon, seq = text.rpartition(":")
    error = "invalid_last_event_id"
    if not colon:
        raise ProtocolError(error, "Last-Event-ID is EPOCH:SEQ, as in the events' id field")
    return Position(parse_epoch(epoch, error), parse_query_count(seq, "the seq", error))


class EventStream:
    """The :class:`broadcaster.connection.Socket` over one ASGI HTTP response.

    Args:
        scope, receive, send: the request's ASGI scope and callables.
        topic: the one topic the stream carries.
        since, last: where to start (see :func:`resume_point`).
        ping_interval: seconds between keepalive comments.

    Call :meth:`start` before the connection runs and :meth:`finish` after it, which ends
    the response unless :meth:`close` has, and drops the connection if the end cannot be
    written.
    """

    __slots__ = (
        "_complete",
        "_ended",
        "_epoch",
        "_interval",
        "_prefix",
        "_receive",
        "_scope",
        "_send",
        "_stopped",
        "_subscribe",
        "_waiting",
    )

    lane: Lane | None = None

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        topic: str,
        *,
        since: Position | None,
        last: int | None,
        ping_interval: float,
    ) -> None:
        self._receive = receive
        self._send = send
        self._interval = ping_interval
        command: dict[str, object] = {"op": "subscribe", "topic": topic}
        if since is not None:
            command["since"] = {"epoch": since.epoch, "seq": since.seq}
        elif last is not None:
            command["last"] = last
        self._subscribe: str | None = json.dumps(command)
        # Every envelope of the topic starts so; the seq follows (see Payload.envelope).
        self._prefix = len('{"topic":"' + topic + '","seq":')
        self._epoch = ""
        self._ended = False
        # The response has ended on the wire, as HTTP requires.
        self._complete = False
        self._scope = scope
        # Why the server ends the stream, once it has decided to (see stop).
        self._stopped: Closing | None = None
        # The wait for the client's next message, which stop() cuts short.
        self._waiting: anyio.CancelScope | None = None

    async def start(self) -> None:
        """Send the response's head and the reconnection delay."""
        await self._send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await self._write(f"retry: {RETRY_MILLISECONDS}\n\n".encode())

    async def receive(self) -> str | None:
        """The subscribe first, then a ping each interval, until the client goes (``None``)."""
        if self._subscribe is not None:
            command, self._subscribe = self._subscribe, None
            return command
        with anyio.move_on_after(self._interval) as self._waiting:
            while not self._stopped and (await self._receive())["type"] != "http.disconnect":
                pass  # the body of a GET, if any, means nothing
            if self._stopped is None:
                return None  # the client went
        if self._stopped is not None:
            raise self._stopped
        return PING

    def stop(self, closing: Closing | None = None) -> None:
        """End the stream (by default as the server shuts down): the connection ends with
        ``closing``, counts it, and tells the client why."""
        self._stopped = closing or ShuttingDown()
        if self._waiting is not None:
            self._waiting.cancel()

    async def send(self, frames: Sequence[Frame]) -> None:
        """Write frames as events; raises ``anyio.BrokenResourceError`` once the client has
        gone."""
        await self._write(b"".join([self._event(frame) for frame in frames]))

    async def close(self, code: int, reason: str) -> None:
        """Tell the client why the stream ends, and end it."""
        data = json.dumps({"code": code, "reason": reason}, separators=(",", ":"))
        await self._end(f"event: close\ndata: {data}\n\n".encode())

    async def finish(self) -> None:
        """End the response if :meth:`close` has not, saying why if :meth:`stop` did; drop
        the connection if that cannot be written within :data:`FINISH_TIMEOUT`."""
        with anyio.move_on_after(FINISH_TIMEOUT, shield=True):
            if self._stopped is not None:
                await self.close(self._stopped.code, self._stopped.reason)
            await self._end(b"")
        if not self._complete:
            await drop_connection(self._scope, self._receive)

    def _event(self, frame: Frame) -> bytes:
        data = frame.data
        assert isinstance(data, str)  # multiplexed mode: JSON text only
        if not frame.control:
            seq = data[self._prefix : data.index(",", self._prefix)]
            return f"id: {self._epoch}:{seq}\ndata: {data}\n\n".encode()
        answer = json.loads(data)
        if answer["op"] == "pong":
            return KEEPALIVE
        if answer["op"] == "subscribed":
            # Its id is the position the stream starts at: a reconnect before the first
            # message then resumes from there, missing nothing.
            self._epoch, seq = answer["epoch"], answer["seq"]
            return f"id: {self._epoch}:{seq}\nevent: subscribed\ndata: {data}\n\n".encode()
        # An error frame: the subscription failed (with a broker, backplane_down or
        # backplane_busy), and a stream without it has nothing to carry. It ends, and the
        # browser subscribes again after its retry delay. Named apart from EventSource's own
        # "error" event.
        self.stop(Closing(CloseCode.TRY_AGAIN_LATER, answer["error"]))
        return f"event: refused\ndata: {data}\n\n".encode()

    async def _end(self, body: bytes) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
        except (OSError, RuntimeError):
            return  # the client is gone already; there is nobody to tell
        self._complete = True

    async def _write(self, body: bytes) -> None:
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except (OSError, RuntimeError):
            raise anyio.BrokenResourceError from None
