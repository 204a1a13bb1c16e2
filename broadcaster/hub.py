"""The hub: one task that owns the topic registry and each topic's stream, and fans out.

Everyone else talks to it through its bounded mailbox. A publish takes the topic's next
position, is encoded once per mode, offered to each subscriber's outbox with a non-blocking
call and kept in the topic's history (:mod:`broadcaster.stream`); the hub never awaits a
socket, a subscriber or a lock one holds. Since one task does it all, a subscribe that replays
history and joins the live fan-out happens between two publishes: no gap, no duplicate.

With history shared through a broker (a :class:`broadcaster.backplane.Sequencer`), the broker
numbers every publish instead: a local publish goes to the broker only, and the hub fans out
what comes back at the broker's position (:mod:`broadcaster.shared_topics`). Publishes are
refused while the broker is down: a position handed out here could clash with another node's.
"""

from __future__ import annotations

from collections import Counter, deque
from contextlib import suppress
from dataclasses import dataclass
from time import monotonic, perf_counter
from types import MappingProxyType
from typing import TYPE_CHECKING

import anyio

from broadcaster.errors import (
    BackplaneDown,
    CloseCode,
    Closing,
    HubBusy,
    HubStopped,
    ProtocolError,
    ShuttingDown,
)
from broadcaster.mailbox import (
    WAKE,
    BatchResult,
    Command,
    PendingReceipt,
    PingCommand,
    PublishBatchCommand,
    PublishCommand,
    Receipt,
    RecoveredCommand,
    Source,
    SubscribeCommand,
    Subscriber,
    Turns,
    UnsubscribeCommand,
    Wake,
)
from broadcaster.protocol import Frame, Mode, Payload, Position, control_frame, error_frame
from broadcaster.shared_topics import Topic, begin, finish, publish
from broadcaster.stream import Entry, History, HistoryStatistics, Outcome

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from structlog.typing import FilteringBoundLogger

    from broadcaster.backplane import Relay, Sequencer


# Commands (a batch counting one per message) the hub takes in one go before it lets other
# tasks run.
BURST = 128
PONG = control_frame("pong")


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """A snapshot of the hub."""

    running: bool
    topics: Mapping[str, int]
    subscribers: int
    mailbox_depth: int
    published: Mapping[str, int]
    history: HistoryStatistics
    recoveries: Mapping[str, int]


