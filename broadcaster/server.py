"""Running the app under uvicorn: its configuration, the listening socket, the drain on the
first signal, and ``--workers`` (see :mod:`broadcaster.workers`).

uvicorn serves with broadcaster's own protocol classes: :mod:`broadcaster.ws_protocol` for
WebSockets and :mod:`broadcaster.http_protocol` for HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import resource
import signal
import socket
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import uvicorn

from broadcaster.http_gate import HTTPGate, HTTPLimits
from broadcaster.http_protocol import HTTPProtocol
from broadcaster.log import get_logger
from broadcaster.settings import unknown_settings
from broadcaster.ws_protocol import Limits, WebSocketProtocol

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from broadcaster.settings import Settings


logger = get_logger("broadcaster.server")

# The most open files the server asks for; each connection holds one.
MAX_OPEN_FILES = 1 << 20
# New objects the garbage collector lets build up before it runs, at least (Python's default
# is 700). A batch publish, or a burst of frames, keeps thousands alive at once: at 700 the
# young generation is collected several times per batch and its survivors (history entries)
# are scanned again in the middle one, which took a fifth of a batch's CPU time. Objects
# freed by reference counting, nearly all of them here, never count toward it.
GC_YOUNG_THRESHOLD = 10_000


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """Build the uvicorn configuration that serves ``app`` as ``settings`` say."""
    # One gate per server: its HTTP connections are counted together, and refused ones are
    # counted with the app's other refusals.
    live = getattr(getattr(app, "state", None), "broadcaster", None)
    gate = HTTPGate(
        HTTPLimits.from_settings(settings),
        live.count_refusal if live is not None else None,
        live.penalties if live is not None else None,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=type("HTTPProtocol", (HTTPProtocol,), {"gate": gate}),
        ws=WebSocketProtocol.configured(Limits.from_settings(settings)),
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
    ``should_exit`` once outboxes have flushed; a second signal skips the rest of the drain,
    and a third forces the exit. A worker
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
            # A signal during the drain skips what is left of it: sockets are closed with
            # 1001 within SHUTDOWN_TIMEOUT and the app shuts down cleanly. Only a signal after
            # that forces the exit, leaving the app's shutdown undone.
            self.force_exit = self.should_exit
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
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)
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
        "server_starting",
        host=settings.host,
        port=sock.getsockname()[1],
        open_files=open_files,
        gc_threshold=gc.get_threshold(),
        settings=settings.effective(),
    )
    warn_if_unauthenticated(settings)
    for variable, closest in unknown_settings():
        logger.warning("unknown_setting", variable=variable, closest=closest)
    # Everything made so far (modules, the app, its settings) lives as long as the process:
    # the collector need not walk it on every full collection, which would otherwise pause
    # the event loop for milliseconds while connections come and go.
    gc.freeze()
    server.run(sockets=[sock])
    return 1 if hub_failed or not server.started else 0


def warn_if_unauthenticated(settings: Settings) -> None:
    """Log a warning when a server that anyone may publish to binds a non-loopback address."""
    if settings.publish_open and not is_loopback(settings.host):
        logger.warning(
            "unauthenticated_bind",
            host=settings.host,
            detail="anyone who can reach this address may publish and subscribe; set "
            "BROADCASTER_PUBLISH_TOKENS and a JWT key (see docs/security.md)",
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
