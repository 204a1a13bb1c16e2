"""The NATS backplane, through nats-py.

nats-py's own reconnection is off: when the connection is lost the client closes, the link's
messages end, and the bridge decides when and how to reconnect. nats-py delivers each
subscription's messages from a task of its own; they meet in one bounded stream.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING

import anyio
import nats
from nats.errors import Error as NatsError

from broadcaster.errors import BackplaneDown
from broadcaster.log import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

# Messages between nats-py's subscription tasks and the bridge's reader, which never waits.
LINK_BUFFER = 1024
# Seconds given to closing a connection; a dead server does not answer.
CLOSE_SECONDS = 1.0

logger = get_logger("broadcaster.backplane")


class NatsBackplane:
    """NATS core pub/sub, one subject ``PREFIX.TOPIC`` per topic.

    NATS splits subjects into tokens at ``.``, which topics may hold; a ``.`` in a topic is
    sent as ``%``, which topics never hold.

    Args:
        url: ``nats://HOST:PORT`` (or ``tls://``).
        prefix: the subjects' first token.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = prefix + "."

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[NatsLink]:
        """Open a link.

        Raises:
            BackplaneDown: the NATS server cannot be reached.
        """
        send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](LINK_BUFFER)

        async def lost() -> None:
            send.close()

        # Closed on every way out, a failed connect included.
        with send, receive:
            with _translated():
                client = await nats.connect(
                    self._url,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    disconnected_cb=lost,
                    closed_cb=lost,
                    error_cb=_log_error,
                )
            try:
                yield NatsLink(client, send, receive, self._prefix)
            finally:
                send.close()
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS):
                    with suppress(NatsError, OSError):
                        await client.close()


class NatsLink:
    """One link to NATS; see :class:`broadcaster.backplane.Link`."""

    def __init__(
        self,
        client: Client,
        send: MemoryObjectSendStream[tuple[str, bytes]],
        receive: MemoryObjectReceiveStream[tuple[str, bytes]],
        prefix: str,
    ) -> None:
        self._client = client
        self._send = send
        self._receive = receive
        self._prefix = prefix
        self._subscriptions: dict[str, Subscription] = {}

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield what the subscriptions received, until the connection is lost."""
        async for item in self._receive:
            yield item

    async def subscribe(self, topics: Sequence[str]) -> None:
        """Subscribe to each topic, then flush so that the server has them all."""
        with _translated():
            for topic in topics:
                self._subscriptions[topic] = await self._client.subscribe(
                    self._subject(topic), cb=partial(self._deliver, topic)
                )
            await self._client.flush()

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        """Drop each topic's subscription."""
        with _translated():
            for topic in topics:
                subscription = self._subscriptions.pop(topic, None)
                if subscription is not None:
                    await subscription.unsubscribe()

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish in order; nats-py writes them out from its buffer."""
        with _translated():
            for topic, message in messages:
                await self._client.publish(self._subject(topic), message)

    async def ping(self) -> None:
        """Flush, which waits for the server's PONG."""
        with _translated():
            await self._client.flush()

    async def _deliver(self, topic: str, message: Msg) -> None:
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._send.send((topic, message.data))

    def _subject(self, topic: str) -> str:
        return self._prefix + topic.replace(".", "%")


async def _log_error(error: Exception) -> None:
    logger.info("backplane_client_error", error=repr(error))


@contextmanager
def _translated() -> Iterator[None]:
    """Turn nats-py's and the socket's errors into :class:`BackplaneDown`."""
    try:
        yield
    except (NatsError, OSError, TimeoutError) as error:
        raise BackplaneDown(f"nats: {error!r}") from error
