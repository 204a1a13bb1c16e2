"""Tests for broadcaster.protocol: parsing client frames and encoding server frames."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from typing import Any

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from broadcaster.errors import ProtocolError
from broadcaster.protocol import (
    Command,
    Frame,
    Payload,
    Ping,
    Position,
    Publish,
    Subscribe,
    Unsubscribe,
    control_frame,
    error_frame,
    history_body,
    parse_frame,
    parse_query_count,
    validate_topic,
)

VALID_TOPICS = ["t", "a" * 128, "Az09_.:-", "room:42.chat-main_1"]
INVALID_TOPICS: list[object] = [
    "",
    "a" * 129,
    "with space",
    "slash/topic",
    'quote"topic',
    "back\\slash",
    "newline\n",
    "caf\u00e9",
    "\u0661",  # an Arabic-Indic digit: a digit to str.isdigit, not to the topic grammar
    5,
    None,
    ["t"],
    {"t": 1},
]


def wsproto_frame(payload: str | bytes) -> bytes:
    """Return the frame wsproto's server side encodes for ``payload``: the reference."""
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(payload, fin=True))


def text_of(frame: Frame) -> str:
    """Return the message of a text frame, checking that it is one."""
    assert isinstance(frame.data, str)
    assert frame.wire == wsproto_frame(frame.data)
    return frame.data


def parse_error(frame: str | bytes) -> ProtocolError:
    """Return the ProtocolError that parsing ``frame`` raises."""
    with pytest.raises(ProtocolError) as raised:
        parse_frame(frame)
    return raised.value


def test_ping_parses() -> None:
    """A ping frame parses to Ping, whatever other fields it carries."""
    assert parse_frame('{"op":"ping"}') == Ping()
    assert parse_frame('{"op":"ping","topic":"ignored","id":1}') == Ping()


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_subscribe_and_unsubscribe_parse(topic: str) -> None:
    """Subscribe and unsubscribe frames parse to their commands with the topic."""
    assert parse_frame(json.dumps({"op": "subscribe", "topic": topic})) == Subscribe(topic)
    assert parse_frame(json.dumps({"op": "unsubscribe", "topic": topic})) == Unsubscribe(topic)


@pytest.mark.parametrize(
    "data",
    [
        {"price": 1.5, "tags": ["a", "b"]},
        [1, 2, 3],
        "hello",
        "h\u00e9llo \u2603",
        42,
        0.5,
        True,
        None,
    ],
    ids=["object", "array", "ascii_str", "unicode_str", "int", "float", "bool", "null"],
)
def test_publish_parses_any_json_data(data: Any) -> None:
    """A publish frame parses to Publish with the data's payload, whatever JSON the data is."""
    command = parse_frame(json.dumps({"op": "publish", "topic": "t", "data": data}))
    assert isinstance(command, Publish)
    assert command.topic == "t"
    assert command.payload == Payload.from_data(data)
    assert command.payload.json is not None
    assert json.loads(command.payload.json) == data


def test_parse_frame_accepts_whitespace_and_key_order() -> None:
    """Parsing is about JSON values, not layout: whitespace and key order do not matter."""
    command = parse_frame('  {"data" : {"a" : 1} ,\n "topic":"t", "op":"publish"}  ')
    assert command == Publish("t", Payload.from_data({"a": 1}))


def test_binary_frames_are_rejected() -> None:
    """A binary frame is a binary_frame error, even when it holds valid JSON."""
    assert parse_error(b'{"op":"ping"}').error == "binary_frame"


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "{",
        "not json",
        "{'op':'ping'}",
        '{"op":"ping"',
        '{"op":"ping"} trailing',
        "NaN",
        "Infinity",
        "-Infinity",
        '{"op":"publish","topic":"t","data":NaN}',
        '{"op":"publish","topic":"t","data":[1,Infinity]}',
        '{"op":"publish","topic":"t","data":{"x":-Infinity}}',
    ],
)
def test_invalid_json_is_rejected(frame: str) -> None:
    """Text that is not strict JSON, NaN and Infinity included, is an invalid_json error."""
    error = parse_error(frame)
    assert error.error == "invalid_json"
    assert error.detail


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 100_000,
        "{" * 100_000,
        '{"a":' * 100_000,
        '{"op":"publish","topic":"t","data":' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["arrays", "braces", "objects", "published_data"],
)
def test_deeply_nested_json_is_rejected(frame: str) -> None:
    """JSON nested deeper than the parser can go is an invalid_json error, not a RecursionError."""
    assert parse_error(frame).error == "invalid_json"


