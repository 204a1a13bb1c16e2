"""The hub's topics when the broker numbers their messages (history shared through Redis).

Called only from the hub's task, like :mod:`broadcaster.hub` itself; nothing here awaits.

A subscribe is *pending* until the broker answers with the stream's position at a read made
after the topic's broker subscription was in place (a :class:`RecoveredCommand`). Meanwhile the
live messages for the topic are buffered for it. The answer's entries are sent first, then the
buffered messages past the answer's seq; live messages up to that seq that arrive later (the
read may run ahead of the live messages in the hub's mailbox) are skipped for that outbox. So a
resume has no gap and no duplicate, whichever node it happens on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broadcaster.errors import ProtocolError
from broadcaster.mailbox import PendingSubscribe
from broadcaster.protocol import Frame, Mode, control_frame, error_frame
from broadcaster.stream import Outcome

if TYPE_CHECKING:
    from broadcaster.backplane import Sequencer
    from broadcaster.mailbox import PublishCommand, RecoveredCommand, Subscriber
    from broadcaster.outbox import Outbox
    from broadcaster.protocol import Payload, Position

# Live messages buffered for one pending subscribe; past it the subscribe is not recovered.
PENDING_MAX = 10_000


@dataclass(slots=True)
class Topic:
    """One topic's local subscribers, and with shared history the live position and the
    subscribes waiting for the broker."""

    name: str
    raw: set[Outbox] = field(default_factory=set)
    mux: set[Outbox] = field(default_factory=set)
    epoch: str | None = None
    seq: int = 0
    # Subscribes waiting for the broker, with the live messages buffered for them.
    pending: dict[Subscriber, PendingSubscribe] = field(default_factory=dict)
    # Outboxes that have the messages up to this seq already (from a replay).
    skips: dict[Outbox, int] = field(default_factory=dict)
    # Multiplexed outboxes told another epoch than ``epoch`` (their read saw another one).
    known: dict[Outbox, str] = field(default_factory=dict)

    def members(self, mode: Mode) -> set[Outbox]:
        return self.raw if mode is Mode.RAW else self.mux

    def empty(self) -> bool:
        return not self.raw and not self.mux and not self.pending

    def forget(self, subscriber: Subscriber) -> None:
        """Drop what the shared history keeps about ``subscriber`` (not its membership)."""
        self.pending.pop(subscriber, None)
        self.skips.pop(subscriber.outbox, None)
        self.known.pop(subscriber.outbox, None)


def begin(
    topic: Topic,
    subscriber: Subscriber,
    since: Position | None,
    last: int | None,
    sequencer: Sequencer,
) -> bool:
    """Make ``subscriber`` pending on ``topic`` and ask the broker for its starting point.

    Subscribing again starts over: the client gets a fresh starting point. Returns ``False``,
    with a ``backplane_busy`` error frame sent, when the request cannot be queued.
    """
    topic.members(subscriber.mode).discard(subscriber.outbox)
    topic.forget(subscriber)
    request = PendingSubscribe(subscriber, topic.name, since, last)
    topic.pending[subscriber] = request
    if sequencer.recover(request):
        return True
    del topic.pending[subscriber]
    detail = "the broker is not keeping up; subscribe again shortly"
    subscriber.outbox.offer(error_frame(ProtocolError("backplane_busy", detail, topic=topic.name)))
    return False


def publish(topic: Topic | None, command: PublishCommand, sequencer: Sequencer) -> None:
    """Fan out a message the broker numbered, or submit a local publish for numbering (the
    sequencer fills its receipt in, or fails it and counts the refusal)."""
    if command.position is not None:
        if topic is not None:
            fan_out(command.topic, topic, command.payload, command.position)
        return
    subscribers = 0 if topic is None else len(topic.raw) + len(topic.mux)
    sequencer.submit(command.topic, command.payload, command.receipt, subscribers)


def fan_out(name: str, topic: Topic, payload: Payload, position: Position) -> None:
    """Offer a message, at the broker's position, to every subscriber of ``topic``."""
    epoch, seq = position.epoch, position.seq
    if epoch != topic.epoch or topic.known:
        # The broker lost the topic's stream: tell multiplexed subscribers that know another
        # epoch, before its first message in this one, as a fresh subscribe would.
        notice = control_frame("subscribed", topic=name, epoch=epoch, seq=seq - 1, recovered=False)
        for outbox in topic.mux:
            if topic.known.get(outbox, topic.epoch) != epoch:
                outbox.offer(notice)
        topic.known.clear()
        if epoch != topic.epoch:
            topic.skips.clear()
    topic.epoch, topic.seq = epoch, seq
    for request in topic.pending.values():
        buffer = request.buffer
        if buffer is not None:
            if len(buffer) < PENDING_MAX:
                buffer.append((position, payload))
            else:
                request.buffer = None
    skips = topic.skips
    if topic.raw:
        raw = Frame.of(payload.raw)
        for outbox in topic.raw:
            if not skips or skips.get(outbox, 0) < seq:
                outbox.offer(raw)
    if topic.mux:
        mux = payload.envelope(name, seq)
        for outbox in topic.mux:
            if not skips or skips.get(outbox, 0) < seq:
                outbox.offer(mux)
    if skips:
        for outbox in [outbox for outbox, until in skips.items() if until <= seq]:
            del skips[outbox]


def finish(topic: Topic, subscriber: Subscriber, command: RecoveredCommand) -> bool:
    """Answer a pending subscribe with the broker's reply: the ``subscribed`` frame, the
    replay, the buffered live messages past it; then the subscriber joins the live fan-out.

    Returns whether the subscriber is now subscribed (not when the broker could not answer).
    """
    buffered = topic.pending.pop(subscriber).buffer
    outbox, mode, name = subscriber.outbox, subscriber.mode, command.topic
    if command.error is not None:
        if mode is Mode.MUX:
            outbox.offer(error_frame(ProtocolError("backplane_down", command.error, topic=name)))
        return False
    outcome, entries = command.outcome, command.entries
    if buffered is None and outcome is not None:
        # Live messages overflowed while the broker answered: some of them are lost.
        outcome, entries = None, ()
    if mode is Mode.MUX:
        fields: dict[str, str | int | bool] = {"topic": name, "epoch": command.epoch}
        fields["seq"] = command.seq
        if command.outcome is not None:
            fields["recovered"] = outcome is Outcome.RECOVERED
        outbox.offer(control_frame("subscribed", **fields))
    for seq, payload in entries:
        _send(outbox, mode, name, seq, payload)
    for position, payload in buffered or ():
        if position.epoch != command.epoch or position.seq > command.seq:
            _send(outbox, mode, name, position.seq, payload)
    topic.members(mode).add(outbox)
    if topic.epoch is None:
        topic.epoch = command.epoch
    if topic.epoch == command.epoch:
        if topic.seq < command.seq:
            topic.skips[outbox] = command.seq
    elif mode is Mode.MUX:
        topic.known[outbox] = command.epoch
    return True


def _send(outbox: Outbox, mode: Mode, name: str, seq: int, payload: Payload) -> None:
    # Through the outbox like any message: what does not fit meets the overflow policy.
    outbox.offer(Frame.of(payload.raw) if mode is Mode.RAW else payload.envelope(name, seq))
