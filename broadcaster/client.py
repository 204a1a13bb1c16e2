"""An asyncio client for Python services that subscribe: reconnects, resumes, fills gaps.

Needs the ``client`` extra (the ``websockets`` library)::

    from broadcaster.client import Client

    async for item in Client("ws://127.0.0.1:8000/ws", ["news", "prices"]):
        if isinstance(item, Message):
            print(item.topic, item.seq, item.data)
        else:
            print("lost messages on", item.topic)  # a Gap: history could not fill it

The client keeps the last ``(epoch, seq)`` of each topic. When the connection drops it
reconnects with jittered exponential backoff and subscribes with ``since`` that position, so
the server replays what was missed. A ``seq`` gap within a connection (the server's overflow
policy dropped messages for this client) is filled the same way: the topic is subscribed again
with ``since``, and the messages that raced the replay are skipped. Messages arrive once each,
in order per topic. When the server cannot replay (another epoch after a restart, history
too short, more than ``BROADCASTER_RECOVERY_MAX`` missed), the client yields a :class:`Gap`
and goes on from the live position.

This module speaks the wire protocol only; it imports nothing of the server. The publishers
(:class:`HTTPPublisher`, :class:`WSPublisher`) live in :mod:`broadcaster.publisher` and are
exported here too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

from broadcaster.publisher import HTTPPublisher, PublishError, Receipt, WSPublisher

__all__ = [
    "Client",
    "ClientError",
    "Gap",
    "HTTPPublisher",
    "Message",
    "Position",
    "PublishError",
    "Receipt",
    "Tracker",
    "WSPublisher",
]

# Largest frame accepted from the server; coalesced frames hold many messages.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Times in a row a gap is filled from the same position before it is reported instead: a
# replay that the client's own outbox cannot hold (a drop_oldest server under load) would
# otherwise be asked for again forever.
MAX_FILLS = 3
# Handshake answers that another try would only repeat.
FINAL_STATUSES = frozenset({400, 401, 403, 404})


class ClientError(Exception):
    """The server refused this client for good (a bad token, a forbidden topic)."""


@dataclass(frozen=True, slots=True)
class Position:
    """The last message a client has of a topic: its ``seq`` within ``epoch``."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Message:
    """One published message; ``data`` is bytes when it was published as binary."""

    topic: str
    epoch: str
    seq: int
    data: Any


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of ``topic`` after ``after`` (if known) were lost; the stream goes on from
    ``resumed``."""

    topic: str
    after: Position | None
    resumed: Position


@dataclass(slots=True)
class _Topic:
    position: Position | None = None
    # Re-subscribed with since after a gap: skip messages until the new acknowledgement.
    filling: bool = False
    # The position the latest gaps were filled from, and how many times in a row.
    filled_from: Position | None = None
    fills: int = 0


@dataclass(slots=True)
class Tracker:
    """The resume logic, without I/O: which subscribes to send, what to yield.

    Args:
        topics: the topics to follow.
    """

    topics: dict[str, _Topic] = field(default_factory=dict)

    @classmethod
    def of(cls, topics: Iterable[str]) -> Tracker:
        """Follow ``topics`` from their live position."""
        return cls({topic: _Topic() for topic in topics})

    def subscribes(self) -> list[str]:
        """The subscribe frames that (re)join every topic where this client left it."""
        frames = []
        for name, topic in self.topics.items():
            topic.filling = False
            frames.append(_subscribe(name, topic.position))
        return frames

    def position(self, topic: str) -> Position | None:
        """The last position of ``topic`` delivered."""
        return self.topics[topic].position

    def handle(self, item: dict[str, Any]) -> tuple[list[Message | Gap], str | None]:
        """Take one object from the server; return what to yield and a frame to send, if any.

        Raises:
            ClientError: the server answered a subscribe with an error.
        """
        op = item.get("op")
        if op == "subscribed":
            return self._subscribed(item), None
        if op == "error":
            raise ClientError(f"{item.get('error')}: {item.get('detail')}")
        topic = self.topics.get(str(item.get("topic")))
        seq = item.get("seq")
        if op is not None or topic is None or not isinstance(seq, int) or topic.filling:
            return [], None
        position = topic.position
        if position is None:
            return [], None  # before the acknowledgement: cannot happen, ignored
        if seq <= position.seq:
            return [], None  # already delivered (a replay that overlaps)
        name = str(item["topic"])
        topic.position = Position(position.epoch, seq)
        delivered = Message(name, position.epoch, seq, _data(item))
        if seq == position.seq + 1:
            return [delivered], None
        topic.fills = topic.fills + 1 if topic.filled_from == position else 1
        topic.filled_from = position
        if topic.fills > MAX_FILLS:
            topic.filled_from, topic.fills = None, 0
            return [Gap(name, position, topic.position), delivered], None
        topic.position, topic.filling = position, True
        return [], _subscribe(name, position)

    def _subscribed(self, item: dict[str, Any]) -> list[Message | Gap]:
        topic = self.topics.get(str(item.get("topic")))
        epoch, seq = item.get("epoch"), item.get("seq")
        if topic is None or not isinstance(epoch, str) or not isinstance(seq, int):
            return []
        topic.filling = False
        before = topic.position
        if before is None:
            topic.position = Position(epoch, seq)
            return []
        if item.get("recovered") is True:
            return []  # the replay follows, from before.seq + 1
        topic.position = Position(epoch, seq)
        return [Gap(str(item["topic"]), before, topic.position)]


class Client:
    """Subscribe to topics at a multiplexed ``/ws`` URL and iterate over what arrives.

    Args:
        url: ``ws://host:port/ws`` (or ``wss://``).
        topics: the topics to follow.
        token: a JWT for servers that require one, sent as a bearer token.
        backoff_min: seconds before the first reconnect, doubled per failed try up to
            ``backoff_max``; each delay is between half and all of it, at random.
        backoff_max: the longest delay between two reconnect tries.
        jitter: returns a number in [0, 1); tests pass their own.
        reconnect: whether to reconnect at all after a lost connection.

    Iterate with ``async for``; the iteration ends only when :meth:`close` is called, when
    ``reconnect`` is off and the connection ends, or with :class:`ClientError`.
    """

    def __init__(
        self,
        url: str,
        topics: Iterable[str],
        *,
        token: str | None = None,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        jitter: Callable[[], float] = random.random,
        reconnect: bool = True,
    ) -> None:
        self.url = url
        self.tracker = Tracker.of(topics)
        self._headers = {"authorization": f"Bearer {token}"} if token else None
        self._backoff = (backoff_min, backoff_max)
        self._jitter = jitter
        self._reconnect = reconnect
        self._websocket: ClientConnection | None = None
        self._closed = False
        self.connects = 0

    def positions(self) -> dict[str, Position | None]:
        """The last position delivered of each topic."""
        return {topic: self.tracker.position(topic) for topic in self.tracker.topics}

    def abort(self) -> None:
        """Drop the connection abruptly, as a network failure would; the client resumes."""
        if self._websocket is not None:
            self._websocket.transport.abort()

    async def close(self) -> None:
        """Stop: close the connection with 1000 and end the iteration."""
        self._closed = True
        if self._websocket is not None:
            await self._websocket.close()

    def __aiter__(self) -> AsyncIterator[Message | Gap]:
        return self._run()

    async def _run(self) -> AsyncIterator[Message | Gap]:
        failures = 0
        while not self._closed:
            try:
                async with connect(
                    self.url,
                    max_size=MAX_FRAME_BYTES,
                    additional_headers=self._headers,
                    open_timeout=10,
                    proxy=None,
                ) as websocket:
                    self._websocket = websocket
                    self.connects += 1
                    for frame in self.tracker.subscribes():
                        await websocket.send(frame)
                    async for item in self._items(websocket):
                        failures = 0  # the server answered: the next loss starts over
                        if item is not None:
                            yield item
            except InvalidStatus as error:
                if error.response.status_code in FINAL_STATUSES:
                    raise ClientError(f"refused with {error.response.status_code}") from error
            except (OSError, TimeoutError, WebSocketException):
                pass  # a lost or refused connection: try again
            finally:
                self._websocket = None
            if self._closed or not self._reconnect:
                return
            low, high = self._backoff
            delay = min(high, low * 2**failures)
            failures += 1
            await asyncio.sleep(delay / 2 + self._jitter() * delay / 2)

    async def _items(self, websocket: ClientConnection) -> AsyncIterator[Message | Gap | None]:
        """Yield what the connection brings, and ``None`` for each frame that brings nothing
        to yield."""
        try:
            async for frame in websocket:
                if isinstance(frame, bytes):
                    continue  # the multiplexed endpoint sends text only
                value = json.loads(frame)
                for item in value if isinstance(value, list) else [value]:
                    if not isinstance(item, dict):
                        continue
                    out, send = self.tracker.handle(item)
                    if send is not None:
                        await websocket.send(send)
                    for each in out:
                        yield each
                yield None
        except ConnectionClosed:
            return


def _subscribe(topic: str, position: Position | None) -> str:
    frame: dict[str, Any] = {"op": "subscribe", "topic": topic}
    if position is not None:
        frame["since"] = {"epoch": position.epoch, "seq": position.seq}
    return json.dumps(frame, separators=(",", ":"))


def _data(item: dict[str, Any]) -> Any:
    data = item.get("data")
    if item.get("encoding") == "base64" and isinstance(data, str):
        return base64.b64decode(data)
    return data