def test_no_nesting_depth_escapes_as_recursion_error() -> None:
    """At every nesting depth a publish either parses or is an invalid_json error."""
    for depth in range(1, sys.getrecursionlimit() + 50):
        frame = '{"op":"publish","topic":"t","data":' + "[" * depth + "]" * depth + "}"
        try:
            command: Command | str = parse_frame(frame)
        except ProtocolError as error:
            command = error.error
        assert isinstance(command, Publish) or command == "invalid_json", depth


def test_published_data_must_be_encodable_as_utf8() -> None:
    """A lone surrogate in published data is invalid_json, since no UTF-8 frame can carry it."""
    error = parse_error('{"op":"publish","topic":"t","data":"\\ud800"}')
    assert error.error == "invalid_json"


def test_surrogate_pairs_in_published_data_are_fine() -> None:
    """An escaped surrogate pair is one valid character, so its publish parses and encodes."""
    command = parse_frame('{"op":"publish","topic":"t","data":"\\ud83d\\ude00"}')
    assert isinstance(command, Publish)
    assert command.payload.raw == "\U0001f600"
    frame = command.payload.envelope("t", 1)
    text = text_of(frame)
    assert "\U0001f600" in text
    assert frame.size == len(text.encode()) + 2


@pytest.mark.parametrize("frame", ["[]", '[{"op":"ping"}]', "1", "1.5", '"ping"', "null", "true"])
def test_non_objects_are_invalid_frames(frame: str) -> None:
    """Valid JSON that is not an object is an invalid_frame error."""
    assert parse_error(frame).error == "invalid_frame"


@pytest.mark.parametrize(
    "frame",
    [
        "{}",
        '{"topic":"t"}',
        '{"op":"jump","topic":"t"}',
        '{"op":"PING"}',
        '{"op":"Subscribe","topic":"t"}',
        '{"op":null}',
        '{"op":1}',
        '{"op":["ping"]}',
        '{"op":{"ping":1}}',
    ],
)
def test_unknown_ops_are_rejected(frame: str) -> None:
    """A missing, misspelt or non-string op is an unknown_op error."""
    assert parse_error(frame).error == "unknown_op"


@pytest.mark.parametrize(
    "frame",
    [
        '{"op":"subscribe"}',
        '{"op":"unsubscribe"}',
        '{"op":"publish","data":1}',
        '{"op":"publish","topic":"t"}',
    ],
)
def test_missing_fields_are_rejected(frame: str) -> None:
    """A command without its topic, or a publish without data, is a missing_field error."""
    error = parse_error(frame)
    assert error.error == "missing_field"
    assert "topic" in error.detail or "data" in error.detail


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
@pytest.mark.parametrize("topic", INVALID_TOPICS)
def test_invalid_topics_are_rejected(op: str, topic: object) -> None:
    """An empty, too long, badly spelt or non-string topic is an invalid_topic error."""
    error = parse_error(json.dumps({"op": op, "topic": topic, "data": 1}))
    assert error.error == "invalid_topic"
    assert "128" in error.detail


@pytest.mark.parametrize("topic", INVALID_TOPICS)
def test_validate_topic_rejects_invalid_topics(topic: object) -> None:
    """validate_topic raises invalid_topic for every invalid topic."""
    with pytest.raises(ProtocolError) as raised:
        validate_topic(topic)
    assert raised.value.error == "invalid_topic"


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_validate_topic_returns_valid_topics(topic: str) -> None:
    """validate_topic returns a valid topic unchanged."""
    assert validate_topic(topic) == topic


def test_protocol_error_carries_its_code_and_detail() -> None:
    """A ProtocolError's message names its code and detail."""
    error = parse_error("[]")
    assert str(error) == f"invalid_frame: {error.detail}"


