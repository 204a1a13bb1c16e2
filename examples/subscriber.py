"""Subscribe to broadcaster topics and print what arrives, resuming across reconnects.

Start a server, subscribe to two topics, and publish to one of them from another terminal::

    .venv/bin/broadcaster serve --port 8000
    .venv/bin/python examples/subscriber.py news sport
    .venv/bin/python examples/publisher.py --topic news --count 5

It runs on :class:`broadcaster.client.Client` (``pip install 'broadcaster-ws[client]'``), which
speaks the multiplexed protocol of ``GET /ws``. Each message prints as ``[topic #seq] data``.
Stop the server and start it again, or cut the network: the client reconnects with jittered
backoff and subscribes with ``since`` its last ``(epoch, seq)`` per topic, so the server
replays what was missed from its history. A ``seq`` gap within one connection (the server
dropped messages because this client fell behind) is filled the same way. What history can no
longer provide (a restarted server has a new epoch) is reported on stderr as lost.

With ``--count N`` it leaves after N messages; ``--idle-timeout S`` makes it leave after S
seconds without one. Exit status: 0, or 1 when the server refused the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from broadcaster.client import Client, ClientError, Gap


async def subscribe(
    url: str,
    topics: list[str],
    count: int | None,
    idle_timeout: float | None,
    token: str | None = None,
) -> int:
    """Subscribe to ``topics`` at ``url`` and print messages; return the exit status."""
    client = Client(url, topics, token=token)
    received = 0
    items = aiter(client)
    try:
        while count is None or received < count:
            try:
                async with asyncio.timeout(idle_timeout):
                    item = await anext(items)
            except TimeoutError:
                print(f"no message for {idle_timeout:g} s, leaving", file=sys.stderr, flush=True)
                break
            if isinstance(item, Gap):
                since = f"seq {item.after.seq}" if item.after else "the start"
                print(
                    f"!! lost messages on {item.topic!r} after {since}; "
                    f"going on from seq {item.resumed.seq} of epoch {item.resumed.epoch}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            received += 1
            data = repr(item.data) if isinstance(item.data, bytes) else json.dumps(item.data)
            print(f"[{item.topic} #{item.seq}] {data}", flush=True)
    except ClientError as error:
        print(f"refused: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        await client.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Subscribe to broadcaster topics.")
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to subscribe to")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="multiplexed endpoint")
    parser.add_argument("--count", type=int, help="leave after this many messages")
    parser.add_argument("--idle-timeout", type=float, help="leave after this many idle seconds")
    parser.add_argument("--token", help="a JWT for servers that require one")
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
