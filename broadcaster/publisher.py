"""Publishers for Python services: over HTTP, batching under load, or over WebSocket, with acks.

Needs the ``client`` extra (httpx; websockets for :class:`WSPublisher`)::

    from broadcaster.client import HTTPPublisher

    async with HTTPPublisher("http://127.0.0.1:8000", token=TOKEN) as publisher:
        receipt = await publisher.publish("news", {"headline": "..."})
        print(receipt.topic, receipt.epoch, receipt.seq)
        receipts = await publisher.broadcast(["user.1", "user.2"], {"notice": "..."})

:class:`HTTPPublisher` keeps one keep-alive connection and one request in flight. A publish
made while the connection is idle goes out at once as ``POST /publish/{topic}``; publishes
made while a request is in flight wait for it and then go out together as one
``POST /publish`` batch, so a busy publisher sends few large requests and a quiet one adds no
delay. Messages reach the server in the order they were published. A 503 or 429 is retried
after its ``Retry-After``.

:class:`WSPublisher` publishes on one ``/ws`` connection with an ``id`` per message, and the
server acks each with its position: the fastest way for a service to publish and know.

Both answer each message with a :class:`Receipt` and raise :class:`PublishError` for a
message the server refused. This module speaks the wire protocol only; it imports nothing of
the server.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

    from websockets.asyncio.client import ClientConnection
    from websockets.exceptions import ConnectionClosed

__all__ = ["HTTPPublisher", "PublishError", "Receipt", "WSPublisher", "publish_once"]

# Longest wait honoured from a Retry-After header, whatever the server says.
MAX_RETRY_AFTER = 30.0
# Wait used when a 503 or 429 carries no readable Retry-After header.
DEFAULT_RETRY_AFTER = 1.0
# Statuses after which the same request may succeed: the hub was busy, the rate was exceeded.
RETRIED = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a published message went: its topic's ``epoch`` and the ``seq`` it was given.

    ``subscribers`` is how many subscribers it was offered to, over HTTP; a WebSocket ack
    does not say (``None``).
    """

    topic: str
    epoch: str
    seq: int
    subscribers: int | None = None


class PublishError(Exception):
    """The server refused a message or a request.

    Args:
        error: the server's code (``forbidden_topic``, ``rate_limited``...), or the HTTP
            reason when it gave none.
        detail: the server's explanation.
        status: the HTTP status of a refused request; ``None`` for one message of a batch or
            an error frame.
        retry_after: seconds the server asked to wait, when it did.
        receipts: for a broadcast, the topics that did get the message.
    """

    def __init__(
        self,
        error: str,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        receipts: tuple[Receipt, ...] = (),
    ) -> None:
        super().__init__(f"{status or ''} {error}: {detail}".strip())
        self.error = error
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        self.receipts = receipts


