"""The HTTP limits of one server, and the gate that counts its open HTTP connections.

Pure bookkeeping, without I/O: :class:`broadcaster.http_protocol.HTTPProtocol` asks the gate
for a slot when a connection opens, gives it back when the connection ends or becomes a
WebSocket, and counts its refusals through it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broadcaster.errors import RETRY, Refused

if TYPE_CHECKING:
    from collections.abc import Callable

    from broadcaster.policy import PenaltyBox
    from broadcaster.settings import Settings


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """How much time, size and how many connections HTTP clients get; see the module."""

    head_timeout: float = 10.0
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    body_timeout: float = 30.0
    body_min_rate: int = 1024
    max_connections: int = 2048
    max_connections_per_address: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> HTTPLimits:
        """The limits the ``BROADCASTER_*`` settings ask for."""
        return cls(
            head_timeout=settings.handshake_timeout,
            max_head_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            body_timeout=settings.body_timeout,
            body_min_rate=settings.body_min_rate,
            max_connections=settings.max_http_connections,
            max_connections_per_address=settings.max_http_connections_per_address,
        )


def flooding(penalty: float) -> Refused:
    """The refusal an address closed for flooding gets until its penalty ends."""
    retry = {"Retry-After": str(math.ceil(penalty))}
    return Refused(429, "flooding", "this address sent faster than it may", retry)


@dataclass(frozen=True, slots=True)
class GateStatistics:
    """The HTTP connections a gate holds open: in all, and the addresses they come from."""

    open: int
    addresses: int


class HTTPGate:
    """One server's HTTP connections: the limits they get, how many are open, and where
    refusals are counted.

    Args:
        limits: the bounds every connection of the server gets.
        on_refused: called with each refusal and the peer (``host:port``) it went to; the
            server passes :meth:`broadcaster.app.Broadcaster.count_refusal`.
        penalties: addresses closed for flooding (the app's
            :attr:`broadcaster.app.Broadcaster.penalties`): their connections are refused as
            they open, before a byte of their request is parsed, so that a flooder that
            reconnects in a loop costs the server as little as it can.

    The table of addresses holds only addresses with a connection open, so it is bounded by
    ``limits.max_connections``.
    """

    def __init__(
        self,
        limits: HTTPLimits,
        on_refused: Callable[[Refused, str | None], None] | None = None,
        penalties: PenaltyBox | None = None,
    ) -> None:
        self.limits = limits
        self._on_refused = on_refused
        self._penalties = penalties
        self._open = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> Refused | None:
        """Take a slot for a new connection from ``address``, or say why there is none.

        The caller gives the slot back with :meth:`release`.
        """
        if self._penalties is not None and self._penalties.refuses(address, time.monotonic()):
            return flooding(self._penalties.seconds)
        if self._open >= self.limits.max_connections:
            return Refused(
                503, "too_many_http_connections", "the server is full; retry later", RETRY
            )
        held = self._by_address.get(address, 0)
        if held >= self.limits.max_connections_per_address:
            return Refused(
                429,
                "too_many_http_connections_from_address",
                "too many connections from this address; retry later",
                RETRY,
            )
        self._open += 1
        self._by_address[address] = held + 1
        return None

    def release(self, address: str) -> None:
        """Give back the slot that :meth:`admit` took for a connection from ``address``."""
        self._open -= 1
        held = self._by_address.pop(address) - 1
        if held:
            self._by_address[address] = held

    def count(self, refused: Refused, peer: str | None) -> None:
        """Count a refusal where the server counts them."""
        if self._on_refused is not None:
            self._on_refused(refused, peer)

    def statistics(self) -> GateStatistics:
        """How many connections are open now, and from how many addresses."""
        return GateStatistics(self._open, len(self._by_address))
