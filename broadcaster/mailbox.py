"""What the hub's mailbox carries: the commands, the connections they name, and receipts.

Only :mod:`broadcaster.hub` reads commands; connections and the app build them through its
methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import anyio

from broadcaster.errors import BackplaneDown, HubStopped

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from broadcaster.outbox import Outbox
    from broadcaster.protocol import Mode, Payload, Position
    from broadcaster.stream import Outcome


class Source(StrEnum):
    """Where a publish came from, as the metrics count it."""

    WS = "ws"
    HTTP = "http"
    APP = "app"
    BACKPLANE = "backplane"


@dataclass(eq=False, slots=True)
class Subscriber:
    """One connection as the hub sees it. ``topics`` is the hub's to change.

    ``conn_id``, ``peer`` and ``opened_at`` (monotonic seconds) are for operators' eyes.
    """

    outbox: Outbox
    mode: Mode
    topics: set[str] = field(default_factory=set)
    conn_id: str = ""
    peer: str | None = None
    opened_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Receipt:
    """What became of one publish."""

    topic: str
    epoch: str
    seq: int
    subscribers: int


class Turns:
    """The ends of the hub's turns (each a burst of commands handled without a pause), as
    one event shared by every publisher waiting for a receipt: one event a turn, not one a
    publish."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        # Made only when somebody waits.
        self._event: anyio.Event | None = None

    async def wait(self) -> None:
        """Wait for the end of the hub's current turn, or of its next one if none is on."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def end(self) -> None:
        """End a turn: wake whoever waits for it."""
        event, self._event = self._event, None
        if event is not None:
            event.set()


class PendingReceipt:
    """A :class:`Receipt` the hub fills in once it has fanned the publish out.

    Args:
        on_done: called, in the hub's task, with the receipt, the refusal, or ``None`` when
            the hub stopped first; it must not block (a connection queues its ack with it).
        turns: the hub's turns, when the hub itself fills the receipt in (and not a broker
            later): a waiter then waits for the end of a turn instead of an event of its own.
    """

    __slots__ = ("_done", "_error", "_event", "_on_done", "_receipt", "_turns")

    def __init__(
        self,
        on_done: Callable[[Receipt | BackplaneDown | None], None] | None = None,
        turns: Turns | None = None,
    ) -> None:
        self._done = False
        self._receipt: Receipt | None = None
        self._error: BackplaneDown | None = None
        # Made only when somebody waits: most publishes are never asked about.
        self._event: anyio.Event | None = None
        self._on_done = on_done
        self._turns = turns

    def _set(self, receipt: Receipt | None) -> None:
        self._receipt = receipt
        self._done = True
        if self._event is not None:
            self._event.set()
        if self._on_done is not None:
            self._on_done(self._error or receipt)

    def _fail(self, error: BackplaneDown) -> None:
        """The publish was refused: no position was given to it."""
        self._error = error
        self._set(None)

    @property
    def done(self) -> bool:
        """Whether the hub has processed the publish (or stopped before it could)."""
        return self._done

    def result(self) -> Receipt:
        """Return the receipt of a publish that is :attr:`done`.

        Raises:
            HubStopped: the hub stopped before it got to this publish.
            BackplaneDown: the broker that numbers the topic's messages could not be reached.
        """
        if self._error is not None:
            raise self._error
        if self._receipt is None:
            raise HubStopped
        return self._receipt

    async def wait(self) -> Receipt:
        """Wait for the hub to process the publish.

        Raises:
            HubStopped: the hub stopped before it got to this publish.
            BackplaneDown: the broker that numbers the topic's messages could not be reached.
        """
        if self._turns is not None:
            while not self._done:
                await self._turns.wait()
        elif not self._done:
            self._event = anyio.Event()
            await self._event.wait()
        return self.result()


@dataclass(frozen=True, slots=True)
class SubscribeCommand:
    subscriber: Subscriber
    topic: str
    since: Position | None
    last: int | None


@dataclass(frozen=True, slots=True)
class UnsubscribeCommand:
    subscriber: Subscriber
    topic: str


@dataclass(frozen=True, slots=True)
class PublishCommand:
    topic: str
    payload: Payload
    source: Source
    receipt: PendingReceipt | None
    # The broker's position for it, when the broker numbers the topic's messages.
    position: Position | None = None


# What became of one message of a batch (see PublishBatchCommand).
BatchResult = tuple[str, int, int] | PendingReceipt | BackplaneDown


@dataclass(eq=False, slots=True)
class PublishBatchCommand:
    """Publishes the hub takes as one command, in order, and what became of each.

    ``results`` gets one entry per message, in order, once the hub has taken them: its epoch,
    seq and subscriber count (as in a :class:`Receipt`, without the per-message object); with
    shared history, the receipt the broker fills in, or the refusal when the broker is down.
    ``done`` is set then, or when the hub stopped before it took them (``results`` is then
    empty).
    """

    messages: Sequence[tuple[str, Payload]]
    source: Source
    results: list[BatchResult] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False, slots=True)
class PendingSubscribe:
    """A subscribe waiting for the broker's starting point (history shared through a broker),
    and the live messages buffered for it meanwhile (``None`` once the buffer overflowed)."""

    subscriber: Subscriber
    topic: str
    since: Position | None
    last: int | None
    buffer: list[tuple[Position, Payload]] | None = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RecoveredCommand:
    """The broker's answer to a subscribe in shared history: the stream's position then, and
    what to replay (``entries`` as ``(seq, payload)``, oldest first).

    ``outcome`` is ``None`` for a plain subscribe (neither ``since`` nor ``last``), and
    ``error`` says why the broker could not answer.
    """

    subscriber: Subscriber
    request: PendingSubscribe
    topic: str
    epoch: str
    seq: int
    outcome: Outcome | None
    entries: Sequence[tuple[int, Payload]]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PingCommand:
    subscriber: Subscriber


@dataclass(frozen=True, slots=True)
class Wake:
    """Wakes an idle hub so that it takes a departure."""


Command = (
    SubscribeCommand
    | UnsubscribeCommand
    | PublishCommand
    | PublishBatchCommand
    | PingCommand
    | RecoveredCommand
    | Wake
)
WAKE = Wake()
