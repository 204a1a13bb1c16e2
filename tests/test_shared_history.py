"""History shared by two nodes through a real Redis: one sequence, resumes across nodes,
a Redis that lost its data, a Redis that is down."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from tests.brokers import running_broker
from tests.support import (
    client,
    receive_envelopes,
    receive_json,
    running_server,
    scrape,
    subscribe,
    wait_until,
)
from tests.test_backplane import bridge, node_settings, two_nodes

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

COUNT = 300


async def subscribe_since(
    connection: ClientConnection, topic: str, since: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """Subscribe (resuming from ``since`` if given) and return the ``subscribed`` answer."""
    command: dict[str, Any] = {"op": "subscribe", "topic": topic, **extra}
    if since is not None:
        command["since"] = since
    await connection.send(json.dumps(command))
    answer: dict[str, Any] = await receive_json(connection)
    assert answer["op"] == "subscribed", answer
    return answer


async def receive_until(connection: ClientConnection, seq: int) -> list[dict[str, Any]]:
    """Receive envelopes until the one at ``seq``."""
    envelopes: list[dict[str, Any]] = []
    with anyio.fail_after(20):
        while not envelopes or envelopes[-1]["seq"] < seq:
            envelopes.extend(await receive_envelopes(connection, 1))
    return envelopes


async def test_publishes_on_both_nodes_carry_one_sequence_seen_alike_everywhere() -> None:
    """Messages published on both nodes at once get one (epoch, seq) sequence from Redis, and
    every client of both nodes receives it identically, in seq order, each message once."""
    async with (
        two_nodes("redis") as (_, (a, on_a), (b, on_b)),
        client(a.ws_url()) as second_on_a,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        first = await subscribe_since(second_on_a, "feed")
        assert first["seq"] == 0
        receipts: list[dict[str, Any]] = []

        async def publish(base: str, node: str) -> None:
            for n in range(COUNT // 2):
                answer = await http.post(f"{base}/publish/feed", json={"node": node, "n": n})
                assert answer.status_code == 200, answer.text
                receipts.append(answer.json())

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish, a.http_url, "a")
            tg.start_soon(publish, b.http_url, "b")
        seen = [await receive_envelopes(c, COUNT) for c in (on_a, second_on_a, on_b)]
        assert seen[0] == seen[1] == seen[2]
        assert [envelope["seq"] for envelope in seen[0]] == list(range(1, COUNT + 1))
        # Each node's own publishes come back in the order it made them.
        for node in ("a", "b"):
            ours = [e["data"]["n"] for e in seen[0] if e["data"]["node"] == node]
            assert ours == list(range(COUNT // 2))
        # Each receipt names the position every client saw the message at.
        assert {r["epoch"] for r in receipts} == {first["epoch"]}
        by_seq = {e["seq"]: e["data"] for e in seen[0]}
        assert sorted(r["seq"] for r in receipts) == list(range(1, COUNT + 1))
        # Either node reads the same history from Redis, and rewinds from it.
        page = (await http.get(f"{b.http_url}/history/feed", params={"limit": 5})).json()
        assert page["epoch"] == first["epoch"]
        assert page["seq"] == COUNT
        assert [m["seq"] for m in page["messages"]] == list(range(COUNT - 4, COUNT + 1))
        assert [m["data"] for m in page["messages"]] == [by_seq[s] for s in range(296, 301)]
        since = {"since": 10, "epoch": first["epoch"], "limit": 3}
        page = (await http.get(f"{a.http_url}/history/feed", params=since)).json()
        assert page["recovered"] is True
        assert [m["seq"] for m in page["messages"]] == [11, 12, 13]
        async with client(b.ws_url()) as rewinding:
            answer = await subscribe_since(rewinding, "feed", last=3)
            assert answer == {
                "op": "subscribed",
                "topic": "feed",
                "epoch": first["epoch"],
                "seq": COUNT,
                "recovered": True,
            }
            rewound = await receive_envelopes(rewinding, 3)
            assert [e["seq"] for e in rewound] == [COUNT - 2, COUNT - 1, COUNT]


async def test_a_client_resumes_on_the_other_node_while_publishes_race() -> None:
    """A client cut off on node A resumes with since on node B, which has no subscriber of the
    topic yet, while both nodes publish: it gets recovered: true and every message it missed
    exactly once, in order, then the live ones."""
    async with (
        two_nodes("redis") as (_, (a, _on_a), (b, _on_b)),
        httpx.AsyncClient(trust_env=False) as http,
    ):
        halfway, answered, published = anyio.Event(), anyio.Event(), anyio.Event()

        async def publish() -> None:
            for n in range(COUNT):
                if n == COUNT // 2:
                    halfway.set()
                if n == COUNT * 3 // 4:
                    # The resume raced with a quarter of the publishes; the rest follow it.
                    await answered.wait()
                base = a.http_url if n % 2 else b.http_url
                answer = await http.post(f"{base}/publish/race", json={"n": n})
                assert answer.status_code == 200, answer.text
            published.set()

        async with client(a.ws_url()) as leaving:
            start = await subscribe_since(leaving, "race")
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                before = await receive_envelopes(leaving, 40)
                await leaving.close()
                await halfway.wait()
                assert "race" not in b.broadcaster.hub.statistics().topics
                async with client(b.ws_url()) as resuming:
                    position = {"epoch": start["epoch"], "seq": before[-1]["seq"]}
                    answer = await subscribe_since(resuming, "race", position)
                    answered.set()
                    assert answer["recovered"] is True
                    assert answer["epoch"] == start["epoch"]
                    assert not published.is_set()
                    after = await receive_until(resuming, COUNT)
        seqs = [e["seq"] for e in before + after]
        assert seqs == list(range(1, COUNT + 1))
        assert [e["data"]["n"] for e in before + after] == list(range(COUNT))


async def test_a_redis_restarted_without_its_data_starts_a_new_epoch() -> None:
    """Redis restarted empty: a resume gets recovered: false and a new epoch, and live
    subscribers are told of the new epoch before its first message."""
    async with (
        two_nodes("redis") as (broker, (a, on_a), (b, _)),
        httpx.AsyncClient(base_url=a.http_url, trust_env=False) as http_a,
    ):
        for n in range(3):
            await http_a.post("/publish/feed", json={"n": n})
        old = await receive_envelopes(on_a, 3)
        async with client(b.ws_url()) as probe:
            epoch = (await subscribe_since(probe, "feed"))["epoch"]
        links = bridge(a).statistics().links, bridge(b).statistics().links
        broker.kill()
        await broker.start()
        await wait_until(lambda: bridge(a).statistics().links > links[0])
        await wait_until(lambda: bridge(b).statistics().links > links[1])
        async with client(b.ws_url()) as resuming:
            answer = await subscribe_since(
                resuming, "feed", {"epoch": epoch, "seq": old[-1]["seq"]}
            )
            assert answer["recovered"] is False
            assert answer["epoch"] != epoch
            assert answer["seq"] == 0
            assert (await http_a.post("/publish/feed", json={"n": 3})).status_code == 200
            assert await receive_envelopes(resuming, 1) == [
                {"topic": "feed", "seq": 1, "data": {"n": 3}}
            ]
        notice = await receive_json(on_a)
        assert notice == {
            "op": "subscribed",
            "topic": "feed",
            "epoch": answer["epoch"],
            "seq": 0,
            "recovered": False,
        }
        assert await receive_envelopes(on_a, 1) == [{"topic": "feed", "seq": 1, "data": {"n": 3}}]


async def test_publishes_are_refused_while_redis_is_down() -> None:
    """With Redis down, HTTP publishes get 503 and WebSocket publishes a backplane_down error
    frame, both counted; no node hands out a position of its own."""
    async with (
        running_broker("redis") as broker,
        running_server(node_settings(broker.url)) as node,
        client(node.ws_url()) as publisher,
        httpx.AsyncClient(base_url=node.http_url, trust_env=False) as http,
    ):
        await subscribe(publisher, "feed")
        broker.kill()
        await wait_until(lambda: not bridge(node).statistics().up)
        refused = await http.post("/publish/feed", json={"n": 0})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "down" in refused.json()["detail"]
        await publisher.send(json.dumps({"op": "publish", "topic": "feed", "data": 1}))
        error = await receive_json(publisher)
        assert error["op"] == "error"
        assert error["error"] == "backplane_down"
        history = await http.get("/history/feed")
        assert history.status_code == 503
        samples = await scrape(node)
        assert samples[("broadcaster_refused_total", (("reason", "backplane_down"),))] == 2
        # A subscribe meanwhile waits for Redis, which alone knows the topic's position.
        await publisher.send(json.dumps({"op": "subscribe", "topic": "other"}))
        await wait_until(lambda: "other" in node.broadcaster.hub.statistics().topics)
        await broker.start()
        await wait_until(lambda: bridge(node).statistics().up)
        waited = await receive_json(publisher)
        assert (waited["op"], waited["topic"], waited["seq"]) == ("subscribed", "other", 0)
        accepted = await http.post("/publish/feed", json={"n": 1})
        assert accepted.status_code == 200
        assert accepted.json()["seq"] == 1
        # Redis came back empty: a new epoch, announced before its first message.
        notice = await receive_json(publisher)
        assert notice["op"] == "subscribed"
        assert (notice["epoch"], notice["seq"], notice["recovered"]) == (
            accepted.json()["epoch"],
            0,
            False,
        )
        assert await receive_envelopes(publisher, 1) == [
            {"topic": "feed", "seq": 1, "data": {"n": 1}}
        ]


async def test_history_size_bounds_what_every_node_replays() -> None:
    """With HISTORY_SIZE=5 a resume past the latest 5 is not recovered on any node, one within
    them is, and GET /history and a raw ?last=K read the same bounded stream."""
    async with (
        two_nodes("redis", history_size=5) as (_, (a, on_a), (b, _)),
        httpx.AsyncClient(trust_env=False) as http,
    ):
        for n in range(20):
            await http.post(f"{a.http_url}/publish/feed", json={"n": n})
        epoch = (await http.get(f"{a.http_url}/history/feed")).json()["epoch"]
        assert [e["seq"] for e in await receive_envelopes(on_a, 20)] == list(range(1, 21))
        async with client(b.ws_url()) as late:
            answer = await subscribe_since(late, "feed", {"epoch": epoch, "seq": 10})
            assert (answer["recovered"], answer["seq"]) == (False, 20)
        async with client(b.ws_url()) as recent:
            answer = await subscribe_since(recent, "feed", {"epoch": epoch, "seq": 16})
            assert answer["recovered"] is True
            assert [e["seq"] for e in await receive_envelopes(recent, 4)] == [17, 18, 19, 20]
        page = (await http.get(f"{b.http_url}/history/feed", params={"limit": 10})).json()
        assert [m["data"]["n"] for m in page["messages"]] == [15, 16, 17, 18, 19]
        async with client(b.ws_url("/ws/feed?last=2")) as raw:
            with anyio.fail_after(10):
                assert [json.loads(await raw.recv()) for _ in range(2)] == [{"n": 18}, {"n": 19}]
