"""The bridge's counters: its statistics record, and runs of losses that are logged once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    """A snapshot of the bridge.

    Args:
        up: linked to the broker, with every wanted topic subscribed.
        error: why the last link was lost (or could not be made); ``None`` before any loss.
        subscribed: topics subscribed on the broker now.
        sent: local publishes relayed to the broker.
        received: other nodes' publishes handed toward the hub.
        outbound_dropped: local publishes dropped because the outbound buffer was full.
        inbound_dropped: other nodes' publishes dropped because the inbound buffer was full.
        unrelayed: local publishes made while the broker was down, never relayed.
        malformed: broker messages that were not a broadcaster message.
        links: links made, the first one included.
    """

    up: bool
    error: str | None
    subscribed: int
    sent: int
    received: int
    outbound_dropped: int
    inbound_dropped: int
    unrelayed: int
    malformed: int
    links: int


class Episode:
    """Counts losses of one kind, logging when a run of them starts and when it ends."""

    __slots__ = ("_event", "_log", "_run", "total")

    def __init__(self, log: FilteringBoundLogger, event: str) -> None:
        self._log = log
        self._event = event
        self._run = 0
        self.total = 0

    def lose(self, count: int = 1) -> None:
        if not self._run:
            self._log.warning(self._event + "_started")
        self._run += count
        self.total += count

    def end(self) -> None:
        if self._run:
            self._log.info(self._event + "_ended", dropped=self._run)
            self._run = 0


def describe(group: BaseExceptionGroup[Exception]) -> str:
    """Word the first error of a group, however deeply nested."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return str(error) or type(error).__name__
