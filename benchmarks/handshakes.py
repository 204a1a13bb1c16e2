"""The handshake storm: connections opened a hundred at a time, each closed right after the
upgrade, and what each handshake costs the server.

A server is spawned (as ``broadcaster stress --spawn`` does, per-client limits lifted) and
kept on the server's cores; this process, on the load generator's cores, first opens
``WARM_UP`` connections that are not counted (the first requests build routes and caches),
then takes the server's CPU time, opens ``connections`` WebSockets on ``/ws`` with at most
``concurrency`` handshakes in flight, closes each with 1000 as soon as it is open and waits
for the server to drop the TCP connection, and takes the CPU time again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from measure import BROADCASTER, CLASSIC, Row, median, pinned_server, spread
from picows import WSCloseCode, WSError, WSListener, WSMsgType

from broadcaster.stress.clients import connect

if TYPE_CHECKING:
    from measure import Bench
    from picows import WSFrame, WSTransport

STORM_CONNECTIONS = 3_000
STORM_CONCURRENCY = 100
WARM_UP = 100
# Seconds one connection may take, from connect to the server dropping it.
CONNECTION_SECONDS = 10.0


@dataclass(frozen=True)
class Storm:
    """What one storm did and what it cost the server.

    ``unclean`` counts connections the server dropped without answering the close frame.
    """

    connections: int
    failures: int
    unclean: int
    seconds: float
    server_cpu_seconds: float | None

    @property
    def connects_per_second(self) -> float:
        """Connections opened and closed per second of the storm."""
        return (self.connections - self.failures) / self.seconds if self.seconds else 0.0

    @property
    def cpu_micros_per_handshake(self) -> float | None:
        """The server's CPU time per connection opened and closed, in microseconds."""
        done = self.connections - self.failures
        if self.server_cpu_seconds is None or not done:
            return None
        return self.server_cpu_seconds / done * 1e6


class _Closer(WSListener):
    """Notes whether the server answered the client's close frame."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Note the server's close frame; the server then drops the TCP connection."""
        if frame.msg_type is WSMsgType.CLOSE:
            self.answered = True


@dataclass
class _Counts:
    failures: int = 0
    unclean: int = 0
    errors: list[str] = field(default_factory=list)


async def storm(url: str, connections: int, concurrency: int) -> tuple[_Counts, float]:
    """Open and close ``connections`` WebSockets, ``concurrency`` at a time; return the
    counts and the seconds it took."""
    counts = _Counts()
    limiter = anyio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            listener = _Closer()
            try:
                with anyio.fail_after(CONNECTION_SECONDS):
                    transport = await connect(url, listener)
                    transport.send_close(WSCloseCode.OK)
                    await transport.wait_disconnected()
            except (OSError, WSError) as error:  # TimeoutError included
                counts.failures += 1
                if len(counts.errors) < 5:
                    counts.errors.append(repr(error))
                return
            counts.unclean += not listener.answered

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(connections):
            tg.start_soon(one)
    return counts, time.monotonic() - start


def run_storm(
    server_command: tuple[str, ...], server_cpus: tuple[int, ...], connections: int
) -> Storm:
    """Spawn a server, warm it up, and measure one storm against it."""
    with pinned_server(server_command, server_cpus) as (server, base):
        assert server.sampler is not None  # set by start()
        url = f"{base}/ws"
        anyio.run(storm, url, WARM_UP, STORM_CONCURRENCY)
        before = server.sampler.cpu_seconds()
        counts, seconds = anyio.run(storm, url, connections, STORM_CONCURRENCY)
        after = server.sampler.cpu_seconds()
    if counts.errors:
        print(f"bench: {counts.failures} connections failed, as {counts.errors}")
    return Storm(
        connections=connections,
        failures=counts.failures,
        unclean=counts.unclean,
        seconds=seconds,
        server_cpu_seconds=after - before if before is not None and after is not None else None,
    )


def handshakes(bench: Bench) -> list[Row]:
    """3,000 connections, 100 at a time, each closed cleanly right after the upgrade."""
    cpus = bench.placement.server_cpus

    def against(server: tuple[str, ...]) -> Storm:
        return run_storm(server, cpus, STORM_CONNECTIONS)

    runs = bench.rotate(
        "handshakes",
        [("classic", lambda: against(CLASSIC)), ("broadcaster", lambda: against(BROADCASTER))],
    )
    classic, ours = runs["classic"], runs["broadcaster"]
    theirs = median([s.cpu_micros_per_handshake for s in classic])
    mine = median([s.cpu_micros_per_handshake for s in ours])

    def failures(storms: list[Storm]) -> str:
        failed = sum(s.failures for s in storms)
        unclean = sum(s.unclean for s in storms)
        return f"{failed} failed, {unclean} unanswered closes over {len(storms)} runs"

    return [
        Row(
            "handshakes",
            "server CPU per handshake (µs)",
            spread([s.cpu_micros_per_handshake for s in classic], ".0f"),
            spread([s.cpu_micros_per_handshake for s in ours], ".0f"),
            "<= classic",
            theirs is not None and mine is not None and mine <= theirs,
        ),
        Row(
            "handshakes",
            "connects/s",
            spread([s.connects_per_second for s in classic], ",.0f"),
            spread([s.connects_per_second for s in ours], ",.0f"),
            "-",
            None,
        ),
        Row(
            "handshakes",
            f"{STORM_CONNECTIONS:,} connections per run",
            failures(classic),
            failures(ours),
            "0 failed",
            all(s.failures == 0 for s in ours),
        ),
    ]
