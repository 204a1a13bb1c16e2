"""The wire: parsing client frames and encoding server frames. No I/O.

Multiplexed mode speaks JSON text frames (see docs/protocol.md); raw mode
passes frames through verbatim. Every parse failure is a :class:`ProtocolError` whose
``error`` code clients can match on.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from broadcaster.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping

TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# The longest epoch a client may send back; the server's are much shorter.
MAX_EPOCH_LENGTH = 64
# The longest string a publish's ``id`` may be.
MAX_ACK_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Frame:
    """One server frame, encoded once and shared by every connection it is sent to.

    Args:
        data: the message, for servers that take messages (plain ASGI).
        wire: the whole WebSocket frame as it goes on the wire, for the fastlane that writes
            straight to the transport; its length is what outboxes count.
        control: a control frame (``subscribed``, ``pong``, ``error``...), which the overflow
            policy never drops.
        born: when it was encoded (``time.monotonic()``), to tell how long it has waited.
    """

    data: str | bytes
    wire: bytes = field(repr=False)
    control: bool = False
    born: float = field(default_factory=time.monotonic, compare=False)

    @classmethod
    def of(cls, data: str | bytes, *, control: bool = False) -> Frame:
        """Encode ``data`` as one unmasked, final, uncompressed text or binary frame."""
        if isinstance(data, str):
            return cls(data, _encode_frame(OPCODE_TEXT, data.encode()), control)
        return cls(data, _encode_frame(OPCODE_BINARY, data), control)

    @property
    def size(self) -> int:
        """Bytes the frame takes on the wire."""
        return len(self.wire)


OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
_FIN = 0x80


def _encode_frame(opcode: int, payload: bytes) -> bytes:
    # RFC 6455 section 5.2; a server never masks.
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _FIN | opcode, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", _FIN | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, length)
    return header + payload


class Mode(Enum):
    """How a connection speaks: raw frames on one topic, or JSON envelopes on many."""

    RAW = "raw"
    MUX = "mux"


@dataclass(frozen=True, slots=True)
class Payload:
    """A published message, in the forms its subscribers receive.

    Args:
        raw: the frame raw-mode subscribers receive, text or bytes.
        json: the JSON text of the data when it was published as JSON; otherwise the
            envelope's ``data`` is derived from ``raw``.
    """

    raw: str | bytes
    json: str | None = None

    def envelope(self, topic: str, seq: int) -> Frame:
        """Encode the multiplexed-mode frame for this payload (once per publish)."""
        if self.json is not None:
            data = self.json
        elif isinstance(self.raw, str):
            data = _dumps(self.raw)
        else:
            data = '"' + base64.b64encode(self.raw).decode("ascii") + '","encoding":"base64"'
        # Topics are validated against TOPIC_PATTERN, so they need no JSON escaping.
        return Frame.of('{"topic":"' + topic + '","seq":' + str(seq) + ',"data":' + data + "}")

    @classmethod
    def from_data(cls, data: Any) -> Payload:
        """Build the payload of a JSON value: strings reach raw subscribers as themselves.

        Raises:
            ValueError: ``data`` has no JSON text that can be sent: NaN, infinities, or
                strings that are not valid Unicode (lone surrogates).
            RecursionError: ``data`` is nested too deeply to encode.
        """
        text = _dumps(data)
        if not text.isascii():
            text.encode()  # raises UnicodeEncodeError on a lone surrogate
        # Positional: a frozen dataclass takes keywords at twice the cost.
        return cls(data if isinstance(data, str) else text, text)

    @classmethod
    def from_json(cls, text: str) -> Payload:
        """Build the payload of one JSON value's text, already checked to be valid JSON; it is
        sent on as it is spelled. A string reaches raw subscribers as itself."""
        # Positional: a frozen dataclass takes keywords at twice the cost.
        return cls(_DECODER.decode(text) if text.startswith('"') else text, text)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in a topic's stream: the last ``seq`` it has in ``epoch``."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe this connection to ``topic``.

    Args:
        since: resume: replay what was published after this position, then live messages.
        last: rewind: replay the latest ``last`` messages, then live messages.
    """

    topic: str
    since: Position | None = None
    last: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Unsubscribe this connection from ``topic``."""

    topic: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``payload`` to every subscriber of ``topic``; with an ``id``, the client is
    answered with an ``ack`` carrying the position (or an ``error`` with that ``id``)."""

    topic: str
    payload: Payload
    id: str | int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Ask for a ``pong``."""


Command = Subscribe | Unsubscribe | Publish | Ping


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic name.

    Raises:
        ProtocolError: ``invalid_topic``.
    """
    if isinstance(topic, str) and TOPIC_PATTERN.fullmatch(topic):
        return topic
    raise ProtocolError(
        "invalid_topic", "a topic is 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'"
    )


