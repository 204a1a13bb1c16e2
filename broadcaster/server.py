"""Running the app under uvicorn, with the WebSocket protocol class broadcaster needs.

uvicorn's wsproto protocol honours transport flow control (from 0.54), but it waits for a
stalled peer to drain before it writes a close frame, it closes with 1012 on shutdown, and it
drops a connection whose frame wsproto cannot parse without saying why. :class:`WSProtocol`
closes at once instead: the close frame goes behind whatever is buffered, so a laggard that
reads again learns why it was cut off, and a peer that never reads is aborted after
``BROADCASTER_CLOSE_TIMEOUT`` rather than holding its buffer until TCP gives up. Shutdown
says 1001, and a bad frame is answered with wsproto's code (1007 for text that is not UTF-8,
1002 for a protocol error).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import signal
import socket
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as UvicornWSProtocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Request
from wsproto.utilities import LocalProtocolError

from broadcaster.connection import FASTLANE
from broadcaster.errors import CloseCode
from broadcaster.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from uvicorn._types import ASGISendEvent

    from broadcaster.settings import Settings


logger = get_logger("broadcaster.server")

# The most open files the server asks for; each connection holds one.
MAX_OPEN_FILES = 1 << 20

# A close frame's reason is at most 123 bytes (RFC 6455, section 5.5).
MAX_REASON_BYTES = 123


class HideQueryStrings(logging.Filter):
    """Cut the query string off the paths uvicorn logs for each handshake.

    A browser's token travels in the ``token`` query parameter, and tokens must never reach a
    log. :func:`uvicorn_config` installs it on uvicorn's logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and '"WebSocket %s"' in str(record.msg):
            record.args = tuple(
                arg.partition("?")[0] if isinstance(arg, str) else arg for arg in record.args
            )
        return True


class HTTPProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, dropping a connection that is slow to send a request head.

    uvicorn times out a keep-alive connection between requests, but not one that opens and
    then sends a request head (a WebSocket handshake, say) a byte at a time, or never: each
    would hold a socket for as long as its client liked (slowloris). A request head has to
    arrive whole within ``head_timeout`` seconds of its first byte, or of the connection
    opening; :func:`uvicorn_config` serves a subclass whose ``head_timeout`` comes from
    ``BROADCASTER_HANDSHAKE_TIMEOUT``.
    """

    head_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def on_message_begin(self) -> None:
        """Start the next request's clock at its first byte."""
        super().on_message_begin()
        self._start_head_timer()

    def on_headers_complete(self) -> None:
        """Stop the clock: the head has arrived whole."""
        self._stop_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self.transport.close)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


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
        """Send as uvicorn does, except that a close never waits for the peer to read."""
        if message["type"] == "websocket.close" and self._open():
            try:
                code, reason = message.get("code", 1000), message.get("reason") or ""
                self._close_now(code, reason, self.linger)
            except LocalProtocolError as error:
                raise ClientDisconnected from error
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


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """Build the uvicorn configuration that serves ``app`` as ``settings`` say."""
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HideQueryStrings) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(HideQueryStrings())
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=type("HTTPProtocol", (HTTPProtocol,), {"head_timeout": settings.handshake_timeout}),
        ws=type("WSProtocol", (WSProtocol,), {"linger": settings.close_timeout}),
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        # Compression would cost a deflate per message per socket instead of one encoding.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        lifespan="on",
        log_config=None,
        access_log=False,
    )


def bind(settings: Settings) -> socket.socket:
    """Bind and listen, so that a bad address fails before anything starts and early
    clients wait in the backlog rather than being refused."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns on TCP_NODELAY only for sockets made with it,
    # and without it every small response waits for the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    return sock


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app before it stops on the first SIGINT or SIGTERM.

    The first signal asks the app to drain (see ``Broadcaster.request_drain``), which sets
    ``should_exit`` once outboxes have flushed; a second signal stops at once. A worker
    (``supervisor`` set) takes SIGTERM from its supervisor only and ignores the SIGINT that a
    terminal sends its whole process group, and stops at once if the supervisor goes away.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[Callable[[], None]], None] | None,
        supervisor: int | None = None,
    ):
        super().__init__(config)
        self._drain = drain
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._supervisor = supervisor

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def on_tick(self, counter: int) -> bool:
        """Stop a worker whose supervisor has gone: nobody would ever stop it otherwise."""
        if self._supervisor is not None and os.getppid() != self._supervisor:
            if not self.should_exit:
                logger.warning("supervisor_gone", supervisor=self._supervisor)
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._supervisor is not None and sig == signal.SIGINT:
            return  # the supervisor has seen it too, and says SIGTERM
        # Unlike uvicorn's own handler, this one does not record the signal, so uvicorn does
        # not raise it again after shutting down and a graceful stop exits with status 0.
        if self._drain is None or self._loop is None or self._draining:
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        # Signal handlers run between bytecodes: hand the work to the event loop.
        self._loop.call_soon_threadsafe(self._drain, self._drained)

    def _drained(self) -> None:
        self.should_exit = True


def run(
    settings: Settings,
    make_app: Callable[[Callable[[], None]], Any],
    *,
    sock: socket.socket | None = None,
    supervisor: int | None = None,
) -> int:
    """Serve an app until SIGINT or SIGTERM and return the process's exit status.

    Args:
        settings: where to bind and how to serve.
        make_app: builds the ASGI app; it is given the callback that stops the server, for
            :class:`broadcaster.app.Broadcaster`'s ``on_hub_failure``. When the app's
            ``state.broadcaster`` is a Broadcaster, the first signal drains it first.
        sock: a listening socket to serve instead of binding one (a worker's, from its
            supervisor).
        supervisor: the process id of the worker's supervisor.

    Raises:
        OSError: the address cannot be bound.
    """
    sock = sock or bind(settings)
    open_files = _raise_open_files_limit()
    hub_failed = False

    def stop_on_hub_failure() -> None:
        nonlocal hub_failed
        hub_failed = True
        server.should_exit = True

    app = make_app(stop_on_hub_failure)
    live = getattr(getattr(app, "state", None), "broadcaster", None)
    server = _DrainingServer(
        uvicorn_config(app, settings),
        live.request_drain if live is not None else None,
        supervisor,
    )
    logger.info(
        "server_starting", host=settings.host, port=sock.getsockname()[1], open_files=open_files
    )
    warn_if_unauthenticated(settings)
    server.run(sockets=[sock])
    return 1 if hub_failed or not server.started else 0


def warn_if_unauthenticated(settings: Settings) -> None:
    """Log a warning when a server that anyone may publish to binds a non-loopback address."""
    if settings.publish_open and not is_loopback(settings.host):
        logger.warning(
            "unauthenticated_bind",
            host=settings.host,
            detail="anyone who can reach this address may publish and subscribe; set "
            "BROADCASTER_PUBLISH_TOKENS and a JWT key (see the README's Security section)",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one and return the limit in force.

    Each connection is a file descriptor, and many systems start processes at 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
