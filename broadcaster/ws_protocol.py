"""broadcaster's own WebSocket protocol, served by uvicorn through its ``ws`` option.

uvicorn hands an upgraded connection to the protocol class given as ``ws``; this one speaks
WebSocket on wsproto's frame layer and answers the handshake itself. Owning the class is what
lets every byte in and out of a socket sit under a bound:

- **Every frame counts.** Each frame the client sends (a fragment of a message, an empty
  continuation, a ping, a pong, a close) is charged to the connection's frames-a-second and
  bytes-a-second budgets as it arrives, and a message's fragments count toward
  ``MAX_MESSAGE_BYTES`` as they arrive. A flood of any kind is closed with 1008, and one that
  is too big with 1009.
- **Every byte sent is bounded.** Reading stops while writes are paused, and only the latest
  ping is answered then, so a client that pings and never reads is owed one pong. Reading
  also stops while the app has 64 KiB of the client's messages to read (see
  :mod:`broadcaster.inbound`). Each socket's kernel send buffer is sized by ``SOCKET_SEND_BUFFER``
  rather than autotuned to megabytes, so a stalled peer backs up into its own bounded outbox,
  where the overflow policy decides.
- **Our own close codes.** Keepalive pings that go unanswered close a client that left
  messages unread with 1013 ``slow consumer`` (cause ``ping_timeout``), and any other with
  1008 ``ping timeout``; shutdown says 1001. A frame wsproto cannot parse is answered with
  its code (1002, or 1007 for text that is not UTF-8). The connection learns why from
  :attr:`WebSocketProtocol.closing` and counts it.

The protocol is also the connection's :class:`broadcaster.writer.Lane`: the app's writer puts
pre-encoded frames straight onto its transport, offered as the ASGI scope extension
:data:`broadcaster.writer.FASTLANE`. Everything else about it is plain ASGI, so any app runs
on it; from uvicorn it uses only the documented ``ws`` option and the server state it passes
every protocol class (the connections to shut down, the tasks to wait for).
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import unquote

import anyio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    CloseConnection,
    Message,
    Ping,
    Pong,
)
from wsproto.utilities import LocalProtocolError

from broadcaster.errors import CloseCode, Closing, LagCause, ShuttingDown, SlowConsumer
from broadcaster.handshake import Request, accept_response, http_response, parse_request, refusal
from broadcaster.inbound import Inbound
from broadcaster.log import get_logger
from broadcaster.writer import FASTLANE

if TYPE_CHECKING:
    from collections.abc import Callable

    from broadcaster.settings import Settings

logger = get_logger("broadcaster.server")

# A close frame's reason is at most 123 bytes (RFC 6455, section 5.5).
MAX_REASON_BYTES = 123
# The transport's write buffer: writes pause above HIGH_WATER and resume below LOW_WATER.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may send, and what it is given, from the settings."""

    max_message_bytes: int
    frames_per_second: float
    bytes_per_second: int
    send_buffer: int
    ping_interval: float
    ping_timeout: float
    linger: float
    shutdown_linger: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_message_bytes=settings.max_message_bytes,
            frames_per_second=settings.max_messages_per_second,
            bytes_per_second=settings.max_bytes_per_second,
            send_buffer=settings.socket_send_buffer,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            linger=settings.close_timeout,
            shutdown_linger=settings.shutdown_timeout / 2,
        )


@dataclass(frozen=True, slots=True)
class ProtocolStatistics:
    """A snapshot of one connection's protocol."""

    reading: bool
    write_buffer: int
    send_buffer: int