def test_envelope_of_json_data_embeds_the_json() -> None:
    """A JSON payload's envelope carries the data as JSON with the topic and seq."""
    payload = Payload.from_data({"price": 1.5, "name": "caf\u00e9"})
    frame = payload.envelope("prices", 7)
    assert json.loads(text_of(frame)) == {
        "topic": "prices",
        "seq": 7,
        "data": {"price": 1.5, "name": "caf\u00e9"},
    }


@pytest.mark.parametrize(
    "text", ["plain", 'quote " and \\ backslash', "line\nbreak\t\u0000", "\u2603"]
)
def test_envelope_of_raw_text_is_a_json_string(text: str) -> None:
    """A raw text payload's envelope carries the text as a JSON string, escaped as needed."""
    frame = Payload(text).envelope("t", 1)
    assert json.loads(text_of(frame)) == {"topic": "t", "seq": 1, "data": text}


@pytest.mark.parametrize("raw", [b"", b"\x00\x01\xff", bytes(range(256)), b"{not json"])
def test_envelope_of_raw_bytes_is_base64(raw: bytes) -> None:
    """A raw bytes payload's envelope is valid JSON carrying base64 data and its encoding."""
    frame = Payload(raw).envelope("bin", 3)
    decoded = json.loads(text_of(frame))
    assert decoded == {
        "topic": "bin",
        "seq": 3,
        "data": base64.b64encode(raw).decode("ascii"),
        "encoding": "base64",
    }
    assert base64.b64decode(decoded["data"]) == raw


def test_envelope_ignores_raw_when_json_is_given() -> None:
    """When a payload has JSON, the envelope uses it rather than the raw frame."""
    payload = Payload(raw=b"ignored", json='{"a":1}')
    frame = payload.envelope("t", 2)
    assert json.loads(text_of(frame)) == {"topic": "t", "seq": 2, "data": {"a": 1}}


