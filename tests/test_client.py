"""broadcaster.client: the resume logic on its own, then against a real server."""

from __future__ import annotations

import json
import random
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from broadcaster.client import MAX_FILLS, Client, ClientError, Gap, Message, Position, Tracker
from broadcaster.settings import Settings
from tests.support import JWT_SECRET, running_server, wait_until

if TYPE_CHECKING:
    from tests.support import LiveServer


def ack(topic: str, epoch: str, seq: int, recovered: bool | None = None) -> dict[str, Any]:
    """A subscribed frame."""
    frame: dict[str, Any] = {"op": "subscribed", "topic": topic, "epoch": epoch, "seq": seq}
    if recovered is not None:
        frame["recovered"] = recovered
    return frame


def message(topic: str, seq: int, data: Any = None) -> dict[str, Any]:
    """A message envelope."""
    return {"topic": topic, "seq": seq, "data": seq if data is None else data}


def test_the_tracker_delivers_in_order_and_skips_duplicates() -> None:
    """After the acknowledgement, each next seq is delivered once; older ones are skipped."""
    tracker = Tracker.of(["t"])
    assert tracker.subscribes() == ['{"op":"subscribe","topic":"t"}']
    assert tracker.handle(ack("t", "e", 3)) == ([], None)
    assert tracker.handle(message("t", 4)) == ([Message("t", "e", 4, 4)], None)
    assert tracker.handle(message("t", 4)) == ([], None)
    assert tracker.handle(message("other", 5)) == ([], None)
    assert tracker.position("t") == Position("e", 4)
    assert tracker.subscribes() == ['{"op":"subscribe","topic":"t","since":{"epoch":"e","seq":4}}']


def test_the_tracker_fills_a_gap_by_subscribing_again_with_since() -> None:
    """A seq gap sends a subscribe with since; what races the replay is skipped until its ack."""
    tracker = Tracker.of(["t"])
    tracker.handle(ack("t", "e", 0))
    tracker.handle(message("t", 1))
    out, send = tracker.handle(message("t", 4))
    assert out == []
    assert send is not None
    assert json.loads(send) == {"op": "subscribe", "topic": "t", "since": {"epoch": "e", "seq": 1}}
    assert tracker.handle(message("t", 5)) == ([], None)  # raced the replay: skipped
    assert tracker.handle(ack("t", "e", 5, recovered=True)) == ([], None)
    delivered = [tracker.handle(message("t", seq))[0] for seq in (2, 3, 4, 5, 6)]
    assert [m[0].seq for m in delivered if isinstance(m[0], Message)] == [2, 3, 4, 5, 6]


def test_a_gap_that_keeps_coming_back_is_reported_after_a_few_fills() -> None:
    """A replay cut short again and again (an outbox too small for it) is asked for
    MAX_FILLS times, then reported as a gap, and the stream goes on."""
    tracker = Tracker.of(["t"])
    tracker.handle(ack("t", "e", 0))
    tracker.handle(message("t", 1))
    since = '{"op":"subscribe","topic":"t","since":{"epoch":"e","seq":1}}'
    for _ in range(MAX_FILLS):
        assert tracker.handle(message("t", 9)) == ([], since)
        assert tracker.handle(ack("t", "e", 9, recovered=True)) == ([], None)
    assert tracker.handle(message("t", 9)) == (
        [Gap("t", Position("e", 1), Position("e", 9)), Message("t", "e", 9, 9)],
        None,
    )
    assert tracker.handle(message("t", 10)) == ([Message("t", "e", 10, 10)], None)
    assert tracker.handle(message("t", 12)) == ([], since.replace("1}", "10}"))


def test_the_tracker_reports_what_cannot_be_recovered() -> None:
    """recovered: false (a restarted server's new epoch) yields a Gap and moves on."""
    tracker = Tracker.of(["t"])
    tracker.handle(ack("t", "old", 0))
    tracker.handle(message("t", 1))
    out, _ = tracker.handle(ack("t", "new", 0, recovered=False))
    assert out == [Gap("t", Position("old", 1), Position("new", 0))]
    assert tracker.handle(message("t", 1)) == ([Message("t", "new", 1, 1)], None)


