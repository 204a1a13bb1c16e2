"""Publish messages to broadcaster topics with ``broadcaster.client``'s publishers.

Start a server, then publish ten messages, two a second, to the ``news`` topic::

    .venv/bin/broadcaster serve --port 8000
    .venv/bin/python examples/publisher.py --topic news --count 10 --rate 2

Each message is a JSON object (``{"n": 1, "count": 10, "text": "..."}``); the script prints
the receipt of each: the topic's ``epoch`` and ``seq`` and, over HTTP, the number of
subscribers it was offered to. With ``--url http://...`` it publishes over HTTP
(:class:`~broadcaster.client.HTTPPublisher`: keep-alive, batches under load, 503s retried
after ``Retry-After`` up to ``--retries`` times); with ``--url ws://.../ws`` over one
WebSocket whose publishes are acked (:class:`~broadcaster.client.WSPublisher`). Naming
``--topic`` several times broadcasts each message to all of them. A refused message ends the
script with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx

from broadcaster.client import HTTPPublisher, PublishError, Receipt, WSPublisher


def positive_float(text: str) -> float:
    """argparse type: a number greater than zero."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Publish messages to broadcaster topics.")
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="http://HOST:PORT to publish over HTTP, ws://HOST:PORT/ws over WebSocket",
    )
    parser.add_argument(
        "--topic", action="append", help="topic to publish to; repeat it to broadcast"
    )
    parser.add_argument("--count", type=int, default=10, help="messages to publish")
    parser.add_argument(
        "--rate", type=positive_float, default=None, help="messages per second (default: no limit)"
    )
    parser.add_argument("--text", default="hello", help="text carried by each message")
    parser.add_argument("--retries", type=int, default=5, help="HTTP retries per request on 503")
    parser.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    parser.add_argument("--token", help="bearer token: a publish token or a JWT granting the topic")
    args = parser.parse_args(argv)
    if args.count < 0 or args.retries < 0:
        parser.error("--count and --retries must not be negative")
    if not args.url.startswith(("http://", "https://", "ws://", "wss://")):
        parser.error("--url starts with http://, https://, ws:// or wss://")
    args.topic = args.topic or ["news"]
    return args


async def publish(args: argparse.Namespace, publisher: HTTPPublisher | WSPublisher) -> int:
    """Publish ``--count`` messages in turn, paced to ``--rate``; return the exit status."""
    interval = 1.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    for n in range(1, args.count + 1):
        # Pace against the start time, so that slow requests do not lower the rate.
        await asyncio.sleep(max(start + (n - 1) * interval - time.monotonic(), 0))
        data = {"n": n, "count": args.count, "text": args.text}
        try:
            receipts: list[Receipt] = await publisher.broadcast(args.topic, data)
        except (PublishError, httpx.HTTPError) as error:
            print(f"message {n}: publish failed: {error}", file=sys.stderr, flush=True)
            return 1
        for receipt in receipts:
            print(
                f"published n={n} topic={receipt.topic} epoch={receipt.epoch} "
                f"seq={receipt.seq} subscribers={receipt.subscribers}",
                flush=True,
            )
    return 0


async def main(argv: list[str] | None = None) -> int:
    """Connect the publisher the URL asks for and publish; return the exit status."""
    args = parse_args(argv)
    if args.url.startswith("ws"):
        async with WSPublisher(args.url, token=args.token, open_timeout=args.timeout) as ws:
            return await publish(args, ws)
    async with HTTPPublisher(
        args.url, token=args.token, retries=args.retries, timeout=args.timeout
    ) as http:
        return await publish(args, http)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
