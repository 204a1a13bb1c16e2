"""uvicorn's HTTP protocol, dropping connections that are slow to send a request head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    import asyncio


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