def test_the_tracker_raises_on_error_frames_and_decodes_base64() -> None:
    """Error frames raise ClientError; base64 data comes out as bytes."""
    tracker = Tracker.of(["t"])
    with pytest.raises(ClientError, match="forbidden_topic"):
        tracker.handle({"op": "error", "error": "forbidden_topic", "detail": "no"})
    tracker.handle(ack("t", "e", 0))
    envelope = {"topic": "t", "seq": 1, "data": "AP8=", "encoding": "base64"}
    assert tracker.handle(envelope)[0] == [Message("t", "e", 1, b"\x00\xff")]


async def publish(live: LiveServer, topic: str, numbers: range) -> None:
    """POST each number to ``topic``."""
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        for n in numbers:
            assert (await http.post(f"/publish/{topic}", json=n)).status_code == 200


async def test_the_client_resumes_after_an_abrupt_drop_missing_nothing() -> None:
    """A client whose connection drops resumes with since and gets every message once."""
    async with running_server(Settings(log_format="json")) as live:
        received: list[Message | Gap] = []
        subscriber = Client(live.ws_url(), ["a", "b"], backoff_min=0.01, backoff_max=0.05)
        hub = live.broadcaster.hub

        async def first_publish() -> None:
            await wait_until(lambda: set(hub.statistics().topics) == {"a", "b"})
            await publish(live, "a", range(1))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first_publish)
                async for item in subscriber:
                    received.append(item)
                    if len(received) == 1:
                        subscriber.abort()
                        # Published while the client is away (or already back: either way).
                        await publish(live, "a", range(1, 5))
                        await publish(live, "b", range(2))
                    if len(received) == 7:
                        break
            await subscriber.close()
    assert subscriber.connects == 2
    assert all(isinstance(item, Message) for item in received)
    by_topic = {
        topic: [(m.seq, m.data) for m in received if isinstance(m, Message) and m.topic == topic]
        for topic in ("a", "b")
    }
    assert by_topic == {"a": [(n + 1, n) for n in range(5)], "b": [(1, 0), (2, 1)]}
    assert subscriber.positions()["a"] == Position(received[0].epoch, 5)  # type: ignore[union-attr]


async def test_a_refused_client_raises_client_error() -> None:
    """A server that refuses the handshake with 403 ends the iteration with ClientError."""
    async with running_server(Settings(log_format="json", jwt_secret=JWT_SECRET)) as live:
        with anyio.fail_after(10), pytest.raises(ClientError, match="403"):
            async for _ in Client(live.ws_url(), ["t"]):
                pass


def caught_up(seen: list[list[int]], count: int) -> bool:
    """Whether every client has received at least ``count`` messages."""
    return min(len(messages) for messages in seen) >= count


async def test_clients_dropping_at_random_while_publishes_stream_miss_nothing() -> None:
    """Ten clients that drop abruptly at random and resume each get every seq once, in order."""
    total, clients = 300, 10
    async with running_server(Settings(log_format="json")) as live:
        hub = live.broadcaster.hub
        seen: list[list[int]] = [[] for _ in range(clients)]
        gaps: list[Gap] = []

        async def follow(index: int) -> None:
            chooser = random.Random(index)
            subscriber = Client(live.ws_url(), ["feed"], backoff_min=0.005, backoff_max=0.02)
            drop_after = chooser.randint(1, 30)
            async for item in subscriber:
                if isinstance(item, Gap):
                    gaps.append(item)
                    continue
                seen[index].append(item.seq)
                if item.seq == total:
                    break
                drop_after -= 1
                if drop_after == 0:
                    subscriber.abort()
                    drop_after = chooser.randint(1, 30)
            await subscriber.close()

        async def publisher() -> None:
            await wait_until(lambda: hub.statistics().topics.get("feed") == clients)
            for n in range(total):
                await live.broadcaster.publish("feed", n)
                if n % 10 == 9:
                    # Let the clients fall at most a little behind, so that drops and
                    # resumes happen while publishing goes on.
                    await wait_until(partial(caught_up, seen, n - 40))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(clients):
                    tg.start_soon(follow, index)
                tg.start_soon(publisher)
        recoveries = hub.statistics().recoveries
    assert gaps == []
    assert seen == [list(range(1, total + 1))] * clients
    assert recoveries["recovered"] >= clients
    assert set(recoveries) == {"recovered"}
