"""Sharing messages between nodes through a broker: the interface, its wire format, the choice.

A node is one server process. Its :class:`Bridge` stands between the local hub and a
:class:`Backplane`: it subscribes the broker to the topics that local clients want, sends the
node's publishes to the broker and hands what other nodes published to the hub. Two backplanes
ship: Redis pub/sub (:mod:`broadcaster.backplane.redis_broker`) and NATS
(:mod:`broadcaster.backplane.nats_broker`); ``BROADCASTER_BACKPLANE=memory`` runs no bridge.

On the broker every message is ``MAGIC``, the publishing node's id, one byte for the kind of
payload (``t`` text, ``b`` bytes, ``j`` JSON) and the payload's bytes, so that raw and
multiplexed subscribers on every node receive what they would have received on the node where
it was published.

With history on a Redis backplane, the broker numbers each topic's messages: it publishes
``s``, the epoch, ``:``, the seq, ``:`` and the message above (:func:`decode_positioned`),
and every node, the publisher's own included, delivers what the broker publishes, in its
order, at the broker's position (see :mod:`broadcaster.backplane.redis_broker`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

from broadcaster.protocol import Payload, Position

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from contextlib import AbstractAsyncContextManager

    from broadcaster.mailbox import PendingReceipt, PendingSubscribe
    from broadcaster.settings import Settings

__all__ = [
    "NODE_ID_BYTES",
    "Backplane",
    "Link",
    "Relay",
    "Sequencer",
    "decode",
    "decode_positioned",
    "encode",
    "open_backplane",
]

MAGIC = b"bc1"
NODE_ID_BYTES = 8
_HEADER = len(MAGIC) + NODE_ID_BYTES + 1


class Relay(Protocol):
    """Told, from inside the hub's task, what other nodes need to know; must never block."""

    def topic_opened(self, topic: str) -> None:
        """``topic`` got its first local subscriber."""

    def topic_closed(self, topic: str) -> None:
        """``topic`` lost its last local subscriber."""

    def published(self, topic: str, payload: Payload) -> None:
        """A publish that did not come from the backplane was fanned out locally."""


class Sequencer(Protocol):
    """The broker that numbers every topic's messages (shared history); called from inside
    the hub's task, it never blocks."""

    def accepting(self) -> bool:
        """Whether publishes can be numbered now (the broker is reachable)."""

    def submit(
        self, topic: str, payload: Payload, receipt: PendingReceipt | None, subscribers: int
    ) -> bool:
        """Offer a local publish for numbering; ``False`` when it cannot be taken.

        The receipt, if any, is filled in with the broker's position (and ``subscribers``),
        or failed with ``BackplaneDown``.
        """

    def recover(self, request: PendingSubscribe) -> bool:
        """Ask for a subscribe's starting point, answered by a ``RecoveredCommand`` once the
        broker subscription for its topic is in place; ``False`` when it cannot be taken."""


class Link(Protocol):
    """One connection to the broker. Every method raises ``BackplaneDown`` when it is lost."""

    def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(topic, message)`` for the subscribed topics; ends when the link is lost."""

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe to ``topics``, returning once the broker has taken the subscriptions."""

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Stop receiving ``topics``."""

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish each ``(topic, message)`` in order."""

    async def ping(self) -> None:
        """Return once the broker has answered."""


class Backplane(Protocol):
    """A broker that links can be opened to."""

    def connect(self) -> AbstractAsyncContextManager[Link]:
        """Open a link, closed when the context exits.

        Raises:
            BackplaneDown: the broker cannot be reached.
        """


def open_backplane(settings: Settings) -> Backplane:
    """Return the backplane ``BROADCASTER_BACKPLANE`` names (not ``memory``).

    The client library is imported here, so that it is needed only when it is used.
    """
    if settings.backplane.startswith(("nats:", "tls:")):
        from broadcaster.backplane.nats_broker import NatsBackplane

        return NatsBackplane(settings.backplane, settings.backplane_prefix)
    from broadcaster.backplane.redis_broker import RedisBackplane

    return RedisBackplane(
        settings.backplane,
        settings.backplane_prefix,
        settings.history_messages,
        settings.history_ttl,
    )


def encode(node: bytes, payload: Payload) -> bytes:
    """Encode ``payload``, published on ``node``, for the broker."""
    if payload.json is not None:
        return MAGIC + node + b"j" + payload.json.encode()
    if isinstance(payload.raw, str):
        return MAGIC + node + b"t" + payload.raw.encode()
    return MAGIC + node + b"b" + payload.raw


def decode(message: bytes) -> tuple[bytes, Payload]:
    """Return the node that published ``message`` and its payload.

    Raises:
        ValueError: ``message`` was not encoded by :func:`encode`.
    """
    if len(message) < _HEADER or not message.startswith(MAGIC):
        raise ValueError("not a broadcaster message")
    node, kind, body = message[len(MAGIC) : _HEADER - 1], message[_HEADER - 1], message[_HEADER:]
    if kind == ord("b"):
        return node, Payload(body)
    text = body.decode()
    if kind == ord("t"):
        return node, Payload(text)
    if kind == ord("j"):
        # A JSON string reaches raw subscribers as the string itself, as on its own node.
        return node, Payload(json.loads(text) if text.startswith('"') else text, text)
    raise ValueError("unknown payload kind")


def decode_positioned(message: bytes) -> tuple[Position, bytes, Payload]:
    """Return the position the broker gave ``message``, the node and the payload.

    Raises:
        ValueError: ``message`` was not published with a position.
    """
    if not message.startswith(b"s"):
        raise ValueError("not a numbered broadcaster message")
    epoch, seq, rest = message[1:].split(b":", 2)
    node, payload = decode(rest)
    return Position(epoch.decode(), int(seq)), node, payload