def test_from_data_of_a_string_keeps_it_raw() -> None:
    """A string reaches raw subscribers as itself and mux subscribers as a JSON string."""
    payload = Payload.from_data("h\u00e9llo")
    assert payload.raw == "h\u00e9llo"
    assert payload.json == '"h\u00e9llo"'


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ({"b": [1, 2], "a": None}, '{"b":[1,2],"a":null}'),
        ([1, "\u2603"], '[1,"\u2603"]'),
        (42, "42"),
        (True, "true"),
        (None, "null"),
    ],
)
def test_from_data_of_other_values_is_compact_json(data: Any, text: str) -> None:
    """Any other value reaches every subscriber as compact, non-ASCII-escaped JSON text."""
    payload = Payload.from_data(data)
    assert payload == Payload(raw=text, json=text)


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ('"caf\\u00e9"', "caf\u00e9"),
        ('{"b" : [1, 2.50]}', '{"b" : [1, 2.50]}'),
        ("1e3", "1e3"),
    ],
)
def test_from_json_keeps_the_text_as_spelled(text: str, raw: str) -> None:
    """JSON text reaches mux subscribers as spelled; a string reaches raw subscribers as
    itself, other values as their text."""
    assert Payload.from_json(text) == Payload(raw=raw, json=text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_from_data_rejects_non_json_floats(value: float) -> None:
    """Payload.from_data refuses NaN and infinities, which are not JSON."""
    with pytest.raises(ValueError, match="JSON"):
        Payload.from_data({"x": value})


@pytest.mark.parametrize(
    ("message", "size"),
    [
        ("", 0),
        ("hello", 5),
        ("caf\u00e9", 5),
        ("\u2603", 3),
        ("\U0001f600", 4),
        (b"", 0),
        (b"\x00\xff\x10", 3),
        ("\u00e9".encode(), 2),
    ],
    ids=["empty_str", "ascii", "latin", "bmp", "astral", "empty_bytes", "bytes", "utf8_bytes"],
)
def test_frame_size_counts_wire_bytes(message: str | bytes, size: int) -> None:
    """A frame's size is its header plus the UTF-8 length of text or the length of bytes."""
    frame = Frame.of(message)
    assert frame.data == message
    assert type(frame.data) is type(message)
    assert frame.size == len(frame.wire) == 2 + size


# Payload lengths around the three header forms: 7-bit, 16-bit and 64-bit lengths.
BOUNDARIES = [(0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (70_000, 10)]


@pytest.mark.parametrize(("length", "header"), BOUNDARIES)
@pytest.mark.parametrize("kind", [str, bytes], ids=["text", "binary"])
def test_frame_of_encodes_like_wsproto(length: int, header: int, kind: type) -> None:
    """Frame.of gives the bytes wsproto's server side sends, header form and all."""
    message: str | bytes = "x" * length if kind is str else b"\xff" * length
    frame = Frame.of(message)
    assert frame.wire == wsproto_frame(message)
    assert frame.size == header + length
    assert frame.wire[header:] == (message.encode() if isinstance(message, str) else message)
    opcode = Opcode.TEXT if kind is str else Opcode.BINARY
    assert frame.wire[0] == 0x80 | opcode  # final, uncompressed
    assert frame.wire[1] & 0x80 == 0  # a server never masks


@pytest.mark.parametrize(
    ("message", "header"),
    [
        ("\u00e9" * 62 + "x", 2),  # 63 characters, 125 bytes
        ("\u00e9" * 63, 4),  # 63 characters, 126 bytes
        ("\u2603" * 21845, 4),  # 21845 characters, 65535 bytes
        ("\u00e9" * 32768, 10),  # 32768 characters, 65536 bytes
    ],
    ids=["125_bytes", "126_bytes", "65535_bytes", "65536_bytes"],
)
def test_frame_of_text_measures_its_length_in_utf8_bytes(message: str, header: int) -> None:
    """A text frame's header form follows its UTF-8 length, not its length in characters."""
    frame = Frame.of(message)
    assert frame.wire == wsproto_frame(message)
    assert frame.size == header + len(message.encode())


@pytest.mark.parametrize(
    "message", ["", "hello", "\u2603" * 100, "x" * 70_000, b"", b"\x00\xff", b"y" * 300]
)
def test_frame_of_decodes_back_to_its_message(message: str | bytes) -> None:
    """A client reading the frame's wire bytes gets one final message equal to ``data``."""
    client = FrameProtocol(client=True, extensions=[])
    client.receive_bytes(Frame.of(message).wire)
    [received] = list(client.received_frames())
    assert received.opcode is (Opcode.TEXT if isinstance(message, str) else Opcode.BINARY)
    assert received.payload == message
    assert received.frame_finished
    assert received.message_finished


def test_frame_is_frozen() -> None:
    """A frame is shared by every outbox it is sent to, so it cannot be changed."""
    frame = Frame.of("shared")
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.data = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("frame", "fields"),
    [
        (control_frame("pong"), {"op": "pong"}),
        (control_frame("subscribed", topic="t"), {"op": "subscribed", "topic": "t"}),
        (
            control_frame("weird", detail='quote " backslash \\ \u2603'),
            {"op": "weird", "detail": 'quote " backslash \\ \u2603'},
        ),
    ],
)
def test_control_frame_is_valid_json(frame: Frame, fields: dict[str, str]) -> None:
    """control_frame encodes its op and fields as one JSON object in a text frame."""
    assert json.loads(text_of(frame)) == fields


def test_error_frame_is_valid_json() -> None:
    """error_frame carries the error code and the detail of a ProtocolError."""
    error = ProtocolError("invalid_json", 'Expecting value: "quoted" \\ \u2603')
    assert json.loads(text_of(error_frame(error))) == {
        "op": "error",
        "error": "invalid_json",
        "detail": 'Expecting value: "quoted" \\ \u2603',
    }


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"op":"ping"}', Ping()),
        ('{"op":"subscribe","topic":"a"}', Subscribe("a")),
        (
            '{"op":"subscribe","topic":"a","since":{"epoch":"e-1","seq":4}}',
            Subscribe("a", since=Position("e-1", 4)),
        ),
        ('{"op":"subscribe","topic":"a","since":null}', Subscribe("a")),
        ('{"op":"subscribe","topic":"a","last":0}', Subscribe("a", last=0)),
        ('{"op":"subscribe","topic":"a","last":25}', Subscribe("a", last=25)),
        ('{"op":"unsubscribe","topic":"a"}', Unsubscribe("a")),
    ],
)
def test_parse_frame_returns_commands(frame: str, expected: Command) -> None:
    """parse_frame returns a command equal to the one the frame describes."""
    assert parse_frame(frame) == expected


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ('"since":5', "invalid_since"),
        ('"since":"e-1:5"', "invalid_since"),
        ('"since":[]', "invalid_since"),
        ('"since":{}', "invalid_since"),
        ('"since":{"epoch":"e"}', "invalid_since"),
        ('"since":{"seq":1}', "invalid_since"),
        ('"since":{"epoch":"e","seq":1,"extra":2}', "invalid_since"),
        ('"since":{"epoch":"","seq":1}', "invalid_since"),
        ('"since":{"epoch":5,"seq":1}', "invalid_since"),
        ('"since":{"epoch":"' + "e" * 65 + '","seq":1}', "invalid_since"),
        ('"since":{"epoch":"e","seq":-1}', "invalid_since"),
        ('"since":{"epoch":"e","seq":1.5}', "invalid_since"),
        ('"since":{"epoch":"e","seq":"1"}', "invalid_since"),
        ('"since":{"epoch":"e","seq":true}', "invalid_since"),
        ('"since":{"epoch":"e","seq":null}', "invalid_since"),
        ('"since":{"epoch":"e","seq":9223372036854775808}', "invalid_since"),
        ('"since":{"epoch":"e","seq":1' + "0" * 400 + "}", "invalid_since"),
        ('"since":{"epoch":"e","seq":1},"last":2', "invalid_since"),
        ('"last":-1', "invalid_last"),
        ('"last":"3"', "invalid_last"),
        ('"last":false', "invalid_last"),
        ('"last":2.0', "invalid_last"),
        ('"last":{}', "invalid_last"),
        ('"last":1e300', "invalid_last"),
    ],
)
def test_bad_since_and_last_are_rejected(fields: str, code: str) -> None:
    """Every malformed since or last is a ProtocolError with a code, never a crash."""
    with pytest.raises(ProtocolError) as raised:
        parse_frame('{"op":"subscribe","topic":"t",' + fields + "}")
    assert raised.value.error == code
    assert raised.value.detail
    assert raised.value.topic == "t"
    assert json.loads(error_frame(raised.value).data) == {
        "op": "error",
        "topic": "t",
        "error": code,
        "detail": raised.value.detail,
    }


