"""Publish messages to a broadcaster topic over HTTP, pushing back when the server asks to.

Start a server, then publish ten messages, two a second, to the ``news`` topic::

    .venv/bin/broadcaster serve --port 8000
    .venv/bin/python examples/publisher.py --topic news --count 10 --rate 2

Each message is a JSON object (``{"n": 1, "count": 10, "text": "..."}``) sent with
``POST /publish/{topic}``; the script prints the receipt of each, that is the topic's ``seq``
and the number of subscribers the message was offered to. When the server's hub is busy it
answers 503 with ``Retry-After``: the script waits that long and tries again, up to
``--retries`` times per message, then gives up with exit status 1.
"""

from __future__ import annotations

import argparse
import email.utils
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

# Longest wait honoured from a Retry-After header, whatever the server says.
MAX_RETRY_AFTER = 30.0
# Wait used when a 503 carries no (readable) Retry-After header.
DEFAULT_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the server did with one publish."""

    topic: str
    seq: int
    subscribers: int


class PublishError(Exception):
    """A publish failed for good: a refused request, or no retries left."""


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


def publish(client: httpx.Client, topic: str, data: Any, retries: int) -> Receipt:
    """Publish ``data`` as JSON to ``topic``, retrying a 503 at most ``retries`` times.

    Raises:
        PublishError: the server refused the message, or was still busy after the retries.
        httpx.HTTPError: the server could not be reached.
    """
    for attempt in range(retries + 1):
        response = client.post(f"/publish/{topic}", json=data)
        if response.status_code == httpx.codes.SERVICE_UNAVAILABLE and attempt < retries:
            delay = retry_after(response)
            print(
                f"server busy (503), retrying in {delay:g} s [{attempt + 1}/{retries}]",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(delay)
            continue
        if response.is_error:
            raise PublishError(f"{response.status_code} {_detail(response)}")
        body = response.json()
        return Receipt(body["topic"], body["seq"], body["subscribers"])
    raise AssertionError("unreachable: the last attempt returns or raises")


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else response.reason_phrase


def positive_float(text: str) -> float:
    """argparse type: a number greater than zero."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Publish messages to a broadcaster topic.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--topic", default="news", help="topic to publish to")
    parser.add_argument("--count", type=int, default=10, help="messages to publish")
    parser.add_argument(
        "--rate", type=positive_float, default=None, help="messages per second (default: no limit)"
    )
    parser.add_argument("--text", default="hello", help="text carried by each message")
    parser.add_argument("--retries", type=int, default=5, help="retries per message on 503")
    parser.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    parser.add_argument("--token", help="bearer token: a publish token or a JWT granting the topic")
    args = parser.parse_args(argv)
    if args.count < 0 or args.retries < 0:
        parser.error("--count and --retries must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    """Publish ``--count`` messages; return the exit status."""
    args = parse_args(argv)
    interval = 1.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        for n in range(1, args.count + 1):
            # Pace against the start time, so that slow requests do not lower the rate.
            delay = start + (n - 1) * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            data = {"n": n, "count": args.count, "text": args.text}
            try:
                receipt = publish(client, args.topic, data, args.retries)
            except (PublishError, httpx.HTTPError) as error:
                print(f"message {n}: publish failed: {error}", file=sys.stderr, flush=True)
                return 1
            print(
                f"published n={n} topic={receipt.topic} seq={receipt.seq} "
                f"subscribers={receipt.subscribers}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