def parse_frame(frame: str | bytes) -> Command:
    """Parse one multiplexed-mode client frame.

    Raises:
        ProtocolError: ``binary_frame``, ``invalid_json``, ``invalid_frame``, ``unknown_op``,
            ``missing_field``, ``invalid_topic``, ``invalid_since`` or ``invalid_last``.
    """
    if isinstance(frame, bytes):
        raise ProtocolError("binary_frame", "multiplexed mode takes JSON text frames only")
    message = parse_json(frame)
    if not isinstance(message, dict):
        raise ProtocolError("invalid_frame", "a frame is a JSON object with an 'op' field")
    op = message.get("op")
    if op == "ping":
        return Ping()
    if op not in ("subscribe", "unsubscribe", "publish"):
        raise ProtocolError("unknown_op", "op is one of subscribe, unsubscribe, publish, ping")
    if op == "publish":
        return _publish(message)
    if "topic" not in message:
        raise ProtocolError("missing_field", f"{op} needs a 'topic'")
    topic = validate_topic(message["topic"])
    if op == "subscribe":
        return _subscribe(topic, message)
    return Unsubscribe(topic)


def _publish(message: dict[str, Any]) -> Publish:
    ack = message.get("id")
    if ack is not None and not (isinstance(ack, str) and 0 < len(ack) <= MAX_ACK_ID_LENGTH):
        try:
            ack = parse_count(ack, "id", "invalid_id")
        except ProtocolError:
            detail = (
                f"id is a string of 1 to {MAX_ACK_ID_LENGTH} characters "
                "or an integer from 0 to 2**63 - 1"
            )
            raise ProtocolError("invalid_id", detail) from None
    try:
        if "topic" not in message:
            raise ProtocolError("missing_field", "publish needs a 'topic'")
        topic = validate_topic(message["topic"])
        if "data" not in message:
            raise ProtocolError("missing_field", "publish needs 'data'")
        return Publish(topic, payload_of(message["data"]), ack)
    except ProtocolError as error:
        raise ProtocolError(error.error, error.detail, ack) from None


def _subscribe(topic: str, message: dict[str, Any]) -> Subscribe:
    since, last = message.get("since"), message.get("last")
    try:
        if since is not None and last is not None:
            raise ProtocolError("invalid_since", "give 'since' or 'last', not both")
        if since is not None:
            return Subscribe(topic, since=parse_position(since))
        if last is not None:
            return Subscribe(topic, last=parse_count(last, "last", "invalid_last"))
    except ProtocolError as error:
        raise ProtocolError(error.error, error.detail, topic=topic) from None
    return Subscribe(topic)


def parse_position(since: Any) -> Position:
    """Read ``{"epoch": E, "seq": N}`` as sent by a client.

    Raises:
        ProtocolError: ``invalid_since``.
    """
    if not isinstance(since, dict) or set(since) != {"epoch", "seq"}:
        raise ProtocolError("invalid_since", "since is an object with 'epoch' and 'seq' only")
    return Position(
        parse_epoch(since["epoch"], "invalid_since"),
        parse_count(since["seq"], "since.seq", "invalid_since"),
    )


def parse_epoch(epoch: Any, error: str) -> str:
    """Check an epoch sent by a client: a string of 1 to ``MAX_EPOCH_LENGTH`` characters.

    Raises:
        ProtocolError: with the code ``error``.
    """
    if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        raise ProtocolError(error, f"epoch is a string of 1 to {MAX_EPOCH_LENGTH} characters")
    return epoch