@pytest.mark.parametrize("text", ["", "-1", "1.0", "abc", "\u0661", "9" * 19, "1" * 20, " 1"])
def test_bad_query_counts_are_rejected(text: str) -> None:
    """A query parameter that is not 0 to 2**63 - 1 in ASCII digits is a ProtocolError."""
    with pytest.raises(ProtocolError) as raised:
        parse_query_count(text, "last", "invalid_last")
    assert raised.value.error == "invalid_last"


def test_query_counts_parse() -> None:
    """ASCII digits up to 2**63 - 1 are read as a count."""
    assert parse_query_count("0", "last", "invalid_last") == 0
    assert parse_query_count("42", "last", "invalid_last") == 42
    assert parse_query_count(str((1 << 63) - 1), "x", "y") == (1 << 63) - 1


def test_history_body_embeds_the_envelopes() -> None:
    """history_body wraps encoded envelopes with the topic's position."""
    frames = [Payload.from_data(n).envelope("t", n) for n in (1, 2)]
    body = history_body("t", Position("e-1", 2), True, frames)
    assert json.loads(body) == {
        "topic": "t",
        "epoch": "e-1",
        "seq": 2,
        "recovered": True,
        "messages": [{"topic": "t", "seq": 1, "data": 1}, {"topic": "t", "seq": 2, "data": 2}],
    }
    assert json.loads(history_body("t", Position("e", 0), None, []))["messages"] == []