class WebSocketProtocol(asyncio.Protocol):
    """One upgraded connection: the handshake, frames both ways, keepalive and close.

    uvicorn creates it for each upgrade request (see :meth:`configured`), feeds it the
    request head, and calls :meth:`shutdown` when the server stops. The ASGI app runs as a
    task in uvicorn's server state, which uvicorn waits for on shutdown.

    Args:
        config: uvicorn's configuration, for the app and ``root_path``.
        server_state: uvicorn's record of open connections, app tasks and default headers.
        app_state: the lifespan's state, copied into each scope.
    """

    # Set by configured(); the defaults serve tests that build the class by hand.
    limits: ClassVar[Limits] = Limits(
        max_message_bytes=1024 * 1024,
        frames_per_second=10_000,
        bytes_per_second=16 * 1024 * 1024,
        send_buffer=64 * 1024,
        ping_interval=20.0,
        ping_timeout=20.0,
        linger=5.0,
        shutdown_linger=2.5,
    )

    # Thousands of idle connections each hold one: no per-instance dict.
    __slots__ = (
        "_app",
        "_app_state",
        "_close_sent",
        "_conn",
        "_connections",
        "_default_headers",
        "_inbound",
        "_loop",
        "_on_writable",
        "_pending_pong",
        "_ping_payload",
        "_reading",
        "_rejecting",
        "_request",
        "_root_path",
        "_scope",
        "_tasks",
        "_timer",
        "_transport",
        "_waiter",
        "_writable",
        "_write_waiter",
        "_wrote",
        "closing",
    )

    @classmethod
    def configured(cls, limits: Limits) -> type[WebSocketProtocol]:
        """Return a subclass that holds connections to ``limits``, for uvicorn's ``ws``."""
        return type(cls.__name__, (cls,), {"__slots__": (), "limits": limits})

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any]) -> None:
        if not config.loaded:
            config.load()
        self._app = config.loaded_app
        self._root_path: str = config.root_path
        self._app_state = app_state
        self._connections: set[asyncio.Protocol] = server_state.connections
        self._tasks: set[asyncio.Task[None]] = server_state.tasks
        self._default_headers: list[tuple[bytes, bytes]] = server_state.default_headers
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._scope: dict[str, Any] = {}
        # The upgrade request, until it is answered.
        self._request: Request | None = None
        # wsproto's frame layer, from the accept on.
        self._conn: Connection | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._reading = True
        self._writable = True
        self._close_sent = False
        # An HTTP response instead of the upgrade (the app refused the handshake).
        self._rejecting = False
        # Anything written since the peer last answered a ping: it is unread if no answer
        # comes to the next one.
        self._wrote = False
        self._ping_payload: bytes | None = None
        self._pending_pong: bytes | None = None
        # One timer at a time: the next ping, the answer's deadline, or the close's linger.
        self._timer: asyncio.TimerHandle | None = None
        self._on_writable: Callable[[], None] | None = None
        now = self._loop.time()
        limits = self.limits
        self._inbound = Inbound(
            limits.frames_per_second, limits.bytes_per_second, limits.max_message_bytes, now
        )
        #: Why the server closed the connection, once it has.
        self.closing: Closing | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's does not derive from asyncio.Transport.
        transport = cast("asyncio.Transport", transport)
        self._transport = transport
        self._connections.add(self)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Linux doubles the value it is given to allow for its own bookkeeping, so half
            # of it makes the kernel's total for this socket the setting.
            size = self.limits.send_buffer // 2
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        # Nothing is read until the app accepts: a client must wait for the 101 anyway.
        self._pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._conn is None:
            if not self._scope:
                self._start(data)
            return  # bytes before the accept: the client broke the handshake; ignored
        try:
            self._conn.receive_data(data)
        except LocalProtocolError:
            # Data after the close handshake completed.
            self._abort()
            return
        self._process()

    def _process(self) -> None:
        """Act on the frames received, until the app has ``INBOX_BYTES`` of messages waiting;
        what is left waits in wsproto's buffer (reading is paused) until the app catches up."""
        assert self._conn is not None
        now = self._loop.time()  # once per read: its frames arrived together
        for event in self._conn.events():
            over = self._inbound.charge(event, now)
            if over is not None:
                if self._close_sent:
                    self._abort()  # still flooding after the close frame
                else:
                    self._fail(over)
                return
            if self._close_sent:
                if isinstance(event, CloseConnection) and self._transport is not None:
                    self._transport.close()  # the peer's answer to our close
                continue
            if isinstance(event, Message):
                too_big = self._inbound.receive(event)
                if too_big is not None:
                    self._fail(too_big)
                else:
                    self._wake()
            elif isinstance(event, Ping):
                self._pong(bytes(event.payload))
            elif isinstance(event, Pong):
                self._answered(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                self._peer_closed(event)
            if self._inbound.full and not self._close_sent:
                break
        self._update_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed WebSocket is a closed one

    def pause_writing(self) -> None:
        self._writable = False
        self._update_reading()

    def resume_writing(self) -> None:
        self._writable = True
        self._update_reading()
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._pending_pong is not None:
            self._pong(self._pending_pong)
        callback = self._on_writable
        self.release()
        if callback is not None:
            callback()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._close_sent = True
        self._cancel_timer()
        self._on_writable = None
        self._deliver_disconnect(1006 if self.closing is None else self.closing.code, "")
        self._writable = True
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # What uvicorn calls

    def shutdown(self) -> None:
        """Close with 1001; a peer that does not take the close frame is aborted within half
        the graceful shutdown window, so that uvicorn never has to give up on it."""
        if self._transport is None or self._transport.is_closing():
            return
        if self._conn is None:
            if not self._rejecting:
                self._respond(HTTPStatus.SERVICE_UNAVAILABLE, [], b"")
            self._end_handshake()
            return
        self._fail(ShuttingDown(), self.limits.shutdown_linger)

    def statistics(self) -> ProtocolStatistics:
        """Return what the connection holds outside the app's bounds, and whether it reads."""
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        return ProtocolStatistics(
            reading=self._reading,
            write_buffer=transport.get_write_buffer_size() if transport is not None else 0,
            send_buffer=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) if sock else 0,
        )

    # The lane (see broadcaster.writer.Lane)

    def writable(self) -> bool:
        """Whether the transport takes more at once."""
        return self._writable

    def write(self, wire: bytes) -> None:
        """Write whole, pre-encoded frames.

        Raises:
            anyio.BrokenResourceError: the connection is closing or gone.
        """
        if self._close_sent or self._transport is None:
            raise anyio.BrokenResourceError
        self._wrote = True
        self._transport.write(wire)

    def close(self, code: int, reason: str) -> None:
        """Close from the event loop's next turn rather than from inside the caller (the
        hub's fan-out, say), with a close frame behind whatever is buffered."""
        self._loop.call_soon(self._close, code, reason)

    def when_writable(
        self, callback: Callable[[], None], timeout: float, on_timeout: Callable[[], None]
    ) -> None:
        """Call ``callback`` when the transport resumes, or ``on_timeout`` after ``timeout``;
        parked again before then, the first deadline holds."""
        parked = self._on_writable is not None
        self._on_writable = callback
        if not parked:
            self._cancel_timer()
            self._timer = self._loop.call_later(timeout, self._parked_too_long, on_timeout)

    def release(self) -> None:
        """Forget the parked outbox, if any, and go back to pinging."""
        if self._on_writable is not None:
            self._on_writable = None
            self._schedule_ping()

    # ASGI

    async def receive(self) -> dict[str, Any]:
        """Return the next ASGI event for the app; after the disconnect, the disconnect."""
        while (event := self._inbound.next_event()) is None:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._inbound.drained and self._conn is not None and not self._close_sent:
            self._process()  # frames that waited in the parser for the app to catch up
        return event

    async def send(self, message: dict[str, Any]) -> None:
        """Take an ASGI event from the app: accept, a message, a close or a refusal."""
        kind = message["type"]
        if self._conn is None and not self._rejecting:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._respond(HTTPStatus.FORBIDDEN, [], b"")
            elif kind == "websocket.http.response.start":
                self._respond(message["status"], message.get("headers", []), None)
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} before the handshake")
        elif self._rejecting:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"unexpected ASGI message {kind!r} in a refusal")
            if self._transport is not None:
                self._transport.write(message.get("body", b""))
                if not message.get("more_body", False):
                    self._end_handshake()
        elif kind == "websocket.send":
            while not self._writable:
                self._write_waiter = self._write_waiter or self._loop.create_future()
                await self._write_waiter
            if self._close_sent:
                raise OSError("the WebSocket is closed")  # as a broken socket would say
            data = message.get("bytes")
            if data is None:
                data = message["text"]
            assert self._conn is not None
            self.write(self._conn.send(Message(data=data)))
        elif kind == "websocket.close":
            self._close(message.get("code", CloseCode.NORMAL), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def _run_app(self) -> None:
        code, reason = CloseCode.NORMAL, ""
        try:
            await self._app(self._scope, self.receive, self.send)
        except Exception:
            logger.exception("asgi_app_crashed", path=self._scope.get("path"))
            code, reason = CloseCode.INTERNAL_ERROR, "internal error"
        # An app that returns leaves nothing open: a handshake it never answered is a 500.
        if self._conn is None and not self._rejecting:
            self._respond(HTTPStatus.INTERNAL_SERVER_ERROR, [], b"")
        elif self._conn is None:
            self._end_handshake()
        else:
            self._close(code, reason)

    # The handshake

    def _start(self, head: bytes) -> None:
        """Build the scope from the request head uvicorn passed on and start the app."""
        assert self._transport is not None
        transport, request = self._transport, parse_request(head)
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        self._scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if transport.get_extra_info("sslcontext") else "ws",
            "server": tuple(local[:2]) if isinstance(local, tuple) else None,
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
            "root_path": self._root_path,
            "path": self._root_path + unquote(request.raw_path.decode("latin-1")),
            "raw_path": self._root_path.encode() + request.raw_path,
            "query_string": request.query_string,
            "headers": request.headers,
            "subprotocols": request.subprotocols,
            "state": self._app_state.copy(),
            "extensions": {"websocket.http.response": {}, FASTLANE: {"lane": self}},
        }
        refused = refusal(request)
        if refused is not None:
            self._respond(refused[0], refused[1], b"")
            return
        self._request = request
        task = self._loop.create_task(self._run_app())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self, message: dict[str, Any]) -> None:
        assert self._request is not None
        self._conn = Connection(ConnectionType.SERVER)
        if self._transport is None or self._transport.is_closing():
            return  # the client left during the handshake; the app learns it on receive
        headers = [*self._default_headers, *message.get("headers", [])]
        self._transport.write(accept_response(self._request, message.get("subprotocol"), headers))
        self._request = None
        self._update_reading()
        self._schedule_ping()

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None) -> None:
        """Answer the handshake with an HTTP response instead of the upgrade; with a ``body``
        that is the end of it, else the app's ``websocket.http.response.body`` events follow."""
        self._rejecting = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(http_response(status, [*self._default_headers, *headers], body))
        if body is not None:
            self._end_handshake()

    def _end_handshake(self) -> None:
        """The refusal is written: end the connection and tell the app it is over."""
        self._deliver_disconnect(1006, "")
        if self._transport is not None:
            self._transport.close()

    # Frames in

    def _peer_closed(self, event: CloseConnection) -> None:
        assert self._conn is not None
        assert self._transport is not None
        if self._conn.state is ConnectionState.REMOTE_CLOSING:
            self._transport.write(self._conn.send(event.response()))
            self._close_sent = True
            self._deliver_disconnect(event.code, event.reason or "")
            self._transport.close()
            return
        # wsproto could not parse a frame: tell the peer why, with wsproto's code, and end
        # there, as its parser reads nothing more (not even the peer's answer).
        reason = (event.reason or "").encode()[:MAX_REASON_BYTES].decode(errors="ignore")
        try:
            code = CloseCode(event.code)
        except ValueError:
            code = CloseCode.PROTOCOL_ERROR
        self._fail(Closing(code, reason))
        self._transport.close()

    # Keepalive

    def _pong(self, payload: bytes) -> None:
        # While writes are paused only the latest ping is answered, when they resume (RFC
        # 6455, section 5.5.3 allows it): a client that pings and never reads is owed one pong.
        if self._writable and self._conn is not None:
            self._pending_pong = None
            self._write(self._conn.send(Pong(payload=payload)))
        else:
            self._pending_pong = payload

    def _schedule_ping(self) -> None:
        if self._close_sent or self._conn is None:
            return
        self._cancel_timer()
        self._timer = self._loop.call_later(self.limits.ping_interval, self._ping)

    def _ping(self) -> None:
        assert self._conn is not None
        self._ping_payload = os.urandom(4)
        self._write(self._conn.send(Ping(payload=self._ping_payload)))
        self._timer = self._loop.call_later(self.limits.ping_timeout, self._not_answered)

    def _answered(self, payload: bytes) -> None:
        if payload == self._ping_payload:
            self._ping_payload = None
            self._wrote = False
            if self._on_writable is None:
                self._schedule_ping()

    def _not_answered(self) -> None:
        self._timer = None
        if self._wrote:
            # The ping went out behind messages the peer has not read either.
            self._fail(SlowConsumer(LagCause.PING_TIMEOUT))
        else:
            self._fail(Closing(CloseCode.POLICY_VIOLATION, "ping timeout"))

    def _parked_too_long(self, on_timeout: Callable[[], None]) -> None:
        self._timer = None
        self._on_writable = None
        on_timeout()

    # Closing

    def _fail(self, closing: Closing, linger: float | None = None) -> None:
        """Close for a reason of the server's own, which the connection then counts."""
        if not self._close_sent and self._conn is not None:
            self.closing = closing
            self._inbound.forget()
            self._close(closing.code, closing.reason, linger)

    def _close(self, code: int, reason: str, linger: float | None = None) -> None:
        """Send a close frame now, behind whatever is buffered, and abort the socket if the
        peer has not answered within ``linger`` seconds (the limits' by default)."""
        transport = self._transport
        if self._close_sent or self._conn is None or transport is None:
            return
        self._close_sent = True
        self._cancel_timer()
        self._on_writable = None
        try:
            frame = self._conn.send(CloseConnection(code, reason))
        except LocalProtocolError:
            frame = b""  # wsproto has seen the peer's close already
        self._deliver_disconnect(code, reason)
        if transport.is_closing():
            return
        transport.write(frame)
        # Read again, to see the peer's answer to the close.
        self._update_reading()
        linger = self.limits.linger if linger is None else linger
        self._timer = self._loop.call_later(linger, self._abort)

    def _abort(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    # Plumbing

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver_disconnect(self, code: int, reason: str) -> None:
        self._inbound.disconnect(code, reason)
        self._wake()

    def _update_reading(self) -> None:
        """Read while the app keeps up and writes flow; always read after the close frame."""
        if self._conn is None:
            return
        wanted = self._close_sent or (self._writable and not self._inbound.full)
        if wanted and not self._reading:
            self._reading = True
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        elif not wanted and self._reading:
            self._pause_reading()

    def _pause_reading(self) -> None:
        self._reading = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
