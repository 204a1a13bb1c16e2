"""``broadcaster serve --workers N``: N worker processes serving one listening socket.

The supervisor binds the socket, then starts each worker as ``broadcaster serve`` with the
socket's descriptor inherited (``--listen-fd``), so every worker runs the same server as a
single process does: its own hub, the bridge to the shared broker, broadcaster's WebSocket
protocol class and its drain on SIGTERM. The kernel hands each new connection to whichever
worker accepts it first. Settings reach the workers through the environment they inherit.

SIGINT or SIGTERM to the supervisor is passed on as SIGTERM, so that each worker drains; a
second one stops them at once. A worker that exits on its own stops the others, and the
supervisor exits with status 1 for a process manager to act on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from broadcaster.log import get_logger
from broadcaster.server import bind

if TYPE_CHECKING:
    from types import FrameType

    from broadcaster.settings import Settings

logger = get_logger("broadcaster.workers")


def supervise(settings: Settings) -> int:
    """Serve with ``settings.workers`` processes until a signal; return the exit status.

    Raises:
        OSError: the address cannot be bound.
    """
    sock = bind(settings)
    port = sock.getsockname()[1]
    logger.info("server_starting", host=settings.host, port=port, workers=settings.workers)
    command = [
        sys.executable,
        "-m",
        "broadcaster",
        "serve",
        "--listen-fd",
        str(sock.fileno()),
        "--supervisor",
        str(os.getpid()),
    ]
    env = {**os.environ, "BROADCASTER_HOST": settings.host, "BROADCASTER_PORT": str(port)}
    workers: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        for _ in range(settings.workers):
            if stopping:
                break
            worker = subprocess.Popen(command, env=env, pass_fds=[sock.fileno()])
            workers[worker.pid] = worker
        while workers:
            pid, wait_status = os.wait()
            worker = workers.pop(pid)
            worker.returncode = os.waitstatus_to_exitcode(wait_status)
            logger.info("worker_exited", pid=pid, status=worker.returncode)
            if worker.returncode != 0 or not stopping:
                status = 1
            if not stopping:
                stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
    return status