def parse_count(value: object, name: str, error: str) -> int:
    """Check a sequence number or count sent by a client: an integer from 0 to 2**63 - 1.

    Raises:
        ProtocolError: with the code ``error``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
        return value
    raise ProtocolError(error, f"{name} is an integer from 0 to 2**63 - 1")


def parse_query_count(text: str, name: str, error: str) -> int:
    """Check a sequence number or count given as a query parameter's decimal digits.

    Raises:
        ProtocolError: with the code ``error``.
    """
    if text.isascii() and text.isdigit() and len(text) < 20:
        return parse_count(int(text), name, error)
    raise ProtocolError(error, f"{name} is an integer from 0 to 2**63 - 1")


def parse_history_query(query: Mapping[str, str], maximum: int) -> tuple[Position | None, int]:
    """Read ``GET /history``'s ``since``, ``epoch`` and ``limit`` (``token`` is auth's).

    Raises:
        ProtocolError: ``invalid_query`` (an unknown parameter), ``invalid_limit`` (not 1 to
            ``maximum``) or ``invalid_since`` (not a count, or without its epoch).
    """
    unknown = set(query) - {"since", "epoch", "limit", "token"}
    if unknown:
        raise ProtocolError("invalid_query", f"unknown parameters: {sorted(unknown)}")
    limit = parse_query_count(query.get("limit", str(maximum)), "limit", "invalid_limit")
    if not 0 < limit <= maximum:
        raise ProtocolError("invalid_limit", f"limit is 1 to {maximum}")
    if "since" not in query and "epoch" not in query:
        return None, limit
    if "since" not in query or "epoch" not in query:
        raise ProtocolError("invalid_since", "give since and epoch together")
    epoch = parse_epoch(query["epoch"], "invalid_since")
    return Position(epoch, parse_query_count(query["since"], "since", "invalid_since")), limit


def payload_of(data: Any) -> Payload:
    """Build the payload of client-supplied JSON data.

    Raises:
        ProtocolError: ``invalid_json`` when the data cannot be sent on as JSON.
    """
    try:
        return Payload.from_data(data)
    except ValueError as error:
        raise ProtocolError("invalid_json", str(error)) from None
    except RecursionError:
        raise ProtocolError("invalid_json", "nested too deeply") from None


def parse_json_body(body: bytes) -> Payload:
    """Build the payload of an ``application/json`` HTTP body.

    Raises:
        ProtocolError: ``invalid_json``.
    """
    return payload_of(parse_json(body))


def control_frame(op: str, **fields: str | int | bool) -> Frame:
    """Encode a server control frame such as ``{"op":"pong"}``."""
    return Frame.of(_dumps({"op": op, **fields}), control=True)


def history_body(
    topic: str, position: Position, recovered: bool | None, envelopes: list[Frame]
) -> str:
    """Encode ``GET /history``'s answer around envelopes already encoded for the wire."""
    head = _dumps(
        {"topic": topic, "epoch": position.epoch, "seq": position.seq, "recovered": recovered}
    )
    messages = ",".join(frame.data for frame in envelopes if isinstance(frame.data, str))
    return head[:-1] + ',"messages":[' + messages + "]}"


def error_frame(error: ProtocolError) -> Frame:
    """Encode the frame that answers a bad client frame, with the ``id`` of a publish that
    asked for an ack and the topic of the command refused, when there are."""
    named: dict[str, str | int] = {}
    if error.id is not None:
        named["id"] = error.id
    if error.topic is not None:
        named["topic"] = error.topic
    return control_frame("error", **named, error=error.error, detail=error.detail)


def ack_frame(ack: str | int, topic: str, epoch: str, seq: int) -> Frame:
    """Encode the answer to a publish that asked for an ack: the position it was given."""
    return control_frame("ack", id=ack, topic=topic, epoch=epoch, seq=seq)


def parse_json(text: str | bytes) -> Any:
    """Parse JSON text sent by a client (``NaN`` and infinities are not JSON).

    Raises:
        ProtocolError: ``invalid_json``.
    """
    try:
        # JSON exchanged between systems is UTF-8 (RFC 8259, section 8.1).
        return _DECODER.decode(text if isinstance(text, str) else text.decode())
    except ValueError as error:  # UnicodeDecodeError included
        raise ProtocolError("invalid_json", str(error)) from None
    except RecursionError:
        raise ProtocolError("invalid_json", "nested too deeply") from None


def _dumps(value: Any) -> str:
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(value, 0))
    return _ENCODER.encode(value)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Made once: json.loads and json.dumps with options build a new decoder or encoder per call,
# which costs a publish as much as the parsing or encoding itself. No check for cycles: data
# parsed from JSON has none, and a cycle in an application's data ends in RecursionError,
# which Payload.from_data documents.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)


def _unserializable(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# The C encoder _ENCODER.encode builds on every call, built once: a third of the cost of
# encoding a small message. None where the json module has no C speedups (then _ENCODER).
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
# Its arguments: no cycle check, default, string encoder, no indent, key separator, item
# separator, sort_keys, skipkeys, allow_nan.
_C_ENCODE = (
    None
    if _C_MAKE_ENCODER is None
    else _C_MAKE_ENCODER(
        None, _unserializable, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
)