class Hub:
    """The fan-out actor.

    Args:
        mailbox_size: commands queued at most; past it :meth:`publish_nowait` raises
            :class:`HubBusy` and the async senders wait.
        logger: the hub's logger.
        max_subscriptions: topics one connection may subscribe to; a subscribe past it is
            answered with a ``too_many_subscriptions`` error frame.
        observe_fanout: told the seconds each publish took to fan out, for a histogram.
        relay: told of topics opening and closing and of local publishes, to share them.
        history: every topic's stream and its bounds; by default :class:`History`'s defaults.
        clock: monotonic seconds, for the history's TTL; tests pass a clock of their own.
        sequencer: the broker that numbers publishes and keeps history (shared history); the
            local ``history`` is then unused.
    """

    def __init__(
        self,
        *,
        mailbox_size: int,
        logger: FilteringBoundLogger,
        max_subscriptions: int,
        observe_fanout: Callable[[float], None] = lambda seconds: None,
        relay: Relay | None = None,
        history: History | None = None,
        clock: Callable[[], float] = monotonic,
        sequencer: Sequencer | None = None,
    ) -> None:
        self._sequencer = sequencer
        # With a sequencer, the broker's answer fills receipts in, after the hub's turn.
        self._turns = Turns() if sequencer is None else None
        self._mailbox_size = mailbox_size
        self._log = logger
        self._max_subscriptions = max_subscriptions
        # The mailbox exists while the hub runs; None means stopped.
        self._mailbox: MemoryObjectSendStream[Command] | None = None
        self._topics: dict[str, Topic] = {}
        self._subscribers: set[Subscriber] = set()
        # Departures bypass the mailbox so that a full mailbox cannot lose a cleanup.
        self._departures: deque[Subscriber] = deque()
        self._published: Counter[str] = Counter()
        self._observe_fanout = observe_fanout
        self._relay = relay
        self._history = History() if history is None else history
        self._clock = clock
        self._recoveries: Counter[str] = Counter()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until cancelled; then fail every subscriber's outbox.

        Subscribers are told :class:`ShuttingDown` when the hub is cancelled and a 1011
        ``Closing`` when it crashed; publishers still waiting for a receipt get
        :class:`HubStopped`.
        """
        error: Closing = Closing(CloseCode.INTERNAL_ERROR, "internal error")
        self._mailbox, inbox = anyio.create_memory_object_stream[Command](self._mailbox_size)
        self._log.info("hub_started")
        task_status.started()
        try:
            async for command in inbox:
                taken = self._handle(command)
                # Take what else is queued before yielding, so that the senders woken by
                # these publishes each find a batch to write rather than one frame.
                while taken < BURST:
                    try:
                        taken += self._handle(inbox.receive_nowait())
                    except anyio.WouldBlock:
                        break
                self._take_departures()
                self._history.expire(self._clock())
                if self._turns is not None:
                    self._turns.end()
        except anyio.get_cancelled_exc_class():
            error = ShuttingDown()
            raise
        finally:
            self._mailbox.close()
            self._mailbox = None
            for command in _drain(inbox):
                if isinstance(command, PublishCommand) and command.receipt is not None:
                    command.receipt._set(None)
                elif isinstance(command, PublishBatchCommand):
                    command.done.set()
            if self._turns is not None:
                self._turns.end()
            inbox.close()
            for subscriber in list(self._subscribers):
                subscriber.outbox.fail(error)
            self._subscribers.clear()
            self._departures.clear()
            self._topics.clear()
            self._log.info("hub_stopped", reason=error.reason)

    def join(self, subscriber: Subscriber) -> None:
        """Register a connection; it receives nothing until it subscribes.

        Raises:
            HubStopped: the hub is not running.
        """
        if self._mailbox is None:
            raise HubStopped
        self._subscribers.add(subscriber)

    def leave_nowait(self, subscriber: Subscriber) -> None:
        """Remove a connection and all its subscriptions; never blocks, never lost."""
        if self._mailbox is None:
            return  # a stopped hub holds no subscriptions
        self._departures.append(subscriber)
        # When the mailbox is full the hub is awake anyway and takes the departure at the end
        # of its current burst; the closed outbox already receives nothing meanwhile.
        with suppress(anyio.WouldBlock):
            self._mailbox.send_nowait(WAKE)

    async def subscribe(
        self,
        subscriber: Subscriber,
        topic: str,
        *,
        since: Position | None = None,
        last: int | None = None,
    ) -> None:
        """Ask the hub to subscribe ``subscriber`` to ``topic``, waiting for mailbox room.

        Args:
            since: replay what was published after this position first, if the history
                still has all of it (the ``subscribed`` frame says whether it did).
            last: replay the latest ``last`` messages first.
        """
        await self._send(SubscribeCommand(subscriber, topic, since, last))

    async def unsubscribe(self, subscriber: Subscriber, topic: str) -> None:
        """Ask the hub to unsubscribe ``subscriber`` from ``topic``."""
        await self._send(UnsubscribeCommand(subscriber, topic))

    async def ping(self, subscriber: Subscriber) -> None:
        """Ask for a ``pong``, queued once every command sent before it has taken effect."""
        await self._send(PingCommand(subscriber))

    async def publish(self, topic: str, payload: Payload, source: Source = Source.APP) -> None:
        """Publish to ``topic``, waiting for mailbox room (pushes back on the publisher).

        Raises:
            BackplaneDown: history is shared and the broker that numbers it is down.
        """
        self._check_sequencer(source)
        await self._send(PublishCommand(topic, payload, source, None))

    async def place(self, topic: str, payload: Payload, position: Position) -> None:
        """Fan out a message the broker numbered, eagerly like :meth:`publish_eagerly`."""
        await self._send_eagerly(PublishCommand(topic, payload, Source.BACKPLANE, None, position))

    async def recovered(self, command: RecoveredCommand) -> None:
        """Hand the hub the broker's answer to a pending subscribe."""
        await self._send(command)

    async def publish_eagerly(self, topic: str, payload: Payload, source: Source) -> None:
        """Publish like :meth:`publish`, but with no checkpoint while the mailbox has room.

        A publisher with several messages at hand (a socket's frames from one read, the
        backplane's buffer) then queues them all before the hub runs; the hub fans them out as
        one burst, and each sender wakes to a batch instead of to every message.
        """
        try:
            self.publish_nowait(topic, payload, source)
        except HubBusy:
            await self.publish(topic, payload, source)

    def publish_nowait(
        self,
        topic: str,
        payload: Payload,
        source: Source = Source.APP,
        on_done: Callable[[Receipt | BackplaneDown | None], None] | None = None,
    ) -> PendingReceipt:
        """Publish to ``topic`` without waiting; ``on_done`` is the receipt's (see
        :class:`~broadcaster.mailbox.PendingReceipt`).

        Raises:
            HubBusy: the mailbox is full.
            HubStopped: the hub is not running.
            BackplaneDown: history is shared and the broker that numbers it is down (the
                receipt fails with it too if the broker is lost before it numbers this one).
        """
        if self._mailbox is None:
            raise HubStopped
        self._check_sequencer(source)
        receipt = PendingReceipt(on_done, self._turns)
        try:
            self._mailbox.send_nowait(PublishCommand(topic, payload, source, receipt))
        except anyio.WouldBlock:
            raise HubBusy from None
        return receipt

    async def publish_pending(
        self,
        topic: str,
        payload: Payload,
        source: Source,
        on_done: Callable[[Receipt | BackplaneDown | None], None] | None = None,
    ) -> PendingReceipt:
        """Publish like :meth:`publish_nowait`, but wait for mailbox room instead of raising
        :exc:`HubBusy` (pushes back on the publisher).

        Raises:
            HubStopped: the hub is not running.
            BackplaneDown: as for :meth:`publish_nowait`.
        """
        self._check_sequencer(source)
        receipt = PendingReceipt(on_done, self._turns)
        await self._send(PublishCommand(topic, payload, source, receipt))
        return receipt

    async def publish_batch(
        self, messages: Sequence[tuple[str, Payload]], source: Source
    ) -> list[BatchResult | None]:
        """Publish ``(topic, payload)`` messages in order, waiting for mailbox room, and return
        what became of each, in order, once the hub has taken them all.

        The messages go in commands of up to :data:`BURST` each, so that the hub still lets
        the senders write between two of them. Each result is as in
        :class:`~broadcaster.mailbox.PublishBatchCommand`, or ``None`` when the hub stopped
        before it took that message.

        Raises:
            HubStopped: the hub is not running (nothing was published).
        """
        commands = [
            PublishBatchCommand(messages[start : start + BURST], source)
            for start in range(0, len(messages), BURST)
        ]
        sent = 0
        for command in commands:
            try:
                await self._send_eagerly(command)
            except HubStopped:
                if not sent:
                    raise
                break
            sent += 1
        results: list[BatchResult | None] = []
        for command in commands[:sent]:
            await command.done.wait()
            results += command.results or [None] * len(command.messages)
        return results + [None] * (len(messages) - len(results))

    def history(
        self, topic: str, since: Position | None, limit: int
    ) -> tuple[Position, bool, list[Frame]]:
        """Return ``topic``'s position and up to ``limit`` envelopes of its history, for
        ``GET /history``: the latest ones, or the first ones after ``since``, and whether
        those follow ``since`` with none missing.

        Called from the hub's event loop thread, it runs between two of the hub's commands,
        like one of them. A topic without a stream gets one, so that its position is known.
        With history shared through a broker the hub keeps none: ask the bridge
        (``Bridge.page``) instead.

        Raises:
            HubStopped: the hub is not running.
        """
        if self._mailbox is None:
            raise HubStopped
        stream = self._history.open(topic, self._clock())
        recovery = self._history.page(stream, since, limit)
        frames = [self._history.mux_frame(topic, stream, entry) for entry in recovery.entries]
        self._history.settle(topic, stream)
        return Position(stream.epoch, stream.seq), recovery.recovered, frames

    def subscribers(self) -> tuple[Subscriber, ...]:
        """Return the connections the hub serves now, for inspection."""
        return tuple(self._subscribers)

    def statistics(self) -> HubStatistics:
        """Return the registry's shape and the mailbox depth."""
        return HubStatistics(
            running=self._mailbox is not None,
            topics=MappingProxyType(
                {name: len(t.raw) + len(t.mux) for name, t in self._topics.items()}
            ),
            subscribers=len(self._subscribers),
            mailbox_depth=self._mailbox.statistics().current_buffer_used if self._mailbox else 0,
            published=MappingProxyType(dict(self._published)),
            history=self._history.statistics(),
            recoveries=MappingProxyType(dict(self._recoveries)),
        )

    def _check_sequencer(self, source: Source) -> None:
        """Refuse a publish at once while the broker that would number it is down."""
        sequencer = self._sequencer
        if sequencer is not None and source is not Source.BACKPLANE:
            if not sequencer.accepting():
                raise BackplaneDown("the broker that numbers messages is down")

    async def _send_eagerly(self, command: Command) -> None:
        """Queue ``command`` with no checkpoint while the mailbox has room, else wait for room."""
        if self._mailbox is None:
            raise HubStopped
        try:
            self._mailbox.send_nowait(command)
        except anyio.WouldBlock:
            await self._send(command)

    async def _send(self, command: Command) -> None:
        if self._mailbox is None:
            raise HubStopped
        try:
            await self._mailbox.send(command)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise HubStopped from None

    def _handle(self, command: Command) -> int:
        """Carry ``command`` out; return how many commands it counts as in a burst."""
        if isinstance(command, PublishCommand):
            self._publish(command)
            return 1
        if isinstance(command, PublishBatchCommand):
            self._publish_batch(command)
            return len(command.messages)
        if isinstance(command, Wake):
            self._take_departures()
            return 1
        subscriber = command.subscriber
        if subscriber not in self._subscribers:
            return 1  # it left while the command was queued
        if isinstance(command, SubscribeCommand):
            self._subscribe(subscriber, command)
        elif isinstance(command, RecoveredCommand):
            self._recovered(subscriber, command)
        elif isinstance(command, PingCommand):
            subscriber.outbox.offer(PONG)
        else:
            self._unsubscribe(subscriber, command.topic)
        return 1

    def _take_departures(self) -> None:
        while self._departures:
            self._leave(self._departures.popleft())

    def _publish(self, command: PublishCommand) -> None:
        started = perf_counter()
        self._published[command.source] += 1
        if self._sequencer is not None:
            publish(self._topics.get(command.topic), command, self._sequencer)
            self._observe_fanout(perf_counter() - started)
            return
        name = command.topic
        epoch, seq, subscribers = self._fan_out(
            name, command.payload, command.source, self._clock()
        )
        self._observe_fanout(perf_counter() - started)
        if command.receipt is not None:
            command.receipt._set(Receipt(name, epoch, seq, subscribers))

    def _publish_batch(self, command: PublishBatchCommand) -> None:
        """Publish a batch's messages; its fan-out time is observed once, for all of them."""
        started = perf_counter()
        source, results = command.source, command.results
        # One time for the whole command, as the hub takes it in one go.
        now = self._clock()
        sequencer = self._sequencer
        if sequencer is None:
            for name, payload in command.messages:
                results.append(self._fan_out(name, payload, source, now))
            self._published[source] += len(results)
        else:
            for name, payload in command.messages:
                try:
                    self._check_sequencer(source)
                except BackplaneDown as refusal:
                    results.append(refusal)
                    continue
                receipt = PendingReceipt()
                publish(
                    self._topics.get(name),
                    PublishCommand(name, payload, source, receipt),
                    sequencer,
                )
                results.append(receipt)
                self._published[source] += 1
        self._observe_fanout(perf_counter() - started)
        command.done.set()

    def _fan_out(
        self, name: str, payload: Payload, source: Source, now: float
    ) -> tuple[str, int, int]:
        """Give a local publish its position, offer it to every subscriber and keep it; return
        its epoch, its seq and how many subscribers it was offered to."""
        history = self._history
        stream = history.publish(name, now)
        epoch, seq = stream.epoch, stream.seq
        topic = self._topics.get(name)
        raw = mux = None
        subscribers = 0
        if topic is not None:
            subscribers = len(topic.raw) + len(topic.mux)
            if topic.raw:
                raw = Frame.of(payload.raw)
                for outbox in topic.raw:
                    outbox.offer(raw)
            if topic.mux:
                mux = payload.envelope(name, seq)
                for outbox in topic.mux:
                    outbox.offer(mux)
        if history.size:
            # The frames just sent are kept: a replay sends the very same objects.
            history.append(name, stream, Entry(seq, payload, raw, mux))
        if self._relay is not None and source is not Source.BACKPLANE:
            self._relay.published(name, payload)
        return epoch, seq, subscribers

    def _subscribe_shared(
        self, subscriber: Subscriber, command: SubscribeCommand, sequencer: Sequencer
    ) -> None:
        name = command.topic
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic(name)
            if self._relay is not None:
                self._relay.topic_opened(name)
        subscriber.topics.add(name)
        if not begin(topic, subscriber, command.since, command.last, sequencer):
            self._remove(subscriber, name)

    def _recovered(self, subscriber: Subscriber, command: RecoveredCommand) -> None:
        topic = self._topics.get(command.topic)
        if topic is None or topic.pending.get(subscriber) is not command.request:
            return  # it unsubscribed or left meanwhile, or subscribed again since
        if command.outcome is not None:
            # Live messages overflowed while the broker answered: more than can be caught up.
            overflowed = command.request.buffer is None
            self._recoveries[Outcome.OVER_LIMIT if overflowed else command.outcome] += 1
        if not finish(topic, subscriber, command):
            self._remove(subscriber, command.topic)

    def _subscribe(self, subscriber: Subscriber, command: SubscribeCommand) -> None:
        name = command.topic
        # Counted here, where the subscriptions are known exactly, and answered in order.
        if name not in subscriber.topics and len(subscriber.topics) >= self._max_subscriptions:
            detail = f"a connection subscribes to at most {self._max_subscriptions} topics"
            refusal = ProtocolError("too_many_subscriptions", detail, topic=name)
            subscriber.outbox.offer(error_frame(refusal))
            return
        if self._sequencer is not None:
            self._subscribe_shared(subscriber, command, self._sequencer)
            return
        history = self._history
        stream = history.pin(name, self._clock())
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic(name)
            if self._relay is not None:
                self._relay.topic_opened(name)
        recovery = None
        if command.since is not None:
            recovery = history.since(stream, command.since.epoch, command.since.seq)
            self._recoveries[recovery.outcome] += 1
        elif command.last is not None:
            recovery = history.last(stream, command.last)
        topic.members(subscriber.mode).add(subscriber.outbox)
        subscriber.topics.add(name)
        outbox = subscriber.outbox
        if subscriber.mode is Mode.MUX:
            fields: dict[str, str | int | bool] = {"topic": name, "epoch": stream.epoch}
            fields["seq"] = stream.seq
            if recovery is not None:
                fields["recovered"] = recovery.recovered
            outbox.offer(control_frame("subscribed", **fields))
        if recovery is None or not recovery.entries:
            return
        # Through the outbox like any message: what does not fit meets the overflow policy.
        if subscriber.mode is Mode.MUX:
            for entry in recovery.entries:
                outbox.offer(history.mux_frame(name, stream, entry))
        else:
            for entry in recovery.entries:
                outbox.offer(history.raw_frame(stream, entry))
        history.settle(name, stream)

    def _unsubscribe(self, subscriber: Subscriber, name: str) -> None:
        self._remove(subscriber, name)
        if subscriber.mode is Mode.MUX:
            subscriber.outbox.offer(control_frame("unsubscribed", topic=name))

    def _leave(self, subscriber: Subscriber) -> None:
        for name in list(subscriber.topics):
            self._remove(subscriber, name)
        self._subscribers.discard(subscriber)

    def _remove(self, subscriber: Subscriber, name: str) -> None:
        subscriber.topics.discard(name)
        topic = self._topics.get(name)
        if topic is None:
            return
        topic.members(subscriber.mode).discard(subscriber.outbox)
        if topic.pending or topic.skips or topic.known:
            topic.forget(subscriber)
        if topic.empty():
            del self._topics[name]
            if self._sequencer is None:
                self._history.unpin(name, self._clock())
            if self._relay is not None:
                self._relay.topic_closed(name)


def _drain(inbox: MemoryObjectReceiveStream[Command]) -> list[Command]:
    """Take what is left in a mailbox whose send end is closed."""
    left = []
    with suppress(anyio.EndOfStream):
        while True:
            left.append(inbox.receive_nowait())
    return left
