"""The Redis pub/sub backplane, through redis-py's asyncio client.

A link holds two connections: one in subscriber mode that reads every message and the broker's
confirmations, and one that publishes (pipelined, in order) and pings. redis-py's own retries
are off: the bridge decides when and how to reconnect.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager, suppress
from typing import TYPE_CHECKING, cast

import anyio
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from broadcaster.errors import BackplaneDown

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence

    from redis.asyncio.client import PubSub

# Seconds given to closing a link's connections; a dead broker does not answer.
CLOSE_SECONDS = 1.0


class RedisBackplane:
    """Redis pub/sub, one channel ``PREFIX:TOPIC`` per topic.

    Args:
        url: ``redis://HOST:PORT[/DB]`` (or ``rediss://`` for TLS).
        prefix: the channels' namespace.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = prefix + ":"

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[RedisLink]:
        """Open a link: both connections, proven by a ping each.

        Raises:
            BackplaneDown: Redis cannot be reached.
        """
        client = Redis.from_url(self._url, retry=Retry(NoBackoff(), 0))
        pubsub = client.pubsub()
        try:
            with _translated():
                await _ping(client)
                # Connect now, so that messages() can read before the first subscription.
                await pubsub.connect()  # type: ignore[no-untyped-call]
            yield RedisLink(client, pubsub, self._prefix)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS):
                with suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with suppress(RedisError, OSError):
                    await client.aclose()


class RedisLink:
    """One link to Redis; see :class:`broadcaster.backplane.Link`."""

    def __init__(self, client: Redis, pubsub: PubSub, prefix: str) -> None:
        self._client = client
        self._pubsub = pubsub
        self._prefix = prefix
        # Subscriptions sent and not yet confirmed, by channel.
        self._pending: dict[bytes, anyio.Event] = {}

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield what arrives on subscribed channels; note the broker's confirmations."""
        start = len(self._prefix)
        while True:
            with _translated():
                message = await self._pubsub.get_message(timeout=None)
            if message is None:
                continue  # redis-py's own health-check answers
            channel: bytes = message["channel"]
            if message["type"] == "message":
                yield channel[start:].decode(), message["data"]
            elif message["type"] == "subscribe" and channel in self._pending:
                self._pending.pop(channel).set()

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe to every topic's channel in one command; wait for each confirmation."""
        channels = [self._channel(topic) for topic in topics]
        confirmed = [self._pending.setdefault(channel, anyio.Event()) for channel in channels]
        with _translated():
            await self._pubsub.subscribe(*channels)
        for event in confirmed:
            await event.wait()

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Unsubscribe from every topic's channel in one command."""
        with _translated():
            await self._pubsub.unsubscribe(*[self._channel(topic) for topic in topics])

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish the messages in one pipeline, which keeps their order."""
        with _translated():
            async with self._client.pipeline(transaction=False) as pipe:
                for topic, message in messages:
                    pipe.publish(self._channel(topic), message)
                await pipe.execute()

    async def ping(self) -> None:
        """Ping over the publishing connection."""
        with _translated():
            await _ping(self._client)

    def _channel(self, topic: str) -> bytes:
        return (self._prefix + topic).encode()


async def _ping(client: Redis) -> None:
    # redis-py types ping() for its blocking and asyncio clients at once.
    await cast("Awaitable[bool]", client.ping())


@contextmanager
def _translated() -> Iterator[None]:
    """Turn redis-py's and the socket's errors into :class:`BackplaneDown`."""
    try:
        yield
    except (RedisError, OSError) as error:
        raise BackplaneDown(f"redis: {error}") from error
