"""Subscribe to broadcaster topics over the multiplexed WebSocket and print what arrives.

Start a server, subscribe to two topics, and publish to one of them from another terminal::

    .venv/bin/broadcaster serve --port 8000
    .venv/bin/python examples/subscriber.py news sport
    .venv/bin/python examples/publisher.py --topic news --count 5

The script speaks the multiplexed protocol of ``GET /ws``: it sends one
``{"op":"subscribe","topic":T}`` per topic and prints each message envelope
``{"topic":T,"seq":N,"data":D}``. A frame may also be a JSON array of envelopes, since the
server may coalesce queued messages into one frame. ``seq`` counts per topic, so a jump
means the server dropped messages for this client (it fell behind and the overflow policy
made room); the script reports each gap on stderr. When the connection closes it prints the
close code and reason: 1001 when the server shuts down, 1013 when this client was too slow.

With ``--count N`` it leaves (closing with 1000) after N messages; ``--idle-timeout S`` makes
it leave after S seconds without a message. Exit status: 0 on a normal close, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

# Largest frame accepted from the server; coalesced frames hold many messages.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Close codes that mean the connection ended as intended.
NORMAL_CLOSE_CODES = frozenset({1000, 1001})


@dataclass(slots=True)
class SeqTracker:
    """Follow ``seq`` per topic and report what went missing."""

    last: dict[str, int] = field(default_factory=dict)
    missed: int = 0

    def check(self, topic: str, seq: int) -> str | None:
        """Record ``seq`` for ``topic``; return a report when it is not the one expected.

        The first message of a topic only sets the baseline: messages published before the
        subscription took effect were never meant for this client.
        """
        previous = self.last.get(topic)
        self.last[topic] = seq
        if previous is None or seq == previous + 1:
            return None
        if seq > previous + 1:
            lost = seq - previous - 1
            self.missed += lost
            return f"gap on {topic!r}: seq {previous} -> {seq}, {lost} message(s) missed"
        return f"seq on {topic!r} went back from {previous} to {seq}: the topic was restarted"

    def forget(self, topic: str) -> None:
        """Drop the baseline of ``topic`` (after an unsubscribe)."""
        self.last.pop(topic, None)


def envelopes(frame: str | bytes) -> list[dict[str, Any]]:
    """Split one server frame into its JSON objects: a frame is an object or an array.

    Raises:
        ValueError: the frame is not a JSON object or an array of objects.
    """
    if isinstance(frame, bytes):
        raise ValueError("multiplexed mode sends JSON text frames, not binary ones")
    value = json.loads(frame)
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) for item in items):
        raise ValueError(f"not a JSON object or array of objects: {frame[:200]!r}")
    return items


def describe_data(envelope: dict[str, Any]) -> str:
    """Render an envelope's ``data`` for printing; base64 data is decoded to bytes."""
    data = envelope.get("data")
    if envelope.get("encoding") == "base64" and isinstance(data, str):
        return repr(base64.b64decode(data))
    return json.dumps(data, ensure_ascii=False)


def handle(envelope: dict[str, Any], tracker: SeqTracker) -> bool:
    """Print one envelope; return whether it was a message (as opposed to a control frame)."""
    op = envelope.get("op")
    if op is None:
        topic, seq = str(envelope.get("topic")), envelope.get("seq")
        if isinstance(seq, int):
            report = tracker.check(topic, seq)
            if report is not None:
                print(f"!! {report}", file=sys.stderr, flush=True)
        print(f"[{topic} #{seq}] {describe_data(envelope)}", flush=True)
        return True
    if op == "subscribed":
        print(f"subscribed to {envelope.get('topic')!r}", flush=True)
    elif op == "unsubscribed":
        tracker.forget(str(envelope.get("topic")))
        print(f"unsubscribed from {envelope.get('topic')!r}", flush=True)
    elif op == "error":
        print(
            f"server error {envelope.get('error')}: {envelope.get('detail')}",
            file=sys.stderr,
            flush=True,
        )
    elif op != "pong":
        print(f"unexpected frame: {envelope}", file=sys.stderr, flush=True)
    return False


async def receive_messages(
    websocket: ClientConnection, tracker: SeqTracker, count: int | None, idle_timeout: float | None
) -> None:
    """Print what arrives until ``count`` messages, ``idle_timeout`` or the server's close."""
    received = 0
    while count is None or received < count:
        try:
            async with asyncio.timeout(idle_timeout):
                frame = await websocket.recv()
        except TimeoutError:
            print(f"no message for {idle_timeout:g} s, leaving", file=sys.stderr, flush=True)
            return
        try:
            items = envelopes(frame)
        except ValueError as error:
            print(f"bad frame: {error}", file=sys.stderr, flush=True)
            continue
        for envelope in items:
            received += handle(envelope, tracker)


async def subscribe(
    url: str,
    topics: list[str],
    count: int | None,
    idle_timeout: float | None,
    token: str | None = None,
) -> int:
    """Subscribe to ``topics`` at ``url`` and print messages; return the exit status."""
    tracker = SeqTracker()
    # A server that requires a token takes it in the Authorization header (browsers, which
    # cannot set it, put it in a ?token= query parameter instead).
    headers = {"authorization": f"Bearer {token}"} if token else None
    try:
        async with connect(
            url, max_size=MAX_FRAME_BYTES, open_timeout=10, additional_headers=headers
        ) as websocket:
            print(f"connected to {url}", flush=True)
            for topic in topics:
                await websocket.send(json.dumps({"op": "subscribe", "topic": topic}))
            try:
                await receive_messages(websocket, tracker, count, idle_timeout)
            except ConnectionClosed:
                pass  # reported below, from the connection's close code
            # Leaving the block closes the socket with 1000 if it is still open.
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as error:
        print(f"cannot connect to {url}: {error}", file=sys.stderr, flush=True)
        return 1
    code, reason = websocket.close_code, websocket.close_reason
    print(f"closed: code={code} reason={reason!r}", flush=True)
    if tracker.missed:
        print(f"{tracker.missed} message(s) missed in all", file=sys.stderr, flush=True)
    return 0 if code in NORMAL_CLOSE_CODES else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Subscribe to broadcaster topics.")
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to subscribe to")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="multiplexed endpoint")
    parser.add_argument("--count", type=int, help="leave after this many messages")
    parser.add_argument("--idle-timeout", type=float, help="leave after this many idle seconds")
    parser.add_argument("--token", help="a JWT (or publish token) for servers that require one")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        parser.error("--idle-timeout must be greater than 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the subscriber; return the exit status."""
    args = parse_args(argv)
    try:
        return asyncio.run(
            subscribe(args.url, args.topics, args.count, args.idle_timeout, args.token)
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
