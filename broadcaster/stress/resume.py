"""Reconnecting clients: picows connections that resume through the Python client's Tracker.

A reconnecting client keeps one :class:`broadcaster.client.Tracker` across all its
connections: the tracker says which subscribes (with ``since`` the last position) start each
connection and which messages to deliver, exactly as :class:`broadcaster.client.Client` does.
The :class:`Judge` around it looks at what the server sent before the tracker filters it: a
message at or below the last delivered ``seq`` is a duplicate (unless the tracker is filling a
gap, when it skips what races the replay), one below a higher ``seq`` already seen since the
last acknowledgement is out of order, and every ``subscribed`` that answers a ``since``
counts as recovered or not. A digest of every delivered ``(epoch, seq,
data)`` tells whether the clients of one topic saw one identical sequence.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from picows import WSMsgType

from broadcaster.client import ClientError, Message, Tracker
from broadcaster.stress.clients import Receiver

if TYPE_CHECKING:
    from picows import WSFrame, WSTransport

    from broadcaster.stress.clients import Tally


@dataclass(slots=True)
class Judge:
    """What the server sent one reconnecting client, across all its connections.

    Args:
        tracker: the resume logic, following the client's topics.
    """

    tracker: Tracker
    duplicates: int = 0
    out_of_order: int = 0
    recovered: int = 0
    not_recovered: int = 0
    # The highest seq seen on the wire per topic since the last acknowledgement.
    newest: dict[str, int] = field(default_factory=dict)
    digest: hashlib.blake2b = field(default_factory=partial(hashlib.blake2b, digest_size=16))

    def take(self, item: dict[str, Any], tally: Tally, now_ns: int) -> str | None:
        """Judge one object from the server, count what the tracker delivers, and return the
        frame the tracker wants sent, if any.

        Raises:
            ClientError: the server answered a subscribe with an error.
        """
        topic = item.get("topic")
        seq = item.get("seq")
        if item.get("op") == "subscribed":
            self.newest.pop(str(topic), None)
            if item.get("recovered") is True:
                self.recovered += 1
            elif item.get("recovered") is False:
                self.not_recovered += 1
        elif item.get("op") is None and isinstance(seq, int) and topic in self.tracker.topics:
            self._judge(str(topic), seq)
        out, send = self.tracker.handle(item)
        for each in out:
            if isinstance(each, Message):
                self._deliver(each, tally, now_ns)
        return send

    def _judge(self, topic: str, seq: int) -> None:
        state = self.tracker.topics[topic]
        newest = self.newest.get(topic, 0)
        if not state.filling and state.position is not None and seq <= state.position.seq:
            self.duplicates += 1
        elif seq < newest:
            self.out_of_order += 1
        self.newest[topic] = max(newest, seq)

    def _deliver(self, message: Message, tally: Tally, now_ns: int) -> None:
        data = str(message.data)
        self.digest.update(f"{message.epoch}\0{message.seq}\0{data}\0".encode())
        counter, _, rest = data.partition(" ")
        sent, _, _ = rest.partition(" ")
        try:
            tally.count(message.seq, int(counter), int(sent), now_ns)
        except ValueError:
            tally.unparsed += 1

    def position(self, topic: str) -> int:
        """The last ``seq`` delivered of ``topic``; 0 before the first acknowledgement."""
        position = self.tracker.position(topic)
        return position.seq if position is not None else 0


class Resumer(Receiver):
    """One connection of a reconnecting client, on the multiplexed ``/ws``.

    Args:
        tally: where delivered messages are counted.
        judge: the client's judge and tracker, shared by all its connections.
        topic: the topic whose last ``seq`` :meth:`expect` waits for.
    """

    def __init__(self, tally: Tally, judge: Judge, topic: str) -> None:
        super().__init__(tally, raw=False)
        self.judge = judge
        self.topic = topic

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Hand each object of a text frame to the judge; other frames as a receiver does."""
        if frame.msg_type is not WSMsgType.TEXT:
            super().on_ws_frame(transport, frame)
            return
        now_ns = time.time_ns()
        if self.deadline_ns is not None and now_ns > self.deadline_ns:
            self.leave()
            return
        try:
            value = json.loads(frame.get_payload_as_bytes())
        except ValueError:
            self.tally.unparsed += 1
            return
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict):
                continue
            if item.get("op") == "subscribed":
                self.subscribed.set()
            try:
                send = self.judge.take(item, self.tally, now_ns)
            except ClientError as error:
                self.errors.append(str(error))
                continue
            if send is not None:
                transport.send(WSMsgType.TEXT, send.encode())
        if self.target is not None and self.judge.position(self.topic) >= self.target:
            self.finished.set()

    def expect(self, target: int) -> None:
        """Set the last ``seq`` to wait for; ``finished`` is set once it has been delivered."""
        self.target = target
        if self.judge.position(self.topic) >= target:
            self.finished.set()

    def resubscribe(self) -> None:
        """Send the tracker's subscribes: each topic ``since`` its last delivered position."""
        assert self.transport is not None  # connected
        for frame in self.judge.tracker.subscribes():
            self.transport.send(WSMsgType.TEXT, frame.encode())
