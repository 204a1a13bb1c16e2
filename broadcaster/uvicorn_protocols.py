"""The uvicorn protocol classes broadcaster serves with.

uvicorn's wsproto protocol honours transport flow control (from 0.54), but it waits for a
stalled peer to drain before it writes a close frame, it closes with 1012 on shutdown, and it
drops a connection whose frame wsproto cannot parse without saying why. :class:`WSProtocol`
closes at once instead: the close frame goes behind whatever is buffered, so a laggard that
reads again learns why it was cut off, and a peer that never reads is aborted after
``BROADCASTER_CLOSE_TIMEOUT`` rather than holding its buffer until TCP gives up. Shutdown
says 1001, and a bad frame is answered with wsproto's code (1007 for text that is not UTF-8,
1002 for a protocol error). It also offers the app the :class:`FastLane`.
"""

from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING

import anyio
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as UvicornWSProtocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Request
from wsproto.utilities import LocalProtocolError

from broadcaster.connection import FASTLANE
from broadcaster.errors import CloseCode

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from uvicorn._types import ASGISendEvent

# A close frame's reason is at most 123 bytes (RFC 6455, section 5.5).
MAX_REASON_BYTES = 123


class FastLane:
    """Writes pre-encoded frames straight to one connection's transport.

    Through plain ASGI every frame costs a message dict, a wsproto encoding and a transport
    write per socket. A frame that the hub encoded once for all its subscribers can instead
    be written as it is, a whole batch of them in one write, by the app's shared
    :class:`broadcaster.writer.Writer`. The lane never waits: while the transport is paused
    the writer parks the connection's outbox with :meth:`when_writable`, so a stalled peer
    still backs up into its own outbox. It is offered to the app as the ASGI scope extension
    :data:`FASTLANE`, only where it applies: never with per-message compression.
    """

    def __init__(self, protocol: WSProtocol) -> None:
        self._protocol = protocol
        self._on_writable: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def writable(self) -> bool:
        """Whether the transport takes more at once."""
        return self._protocol.writable.is_set()

    def write(self, wire: bytes) -> None:
        """Write whole frames.

        Raises:
            anyio.BrokenResourceError: the connection is closing or gone.
        """
        protocol = self._protocol
        if protocol.disconnected or protocol.close_sent:
            raise anyio.BrokenResourceError
        protocol.transport.write(wire)

    def close(self, code: int, reason: str) -> None:
        """Close with a close frame behind whatever is buffered, from the event loop's next
        turn rather than from inside the caller (the hub's fan-out, say)."""
        self._protocol.loop.call_soon(self._protocol.close_now, code, reason)

    def when_writable(
        self, callback: Callable[[], None], timeout: float, on_timeout: Callable[[], None]
    ) -> None:
        """Call ``callback`` when the transport resumes, or ``on_timeout`` after ``timeout``."""
        self.release()
        self._on_writable = callback
        self._timer = self._protocol.loop.call_later(timeout, self._timed_out, on_timeout)

    def resumed(self) -> None:
        """The transport takes more again: hand the parked outbox back to the writer."""
        callback = self._on_writable
        self.release()
        if callback is not None:
            callback()

    def release(self) -> None:
        """Forget the parked outbox, if any; the connection is gone or writable again."""
        if self._timer is not None:
            self._timer.cancel()
        self._on_writable = self._timer = None

    def _timed_out(self, on_timeout: Callable[[], None]) -> None:
        self._on_writable = self._timer = None
        on_timeout()


class WSProtocol(UvicornWSProtocol):
    """uvicorn's wsproto protocol, closing without waiting on a stalled peer.

    :func:`uvicorn_config` serves a subclass whose ``linger`` comes from the settings.
    """

    # Seconds a closed socket is kept for its peer to read the close frame, then aborted.
    linger = 10.0
    # The fastlane, once the handshake has offered it.
    lane: FastLane | None = None

    def handle_connect(self, event: Request) -> None:
        """Start the ASGI app as uvicorn does, offering it the fastlane."""
        super().handle_connect(event)
        # The app task has been created but not started, so it sees the extension.
        if not self.config.ws_per_message_deflate:
            self.lane = FastLane(self)
            self.scope["extensions"][FASTLANE] = {"lane": self.lane}

    def resume_writing(self) -> None:
        """Resume as uvicorn does, and hand a parked outbox back to the writer."""
        super().resume_writing()
        if self.lane is not None:
            self.lane.resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        """Clean up as uvicorn does, and drop a parked outbox with its timer."""
        super().connection_lost(exc)
        if self.lane is not None:
            self.lane.release()

    async def send(self, message: ASGISendEvent) -> None:
        """Send as uvicorn does, except that a close never waits for the peer to read, and a
        close after the server's own (see :meth:`close_now`) has nothing left to do."""
        if message["type"] == "websocket.close":
            if self._open():
                try:
                    code, reason = message.get("code", 1000), message.get("reason") or ""
                    self._close_now(code, reason, self.linger)
                except LocalProtocolError as error:
                    raise ClientDisconnected from error
                return
            if self.handshake_complete and self.close_sent and not self.response_started:
                return
        await super().send(message)

    def handle_close(self, event: CloseConnection) -> None:
        """Tell the peer why when wsproto reports a frame it could not parse."""
        if self.conn.state is not ConnectionState.OPEN or self.close_sent:
            super().handle_close(event)  # the peer's own close frame
            return
        reason = (event.reason or "").encode()[:MAX_REASON_BYTES].decode(errors="ignore")
        self.close_sent = True
        self.transport.write(self.conn.send(CloseConnection(code=event.code, reason=reason)))
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": event.code, "reason": reason}
        )
        self.transport.close()

    def shutdown(self) -> None:
        """Close an open WebSocket with 1001 (going away) rather than uvicorn's 1012."""
        if not self._open():
            super().shutdown()
            return
        self.stop_keepalive()
        # A peer that does not read its close frame is aborted within half the graceful
        # shutdown window, so that uvicorn never has to give up on it.
        linger = (self.config.timeout_graceful_shutdown or self.linger) / 2
        try:
            self._close_now(CloseCode.GOING_AWAY, "server shutting down", linger)
        except LocalProtocolError:
            self.transport.close()

    def close_now(self, code: int, reason: str) -> None:
        """Close an open WebSocket at once, as the app's own close does; leave a closed one."""
        if self._open():
            with suppress(LocalProtocolError):  # wsproto is closing it already
                self._close_now(code, reason, self.linger)

    def _open(self) -> bool:
        return (
            self.handshake_complete
            and not self.close_sent
            and not self.response_started
            and not self.disconnected
        )

    def _close_now(self, code: int, reason: str, linger: float) -> None:
        output = self.conn.send(CloseConnection(code=code, reason=reason))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(output)
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(linger, self.transport.abort)