def retry_after(response: httpx.Response) -> float:
    """Seconds to wait before retrying, from ``Retry-After`` (seconds or an HTTP date)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _refusal(response: httpx.Response) -> PublishError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    error = body.get("error") if isinstance(body, dict) else None
    wait = retry_after(response) if response.status_code in RETRIED else None
    return PublishError(
        str(error or response.reason_phrase),
        str(detail or response.text),
        status=response.status_code,
        retry_after=wait,
    )


async def publish_once(
    http: httpx.AsyncClient, topic: str, data: Any, base_url: str = ""
) -> Receipt:
    """``POST /publish/{topic}`` one JSON value with ``http``, once, without retrying.

    Args:
        base_url: the server's base URL; by default the client's own ``base_url``.

    Raises:
        PublishError: the server refused it (``retry_after`` set for 503 and 429).
        httpx.HTTPError: the server could not be reached.
    """
    path = f"{base_url}/publish/{topic}"
    return _receipt(await http.post(path, content=_dumps(data), headers=_JSON))


def _receipt(response: httpx.Response) -> Receipt:
    if response.status_code != 200:
        raise _refusal(response)
    body = response.json()
    return Receipt(body["topic"], body["epoch"], body["seq"], body["subscribers"])


_JSON = {"content-type": "application/json"}


@dataclass(slots=True)
class _Item:
    """A publish waiting for its request: its topics, its batch item's JSON text, and the
    future its receipts go to."""

    topics: tuple[str, ...]
    data: str
    text: str
    done: asyncio.Future[list[Receipt]] = field(repr=False)


class HTTPPublisher:
    """Publish over HTTP, batching what is published while a request is in flight.

    Args:
        url: the server's base URL, ``http://host:port`` (and any mount prefix).
        token: a publish token or JWT, sent as a bearer token.
        max_batch: messages in one ``POST /publish``, each topic of a broadcast counting
            as one; at most the server's ``BROADCASTER_MAX_BATCH_MESSAGES``.
        max_batch_bytes: bytes of one batch's body; at most ``BROADCASTER_MAX_BATCH_BYTES``.
        retries: times a request answered 503 or 429 is sent again, after its
            ``Retry-After``; then its messages fail with :class:`PublishError`.
        options: passed to :class:`httpx.AsyncClient` (``timeout``, ``transport``,
            ``trust_env``...).

    Use it as an async context manager: leaving it sends what is queued, then closes the
    connection.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_batch: int = 1000,
        max_batch_bytes: int = 512 * 1024,
        retries: int = 5,
        **options: Any,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=url, headers=headers, **options)
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._retries = retries
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: asyncio.TaskGroup | None = None
        self.requests = 0

    async def __aenter__(self) -> HTTPPublisher:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._tasks.create_task(self._send_loop())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
        try:
            assert self._tasks is not None
            await self._tasks.__aexit__(kind, error, traceback)
        finally:
            await self._http.aclose()

    async def publish(self, topic: str, data: Any) -> Receipt:
        """Publish a JSON value to ``topic`` and return its receipt.

        Raises:
            PublishError: the server refused it.
            httpx.HTTPError: the server could not be reached.
        """
        return (await self._enqueue((topic,), data))[0]

    async def broadcast(self, topics: Iterable[str], data: Any) -> list[Receipt]:
        """Publish one JSON value to every topic of ``topics`` (encoded once, one batch item)
        and return a receipt per topic, in order.

        Raises:
            PublishError: the server refused it for some topic; ``receipts`` holds the
                topics that got it.
            httpx.HTTPError: the server could not be reached.
        """
        return await self._enqueue(tuple(topics), data)

    async def _enqueue(self, topics: tuple[str, ...], data: Any) -> list[Receipt]:
        if self._tasks is None or self._closing:
            raise RuntimeError("use the publisher in 'async with', and not after it")
        data_text = _dumps(data)
        named = {"topic": topics[0]} if len(topics) == 1 else {"topics": topics}
        text = _dumps(named)[:-1] + ',"data":' + data_text + "}"
        item = _Item(topics, data_text, text, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._wake.set()
        return await item.done

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take()
                try:
                    await self._send(batch)
                except (httpx.HTTPError, PublishError) as error:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(error)
            if self._closing:
                return

    def _take(self) -> list[_Item]:
        """Take the queued items that fit one request: at least one."""
        batch = [self._queue.popleft()]
        messages, size = len(batch[0].topics), len(batch[0].text)
        while self._queue:
            item = self._queue[0]
            messages += len(item.topics)
            size += len(item.text) + 1
            if messages > self._max_batch or size > self._max_batch_bytes:
                break
            batch.append(self._queue.popleft())
        return batch

    async def _send(self, batch: list[_Item]) -> None:
        """Send one request for ``batch`` and settle each item's future.

        Raises:
            PublishError: the request as a whole was refused.
            httpx.HTTPError: the server could not be reached.
        """
        if len(batch) == 1 and len(batch[0].topics) == 1:
            item = batch[0]
            response = await self._post(f"/publish/{item.topics[0]}", item.data)
            item.done.set_result([_receipt(response)])
            return
        response = await self._post("/publish", "[" + ",".join(i.text for i in batch) + "]")
        if response.status_code != 200:
            raise _refusal(response)
        results: list[list[dict[str, Any]]] = [[] for _ in batch]
        for result in response.json()["results"]:
            results[result["item"]].append(result)
        for item, outcomes in zip(batch, results, strict=True):
            receipts = tuple(
                Receipt(r["topic"], r["epoch"], r["seq"], r["subscribers"])
                for r in outcomes
                if "error" not in r
            )
            refused = next((r for r in outcomes if "error" in r), None)
            if refused is None:
                item.done.set_result(list(receipts))
            else:
                error = PublishError(refused["error"], refused["detail"], receipts=receipts)
                item.done.set_exception(error)

    async def _post(self, path: str, body: str) -> httpx.Response:
        """POST ``body``, sending it again after a 503 or 429's ``Retry-After``."""
        for attempt in itertools.count():
            self.requests += 1
            response = await self._http.post(path, content=body, headers=_JSON)
            if response.status_code not in RETRIED or attempt >= self._retries:
                return response
            await asyncio.sleep(retry_after(response))
        raise AssertionError("unreachable")  # pragma: no cover


class WSPublisher:
    """Publish over one multiplexed WebSocket connection, each message acked with its position.

    Args:
        url: ``ws://host:port/ws`` (or ``wss://``).
        token: a publish token or JWT, sent as a bearer token.
        options: passed to ``websockets.asyncio.client.connect``.

    Use it as an async context manager. Publishes may overlap: each waits for its own ack.
    When the connection is lost, the publishes waiting for an ack fail with
    :class:`PublishError` ``connection_closed`` (the server may or may not have published
    them); the publisher does not reconnect.
    """

    def __init__(self, url: str, *, token: str | None = None, **options: Any) -> None:
        self.url = url
        options.setdefault("proxy", None)
        if token:
            options.setdefault("additional_headers", {"authorization": f"Bearer {token}"})
        self._options = options
        self._websocket: ClientConnection | None = None
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[str, asyncio.Future[Receipt]]] = {}
        self._closed: PublishError | None = None
        self._tasks: asyncio.TaskGroup | None = None

    async def __aenter__(self) -> WSPublisher:
        # Imported here: the HTTP publisher, which the stress tool uses, needs no websockets.
        from websockets.asyncio.client import connect

        self._websocket = await connect(self.url, **self._options)
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._tasks.create_task(self._read_loop(self._websocket))
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._websocket is not None
        assert self._tasks is not None
        await self._websocket.close()
        await self._tasks.__aexit__(kind, error, traceback)

    async def publish(self, topic: str, data: Any) -> Receipt:
        """Publish a JSON value to ``topic`` and wait for its ack.

        Raises:
            PublishError: the server refused it, or the connection was lost first.
        """
        return await self._send(topic, data)

    async def publish_unacked(self, topic: str, data: Any) -> None:
        """Publish a JSON value to ``topic`` without asking for an ack: the cheapest publish,
        whose refusal (if any) is not reported.

        Raises:
            PublishError: the connection is lost.
        """
        await self._write(_dumps({"op": "publish", "topic": topic, "data": data}))

    async def broadcast(self, topics: Iterable[str], data: Any) -> list[Receipt]:
        """Publish one JSON value to each of ``topics``; return their receipts in order.

        Raises:
            PublishError: the server refused it for a topic, or the connection was lost.
        """
        return list(await asyncio.gather(*(self._send(topic, data) for topic in topics)))

    async def _send(self, topic: str, data: Any) -> Receipt:
        ack = next(self._ids)
        done: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._waiting[ack] = (topic, done)
        try:
            await self._write(_dumps({"op": "publish", "topic": topic, "data": data, "id": ack}))
            return await done
        finally:
            self._waiting.pop(ack, None)

    async def _write(self, frame: str) -> None:
        if self._closed is not None:
            raise self._closed
        if self._websocket is None:
            raise RuntimeError("use the publisher in 'async with'")
        from websockets.exceptions import ConnectionClosed

        try:
            await self._websocket.send(frame)
        except ConnectionClosed as closed:
            raise _lost(closed) from None

    async def _read_loop(self, websocket: ClientConnection) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in websocket:
                answer = json.loads(frame)
                if not isinstance(answer, dict) or answer.get("id") not in self._waiting:
                    continue  # an error for an unacked publish, or a message
                _, done = self._waiting.pop(answer["id"])
                if answer.get("op") == "ack":
                    done.set_result(Receipt(answer["topic"], answer["epoch"], answer["seq"]))
                else:
                    done.set_exception(PublishError(answer["error"], answer["detail"]))
        except ConnectionClosed as closed:
            self._closed = _lost(closed)
        else:
            self._closed = PublishError("connection_closed", "the connection was closed")
        for _, done in self._waiting.values():
            if not done.done():
                done.set_exception(self._closed)


def _lost(closed: ConnectionClosed) -> PublishError:
    code = closed.rcvd.code if closed.rcvd else None
    reason = closed.rcvd.reason if closed.rcvd else "no close frame"
    return PublishError("connection_closed", f"the connection was closed ({code} {reason})")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
