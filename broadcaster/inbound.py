"""What one client sends, from wsproto's frame events to the ASGI events its app reads.

Pure: no I/O, the time passed in. :class:`broadcaster.ws_protocol.WebSocketProtocol` feeds
each frame event to an :class:`Inbound`, which charges it to the connection's budgets,
assembles fragments into messages, and holds the messages until the app reads them.
"""

from __future__ import annotations

from typing import Any

from wsproto.events import BytesMessage, Message, Ping, Pong, TextMessage

from broadcaster.errors import CloseCode, Closing, Flooding
from broadcaster.policy import TokenBucket

# Bytes of a client's messages the app may have waiting before reading from it stops, each
# message charged its size plus what an ASGI event costs in memory.
INBOX_BYTES = 64 * 1024
MESSAGE_OVERHEAD = 256
# What a close frame is charged: its status code.
CLOSE_FRAME_BYTES = 2


class Inbound:
    """One connection's frames in: charged, assembled and held for the app.

    Args:
        frames_per_second: frames of any kind the client may send a second, a second's worth
            at once.
        bytes_per_second: payload bytes the client may send a second, likewise.
        max_message_bytes: the largest message, its fragments counted as they arrive.
        now: the time, on any monotonic clock.
    """

    # Thousands of idle connections each hold one: no per-instance dict.
    __slots__ = (
        "_bytes",
        "_disconnect",
        "_events",
        "_frames",
        "_held",
        "_max_message_bytes",
        "_next",
        "_parts",
        "_parts_bytes",
    )

    def __init__(
        self, frames_per_second: float, bytes_per_second: int, max_message_bytes: int, now: float
    ) -> None:
        self._frames = TokenBucket.full(frames_per_second, max(1.0, frames_per_second), now)
        self._bytes = TokenBucket.full(bytes_per_second, bytes_per_second, now)
        self._max_message_bytes = max_message_bytes
        # Events for the app: a list read from _next, cheaper than a deque when idle.
        self._events: list[dict[str, Any]] = [{"type": "websocket.connect"}]
        self._next = 0
        # What the waiting messages are charged (see INBOX_BYTES).
        self._held = 0
        self._disconnect: dict[str, Any] | None = None
        # The fragments of the message being received, and their size in bytes.
        self._parts: list[Any] = []
        self._parts_bytes = 0

    def charge(self, event: object, now: float) -> Closing | None:
        """Charge one frame event to the budgets; what closes the client when it is over."""
        if isinstance(event, TextMessage):
            data = event.data
            size = len(data) if data.isascii() else len(data.encode())
        elif isinstance(event, BytesMessage):
            size = len(event.data)
        elif isinstance(event, Ping | Pong):
            size = len(event.payload)
        else:
            size = CLOSE_FRAME_BYTES
        if not (self._frames.take(1, now) and self._bytes.take(size, now)):
            return Flooding()
        if isinstance(event, Message):
            self._parts_bytes += size
        return None

    def receive(self, event: Message[Any]) -> Closing | None:
        """Take a charged fragment; hold the message for the app once it is whole. Return
        what closes the client if the message has grown past its limit."""
        if self._parts_bytes > self._max_message_bytes:
            return Closing(CloseCode.MESSAGE_TOO_BIG, "message too big")
        if not event.message_finished:
            self._parts.append(event.data)
            return None
        data = event.data
        if self._parts:
            self._parts.append(data)
            data = ("" if isinstance(data, str) else b"").join(self._parts)
            self._parts = []
        self._held += self._parts_bytes + MESSAGE_OVERHEAD
        self._parts_bytes = 0
        self._events.append(
            {"type": "websocket.receive", "text" if isinstance(data, str) else "bytes": data}
        )
        return None

    def disconnect(self, code: int, reason: str) -> None:
        """Hold the disconnect, once, behind whatever the app has still to read."""
        if self._disconnect is None:
            self._disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
            self._events.append(self._disconnect)

    def forget(self) -> None:
        """Drop what the app has not read: it is not to be acted on."""
        del self._events[self._next :]

    @property
    def drained(self) -> bool:
        """Whether the app has read everything held for it."""
        return self._next == len(self._events)

    @property
    def full(self) -> bool:
        """Whether the app has ``INBOX_BYTES`` waiting: reading pauses until it has read it."""
        return self._held >= INBOX_BYTES

    def next_event(self) -> dict[str, Any] | None:
        """The next event for the app; after the disconnect, the disconnect again; ``None``
        while there is nothing to read."""
        events = self._events
        if self._next == len(events):
            return self._disconnect
        event = events[self._next]
        self._next += 1
        if self._next == len(events):
            events.clear()
            self._next = self._held = 0
        return event
