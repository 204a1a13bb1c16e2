"""The Redis pub/sub backplane, through redis-py's asyncio client.

A link holds two connections: one in subscriber mode that reads every message and the broker's
confirmations, and one that publishes (pipelined, in order) and pings. redis-py's own retries
are off: the bridge decides when and how to reconnect.

With history on, each topic's stream lives in Redis, shared by every node (Centrifugo's Redis
engine is the model). Per topic, a hash ``PREFIX|meta|TOPIC`` holds the ``epoch`` and the
last ``seq``, one key so that both expire together, and a stream ``PREFIX|stream|TOPIC`` holds
the messages under the ids ``0-SEQ``. :data:`APPEND` gives a publish its position, appends it
and publishes it in one atomic step, so pub/sub order is seq order on every node;
:data:`READ` reads a topic's position and entries in one atomic step too. An epoch is made
by the node that finds none (``HSETNX``): every node then agrees on it, and it changes only
when Redis lost the keys (a restart without persistence, an eviction, ``HISTORY_TTL``).
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import TYPE_CHECKING, cast

import anyio
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from broadcaster.backplane.shared import Slice
from broadcaster.errors import BackplaneDown
from broadcaster.protocol import Position

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence

    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

# Seconds given to closing a link's connections; a dead broker does not answer.
CLOSE_SECONDS = 1.0

# KEYS: meta, stream. ARGV: a new epoch (used if the topic has none), HISTORY_SIZE,
# HISTORY_TTL in ms, the channel, the message. Publishes "s EPOCH:SEQ:MESSAGE" (no space).
APPEND = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. seq, 'm', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', ARGV[4], 's' .. epoch .. ':' .. seq .. ':' .. ARGV[5])
return {epoch, seq}
"""

# KEYS: meta, stream. ARGV: a new epoch, HISTORY_TTL in ms, the start (a seq, or -K for
# the latest K), the most entries to return. Returns {epoch, seq, {{id, {field, message}}}}.
READ = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local start = tonumber(ARGV[3])
if start <= 0 then
  start = seq + start + 1
end
if start < 1 then
  start = 1
end
local entries = {}
if tonumber(ARGV[4]) > 0 and start <= seq then
  entries = redis.call('XRANGE', KEYS[2], '0-' .. start, '+', 'COUNT', ARGV[4])
end
return {epoch, seq, entries}
"""


class RedisBackplane:
    """Redis pub/sub, one channel ``PREFIX:TOPIC`` per topic.

    Args:
        url: ``redis://HOST:PORT[/DB]`` (or ``rediss://`` for TLS).
        prefix: the channels' (and history keys') namespace.
        history_size: messages kept per topic's stream (``MAXLEN ~``).
        history_ttl: seconds after a topic's last publish when Redis forgets its stream.
    """

    def __init__(
        self, url: str, prefix: str, history_size: int = 0, history_ttl: float = 120.0
    ) -> None:
        self._url = url
        self._prefix = prefix + ":"
        self._history_size = history_size
        self._ttl_ms = max(1, round(history_ttl * 1000))

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
            link = RedisLink(client, pubsub, self._prefix)
            link.history(self._history_size, self._ttl_ms)
            yield link
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
        self._append: AsyncScript = client.register_script(APPEND)
        self._read: AsyncScript = client.register_script(READ)
        self._size = 0
        self._ttl_ms = 1

    def history(self, size: int, ttl_ms: int) -> None:
        """Keep ``size`` messages per topic's stream, for ``ttl_ms`` after its last publish."""
        self._size = size
        self._ttl_ms = ttl_ms

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

    async def append(self, messages: Sequence[tuple[str, bytes]]) -> list[Position]:
        """Number, keep and publish each ``(topic, message)`` in order (one pipeline, one
        atomic script each); return the positions given."""
        epoch = secrets.token_hex(6)
        with _translated():
            async with self._client.pipeline(transaction=False) as pipe:
                for topic, message in messages:
                    keys = [self._key("meta", topic), self._key("stream", topic)]
                    args: list[bytes | str | int] = [
                        epoch,
                        self._size,
                        self._ttl_ms,
                        self._channel(topic),
                        message,
                    ]
                    await self._append(keys, args, client=pipe)
                replies = await pipe.execute()
        return [Position(reply[0].decode(), int(reply[1])) for reply in replies]

    async def read(self, topic: str, start: int, count: int) -> Slice:
        """Read ``topic``'s position and up to ``count`` entries from ``start`` on (a seq, or
        ``-K`` for the latest K) in one atomic step."""
        keys = [self._key("meta", topic), self._key("stream", topic)]
        args: list[bytes | str | int] = [secrets.token_hex(6), self._ttl_ms, start, count]
        with _translated():
            reply = await self._read(keys, args)
        entries = [(int(ident.split(b"-")[1]), fields[1]) for ident, fields in reply[2]]
        return Slice(reply[0].decode(), int(reply[1]), entries)

    async def ping(self) -> None:
        """Ping over the publishing connection."""
        with _translated():
            await _ping(self._client)

    def _channel(self, topic: str) -> bytes:
        return (self._prefix + topic).encode()

    def _key(self, kind: str, topic: str) -> str:
        # "|" is in no topic name, so these never meet a channel or each other.
        return f"{self._prefix[:-1]}|{kind}|{topic}"


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
