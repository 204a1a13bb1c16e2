"""``POST /publish/{topic}`` and ``POST /publish``: HTTP publishes, from request to receipts.

:class:`HTTPPublish` answers a publish from the ASGI scope and receive channel alone, with no
per-request machinery: the app from ``create_app`` serves it before FastAPI's middleware and
router, and the FastAPI routes (which keep the endpoints in the OpenAPI schema, and serve
apps that mount the router themselves) call the same methods. Nothing is logged on success.

A batch (``POST /publish``) is a JSON array or JSON lines of items ``{"topic", "data"}`` or
``{"topics": [...], "data"}`` (a broadcast: the data is read once for all its topics).
The request as a whole is refused for its credential (401, 403), its size or message count
(413), its client's rate (429) or a stopped hub (503). Past that, items are independent: a
bad item, or a topic the token may not publish to, gets an error in its place among the
results, and every other item is still published, in order. Items are read with msgspec,
each one's data kept as the JSON text it was sent as: checked, never parsed into values nor
encoded again.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from starlette.responses import Response

from broadcaster.errors import (
    RETRY,
    SERVER_REFUSAL,
    BackplaneDown,
    HubBusy,
    HubStopped,
    ProtocolError,
    Refused,
)
from broadcaster.mailbox import PendingReceipt, Source
from broadcaster.policy import AddressLimiter
from broadcaster.protocol import (
    Payload,
    parse_json,
    parse_json_body,
    validate_topic,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from starlette.types import Receive, Scope, Send

    from broadcaster.auth import Authenticator, TopicPatterns
    from broadcaster.hub import Hub
    from broadcaster.mailbox import BatchResult
    from broadcaster.settings import Settings

JSON = "application/json"
JSON_BYTES = JSON.encode()
# A publisher that left before its body arrived; 499 as nginx logs it, never sent.
CLIENT_GONE = Refused(499, "client_disconnected", "the client left before its body arrived")
# The addresses whose batch rate is tracked, as for handshakes.
BATCH_ADDRESSES = 10_000
FORBIDDEN = ProtocolError("forbidden_topic", "the token does not allow publishing here")


class HTTPPublish:
    """Publishes HTTP request bodies through the hub and answers with their receipts.

    Args:
        hub: the running hub.
        auth: checks the request's bearer token against the topic.
        settings: the size limits (``MAX_MESSAGE_BYTES`` for a message, ``MAX_BATCH_*`` for
            a batch) and the batch rate per client address.
        count_refusal: counts and logs (at debug level) a refused request or batch item.
    """

    def __init__(
        self,
        hub: Hub,
        auth: Authenticator,
        settings: Settings,
        count_refusal: Callable[[Refused, str | None], None],
    ) -> None:
        self._hub = hub
        self._auth = auth
        self._max_body = settings.max_message_bytes
        self._max_batch_messages = settings.max_batch_messages
        self._batch_rate = AddressLimiter(settings.max_batch_messages_per_second, BATCH_ADDRESSES)
        self._count_refusal = count_refusal
        self._too_large = Refused(
            413, "body_too_large", f"the body is larger than {self._max_body} bytes"
        )
        self._batch_too_large = Refused(
            413, "body_too_large", f"the body is larger than {settings.max_batch_bytes} bytes"
        )
        self._max_batch_bytes = settings.max_batch_bytes
        # One batch at a time is read into items and handed to the hub: the hub fans them out
        # one after the other anyway, and the items of one batch, not of every batch
        # received, are in memory at once. Waiting for the broker's numbers comes after.
        self._one_batch = anyio.Lock()

    async def respond(self, topic: str, scope: Scope, receive: Receive) -> Response:
        """Publish the request's body to ``topic`` and return the response that answers it:
        200 with the receipt; 400, 401, 403, 413 or 503 with ``{"error": ..., "detail": ...}``
        (503 also when history is shared through a broker that is down)."""
        answer = await self._publish(topic, scope, receive)
        return answer if isinstance(answer, Response) else Response(answer, media_type=JSON)

    async def serve(self, topic: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a publish as :meth:`respond` does, sending a receipt's two ASGI messages
        straight away rather than through a :class:`Response`."""
        answer = await self._publish(topic, scope, receive)
        if isinstance(answer, Response):
            await answer(scope, receive, send)
            return
        headers = [(b"content-type", JSON_BYTES), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    async def _publish(self, topic: str, scope: Scope, receive: Receive) -> bytes | Response:
        """Publish the body; return the receipt's JSON, or the response that refuses it."""
        headers = dict(scope["headers"])
        try:
            # Before the body is read: an unauthenticated client gets nothing read for it.
            authorization = headers.get(b"authorization")
            self._auth.authorize_publish(
                authorization.decode("latin-1") if authorization else None, topic
            )
            try:
                validate_topic(topic)
            except ProtocolError as error:
                raise Refused(400, error.error, error.detail) from None
            body = await self._read_body(headers, receive, self._max_body, self._too_large)
        except Refused as refused:
            if refused is CLIENT_GONE and scope.get("extensions", {}).get(SERVER_REFUSAL):
                # The server cut the body off and counted that itself.
                return Response(status_code=refused.status)
            self._count_refusal(refused, _peer(scope))
            return _detail(refused.status, refused.error, refused.detail, refused.headers)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        try:
            payload = _payload(content_type, body)
            pending = self._hub.publish_nowait(topic, payload, Source.HTTP)
            receipt = await pending.wait()
        except ProtocolError as error:
            return _detail(400, error.error, f"the body is not valid JSON: {error.detail}")
        except HubBusy:
            return _detail(503, "hub_busy", "the hub is busy; retry shortly", RETRY)
        except HubStopped:
            return _detail(503, "hub_stopped", "the hub is not running", RETRY)
        except BackplaneDown as error:
            # History is shared and the broker that numbers it is down: no node may number
            # this publish on its own.
            self._count_refusal(Refused(503, "backplane_down", str(error)), _peer(scope))
            return _detail(503, "backplane_down", str(error), RETRY)
        # Topics match TOPIC_PATTERN, so they need no JSON escaping.
        return (
            f'{{"topic":"{receipt.topic}","epoch":{json.dumps(receipt.epoch)},'
            f'"seq":{receipt.seq},"subscribers":{receipt.subscribers}}}'
        ).encode()

    async def respond_batch(self, scope: Scope, receive: Receive) -> Response:
        """Publish a batch and return the response that answers it: 200 with one result per
        item and topic, in order (a receipt, or the error that refused that item or topic);
        401, 403, 400, 413, 429 or 503 with ``{"error": ..., "detail": ...}`` for the request as
        a whole."""
        client = scope.get("client")
        peer = _peer(scope)
        headers = dict(scope["headers"])
        try:
            authorization = headers.get(b"authorization")
            allowed = self._auth.publish_topics(
                authorization.decode("latin-1") if authorization else None
            )
            body = await self._read_body(
                headers, receive, self._max_batch_bytes, self._batch_too_large
            )
            async with self._one_batch:
                places, outcomes = await self._take(body, allowed, client[0] if client else "")
            results, failed = await self._results(places, outcomes, peer)
        except Refused as refused:
            if refused is CLIENT_GONE and scope.get("extensions", {}).get(SERVER_REFUSAL):
                return Response(status_code=refused.status)
            self._count_refusal(refused, peer)
            return _detail(refused.status, refused.error, refused.detail, refused.headers)
        answer = _Answer(len(results) - failed, failed, results)
        return Response(_ENCODER.encode(answer), media_type=JSON)

    async def _take(
        self, body: bytes, allowed: TopicPatterns, address: str
    ) -> tuple[list[_Place], list[BatchResult | None]]:
        """Read a batch, check its message count and its client's rate, and hand every valid
        item, for each of its topics, to the hub; return each message's place among the results
        and what became of those the hub took, in order.

        The allowed messages go to the hub together (:meth:`Hub.publish_batch`), so that it
        fans them out in a few commands rather than one per message.

        Raises:
            Refused: 413 too many messages, 429 over the rate, or 503 when the hub is not
                running; nothing is published then.
        """
        places: list[_Place] = []
        messages: list[tuple[str, Payload]] = []
        everything = allowed.everything
        for index, item in enumerate(_batch_items(body, self._max_body)):
            if isinstance(item, ProtocolError):
                places.append((index, None, item))
                continue
            topics, payload = item
            for topic in topics:
                if everything or allowed.matches(topic):
                    messages.append((topic, payload))
                    places.append((index, topic, None))
                else:
                    places.append((index, topic, FORBIDDEN))
        # One place per message: each topic of an item counts, and so does an item refused.
        count = len(places)
        if count > self._max_batch_messages:
            raise Refused(
                413,
                "too_many_messages",
                f"the batch has {count} messages; at most {self._max_batch_messages}",
            )
        if not self._batch_rate.allow(address, time.monotonic(), count):
            raise Refused(429, "rate_limited", "too many batched messages; retry shortly", RETRY)
        try:
            return places, await self._hub.publish_batch(messages, Source.HTTP)
        except HubStopped:
            raise Refused(503, "hub_stopped", "the hub is not running", RETRY) from None

    async def _results(
        self, places: list[_Place], outcomes: list[BatchResult | None], peer: str | None
    ) -> tuple[list[_Published | _Unpublished], int]:
        """Return the results in order, once the broker has numbered the messages it numbers
        (with history shared through it), and how many of them are refusals."""
        taken = iter(outcomes)
        results: list[_Published | _Unpublished] = []
        failed = 0
        for index, name, refusal in places:
            if refusal is None:
                outcome = next(taken)
                if isinstance(outcome, PendingReceipt):
                    outcome = await _numbered(outcome)
                if isinstance(outcome, tuple):
                    assert name is not None  # a message published has its topic
                    results.append(_Published(index, name, *outcome))
                    continue
                refusal = (
                    ProtocolError("hub_stopped", "the hub stopped")
                    if outcome is None
                    else ProtocolError("backplane_down", str(outcome))
                )
            failed += 1
            results.append(self._refusal(index, name, refusal, peer))
        return results, failed

    def _refusal(
        self, index: int, topic: str | None, refusal: ProtocolError, peer: str | None
    ) -> _Unpublished:
        """Count a refused message and return its result."""
        self._count_refusal(Refused(400, refusal.error, refusal.detail), peer)
        return _Unpublished(refusal.error, refusal.detail, index, topic)

    async def _read_body(
        self, headers: dict[bytes, bytes], receive: Receive, limit: int, too_large: Refused
    ) -> bytes:
        """Read the body, up to ``limit`` bytes.

        Raises:
            Refused: ``too_large``; :data:`CLIENT_GONE` when the client leaves.
        """
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise CLIENT_GONE
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_large
            if not message.get("more_body", False):
                return bytes(body)


# A valid batch item: its topics and its payload, made once for all of them.
_Item = tuple[tuple[str, ...], Payload]
# A message's place among a batch's results: its item, its topic (None for an item refused as
# a whole), and the error that refused it (None for a message handed to the hub).
_Place = tuple[int, str | None, ProtocolError | None]


class _SentItem(msgspec.Struct):
    """A batch item as read: ``data`` is the JSON text of its data, exactly as sent (empty when
    the item has none); ``UNSET`` marks a field the item does not have."""

    topic: Any = msgspec.UNSET
    topics: Any = msgspec.UNSET
    data: msgspec.Raw = msgspec.Raw()


class _Published(msgspec.Struct, gc=False):
    """A batch's result for a message published: its item, topic and receipt."""

    item: int
    topic: str
    epoch: str
    seq: int
    subscribers: int


class _Unpublished(msgspec.Struct, gc=False):
    """A batch's result for a message refused: why, and its item and topic (``None`` when the
    item was refused as a whole)."""

    error: str
    detail: str
    item: int
    topic: str | None


class _Answer(msgspec.Struct, gc=False):
    """The answer to a batch."""

    published: int
    failed: int
    results: list[_Published | _Unpublished]


# Made once, like protocol's JSON decoder.
_ENCODER = msgspec.json.Encoder()
_ITEMS = msgspec.json.Decoder(list[_SentItem])
_ITEM = msgspec.json.Decoder(_SentItem)
_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
# Data longer than this may hold an integer of more digits than Python's json module reads by
# default, which clients such as broadcaster.client could not read: it is parsed, to be refused
# as a single publish of it is.
LONGEST_UNCHECKED = sys.int_info.default_max_str_digits
NOT_AN_ITEM = ProtocolError(
    "invalid_item", 'an item is an object with "topic" (or "topics") and "data"'
)


def _batch_items(body: bytes, max_message_bytes: int) -> list[_Item | ProtocolError]:
    """Read a batch: a JSON array of items, or JSON lines (one item a line, blank lines
    skipped). A line or item that cannot be read becomes the error that says why.

    Raises:
        Refused: 400 ``invalid_batch``: an array that does not parse, or no items at all.
    """
    text = body.lstrip()
    sent = (
        _read_array(text)
        if text.startswith(b"[")
        else [_read_item(line) for line in text.splitlines() if line.strip()]
    )
    if not sent:
        raise Refused(400, "invalid_batch", "the batch has no items")
    # Batches tend to name a few topics many times: each name is checked once.
    checked: set[str] = set()
    return [
        item if isinstance(item, ProtocolError) else _item(item, max_message_bytes, checked)
        for item in sent
    ]


def _read_array(text: bytes) -> Sequence[_SentItem | ProtocolError]:
    """Read a JSON array of items in one pass. When some item is not an object, each item is
    read alone; when msgspec cannot read the array (a ``\\u`` escape of half a surrogate
    pair, or it is not JSON), the json module reads it, so that only the items at fault are
    refused.

    Raises:
        Refused: 400 ``invalid_batch``: the body is not a JSON array.
    """
    try:
        try:
            return _ITEMS.decode(text)
        except msgspec.ValidationError:
            return [_read_item(raw) for raw in _RAWS.decode(text)]
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        values: list[Any] = parse_json(text)
    except ProtocolError as error:
        detail = f"the body is not a JSON array: {error.detail}"
        raise Refused(400, "invalid_batch", detail) from None
    return [_reread(value) for value in values]


def _reread(value: Any) -> _SentItem | ProtocolError:
    """Read one item of an array the json module parsed, from its compact JSON text."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as error:  # a lone surrogate
        return ProtocolError("invalid_json", str(error))
    return _read_item(text)


def _read_item(text: bytes | msgspec.Raw) -> _SentItem | ProtocolError:
    """Read one item from its JSON text."""
    try:
        return _ITEM.decode(text)
    except msgspec.ValidationError:
        return NOT_AN_ITEM
    except msgspec.DecodeError as error:
        return ProtocolError("invalid_json", str(error))
    except RecursionError:
        return ProtocolError("invalid_json", "nested too deeply")


def _item(item: _SentItem, max_message_bytes: int, checked: set[str]) -> _Item | ProtocolError:
    """Check one batch item: its topics (unless in ``checked``, the valid names seen so far),
    and data within the size limit, measured as sent."""
    if not item.data:
        return NOT_AN_ITEM
    if (item.topic is msgspec.UNSET) == (item.topics is msgspec.UNSET):
        return ProtocolError("invalid_item", 'an item has "topic" or "topics", not both')
    try:
        if item.topics is msgspec.UNSET:
            topics: tuple[str, ...] = (_topic(item.topic, checked),)
        else:
            names = item.topics
            if not isinstance(names, list) or not names:
                return ProtocolError("invalid_item", '"topics" is a non-empty list of topic names')
            topics = tuple(_topic(name, checked) for name in names)
            if len(set(topics)) != len(topics):
                return ProtocolError("invalid_item", '"topics" names each topic once')
    except ProtocolError as error:
        return error
    if len(item.data) > max_message_bytes:
        detail = f"the data is larger than {max_message_bytes} bytes"
        return ProtocolError("message_too_big", detail)
    try:
        # msgspec checks the strings it reads, but not that raw data is UTF-8.
        text = str(item.data, "utf-8")
    except UnicodeDecodeError as error:
        return ProtocolError("invalid_json", str(error))
    if len(text) > LONGEST_UNCHECKED:
        try:
            parse_json(text)
        except ProtocolError as error:
            return error
    return topics, Payload.from_json(text)


def _topic(name: object, checked: set[str]) -> str:
    """Return ``name`` if it is a valid topic name, and add it to ``checked``.

    Raises:
        ProtocolError: ``invalid_topic``.
    """
    if isinstance(name, str) and name in checked:
        return name
    topic = validate_topic(name)
    checked.add(topic)
    return topic


async def _numbered(pending: PendingReceipt) -> tuple[str, int, int] | BackplaneDown | None:
    """The epoch, seq and subscriber count the broker gave a batched message; the refusal when
    the broker was down, or ``None`` when the hub stopped first."""
    try:
        receipt = await pending.wait()
    except BackplaneDown as error:
        return error
    except HubStopped:
        return None
    return receipt.epoch, receipt.seq, receipt.subscribers


def _peer(scope: Scope) -> str | None:
    """The client's ``host:port``, for the log line of a refusal."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _payload(content_type: str, body: bytes) -> Payload:
    """The payload a body makes, by its media type: JSON parsed, octets as bytes, else text
    (bytes if it is not UTF-8).

    Raises:
        ProtocolError: ``application/json`` that does not parse.
    """
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == JSON:
        return parse_json_body(body)
    if media_type == "application/octet-stream":
        return Payload(body)
    try:
        return Payload(body.decode())
    except UnicodeDecodeError:
        return Payload(body)


def _detail(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps({"error": error, "detail": detail}, separators=(",", ":"))
    return Response(body, status, headers=headers, media_type=JSON)
