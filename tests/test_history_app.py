"""Streams over the wire: resume, rewind, GET /history, receipts, restarts and metrics."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import httpx
import pytest

from tests.support import (
    JWT_SECRET,
    client,
    handshake_refusal,
    json_settings,
    receive_envelopes,
    receive_json,
    running_server,
    scrape,
    token,
)

if TYPE_CHECKING:
    from tests.support import LiveServer


async def publish(live: LiveServer, topic: str, count: int, first: int = 0) -> dict[str, Any]:
    """POST ``count`` JSON numbers to ``topic``; return the last receipt."""
    receipt: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        for n in range(first, first + count):
            response = await http.post(f"/publish/{topic}", json=n)
            assert response.status_code == 200
            receipt = response.json()
    return receipt


async def history(live: LiveServer, path: str, **headers: str) -> httpx.Response:
    """GET a /history path."""
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        return await http.get(path, headers=headers)


async def test_publish_receipts_carry_the_position_even_without_subscribers() -> None:
    """POST /publish answers the topic's epoch and seq, which rises with every publish."""
    async with running_server(json_settings()) as live:
        first = await publish(live, "t", 1)
        second = await publish(live, "t", 1)
    assert first == {"topic": "t", "epoch": ANY, "seq": 1, "subscribers": 0}
    assert second == {**first, "seq": 2}


async def test_a_reconnecting_client_resumes_with_since() -> None:
    """A client that reconnects with since gets recovered: true and exactly what it missed."""
    async with running_server(json_settings()) as live:
        async with client(live.ws_url()) as first:
            await first.send('{"op":"subscribe","topic":"t"}')
            ack = await receive_json(first)
            assert ack == {"op": "subscribed", "topic": "t", "epoch": ANY, "seq": 0}
            await publish(live, "t", 3)
            seen = await receive_envelopes(first, 3)
        await publish(live, "t", 2, first=3)
        async with client(live.ws_url()) as second:
            since = {"epoch": ack["epoch"], "seq": seen[-1]["seq"]}
            await second.send(json.dumps({"op": "subscribe", "topic": "t", "since": since}))
            assert await receive_json(second) == {
                "op": "subscribed",
                "topic": "t",
                "epoch": ack["epoch"],
                "seq": 5,
                "recovered": True,
            }
            await publish(live, "t", 1, first=5)
            rest = await receive_envelopes(second, 3)
        samples = await scrape(live)
    assert [m["data"] for m in seen + rest] == list(range(6))
    assert [m["seq"] for m in seen + rest] == list(range(1, 7))
    assert samples[("broadcaster_recoveries_total", (("outcome", "recovered"),))] == 1
    assert samples[("broadcaster_history_messages", ())] == 6
    assert samples[("broadcaster_history_bytes", ())] > 0
    assert samples[("broadcaster_history_streams", ())] == 1


async def test_a_restarted_server_answers_recovered_false_with_a_new_epoch() -> None:
    """History lives in memory: after a restart a resume is not recovered, under a new epoch."""
    async with running_server(json_settings()) as before:
        receipt = await publish(before, "t", 3)
    async with running_server(json_settings()) as after, client(after.ws_url()) as connection:
        since = {"epoch": receipt["epoch"], "seq": receipt["seq"]}
        await connection.send(json.dumps({"op": "subscribe", "topic": "t", "since": since}))
        ack = await receive_json(connection)
    assert ack["recovered"] is False
    assert ack["epoch"] != receipt["epoch"]
    assert ack["seq"] == 0


async def test_bad_since_and_last_get_error_frames_and_the_connection_stays() -> None:
    """Malformed since or last are answered with error frames; the connection goes on."""
    async with running_server(json_settings()) as live, client(live.ws_url()) as connection:
        bad = [
            ('{"op":"subscribe","topic":"t","since":{"epoch":"e","seq":-1}}', "invalid_since"),
            ('{"op":"subscribe","topic":"t","since":"nope"}', "invalid_since"),
            ('{"op":"subscribe","topic":"t","last":"all"}', "invalid_last"),
            ('{"op":"subscribe","topic":"t","last":1,"since":{"epoch":"e","seq":1}}', None),
        ]
        for frame, code in bad:
            await connection.send(frame)
            answer = await receive_json(connection)
            assert answer["op"] == "error"
            assert answer["error"] == (code or "invalid_since")
        await connection.send('{"op":"subscribe","topic":"t","last":5}')
        assert (await receive_json(connection))["recovered"] is True


async def test_raw_last_replays_the_latest_frames() -> None:
    """/ws/{topic}?last=K sends the latest K messages, then live ones."""
    async with running_server(json_settings()) as live:
        await publish(live, "t", 5)
        async with client(live.ws_url("/ws/t?last=2")) as raw:
            assert [await raw.recv() for _ in range(2)] == ["3", "4"]
            await publish(live, "t", 1, first=5)
            assert await raw.recv() == "5"


@pytest.mark.parametrize("value", ["", "-1", "x", "1.5", "99999999999999999999"])
async def test_raw_last_that_is_not_a_count_is_refused_with_400(value: str) -> None:
    """A bad ?last= refuses the handshake with 400 invalid_last."""
    async with running_server(json_settings()) as live:
        status, error, _ = await handshake_refusal(live.ws_url(f"/ws/t?last={value}"))
    assert (status, error) == (400, "invalid_last")


async def test_history_pages_messages_after_since() -> None:
    """GET /history gives the position and envelopes, after since or the latest ones."""
    async with running_server(json_settings(recovery_max=3)) as live:
        receipt = await publish(live, "t", 5)
        epoch = receipt["epoch"]
        page = (await history(live, f"/history/t?since=1&epoch={epoch}&limit=2")).json()
        latest = (await history(live, "/history/t")).json()
        lost = (await history(live, "/history/t?since=1&epoch=other")).json()
        fresh = (await history(live, "/history/never")).json()
    assert page == {
        "topic": "t",
        "epoch": epoch,
        "seq": 5,
        "recovered": True,
        "messages": [{"topic": "t", "seq": 2, "data": 1}, {"topic": "t", "seq": 3, "data": 2}],
    }
    assert [m["seq"] for m in latest["messages"]] == [3, 4, 5]
    assert latest["recovered"] is None
    assert (lost["recovered"], lost["messages"]) == (False, [])
    assert (fresh["seq"], fresh["messages"]) == (0, [])


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("?since=1", "invalid_since"),
        ("?epoch=e", "invalid_since"),
        ("?since=-1&epoch=e", "invalid_since"),
        ("?since=x&epoch=e", "invalid_since"),
        ("?since=1&epoch=" + "e" * 65, "invalid_since"),
        ("?limit=0", "invalid_limit"),
        ("?limit=1001", "invalid_limit"),
        ("?limit=abc", "invalid_limit"),
        ("?offset=3", "invalid_query"),
    ],
)
async def test_bad_history_queries_get_400(query: str, error: str) -> None:
    """Every malformed /history query is a 400 that names the error."""
    async with running_server(json_settings()) as live:
        response = await history(live, "/history/t" + query)
    assert response.status_code == 400
    assert response.json()["detail"]["error"] == error


async def test_history_of_an_invalid_topic_is_400() -> None:
    """A topic name outside the grammar is a 400."""
    async with running_server(json_settings()) as live:
        response = await history(live, "/history/bad%20topic")
    assert response.status_code == 400
    assert response.json()["detail"]["error"] == "invalid_topic"


async def test_history_needs_the_grant_to_subscribe() -> None:
    """With JWTs, /history needs a token that may subscribe to the topic."""
    async with running_server(json_settings(jwt_secret=JWT_SECRET)) as live:
        missing = await history(live, "/history/t")
        wrong = await history(
            live, "/history/t", authorization=f"Bearer {token(subscribe=['other'])}"
        )
        right = await history(live, "/history/t", authorization=f"Bearer {token(subscribe=['t'])}")
        by_query = await history(live, f"/history/t?token={token(subscribe=['t'])}")
    assert (missing.status_code, wrong.status_code) == (403, 403)
    assert (right.status_code, by_query.status_code) == (200, 200)


async def test_history_off_keeps_positions_but_no_messages() -> None:
    """HISTORY_SIZE=0: receipts still carry positions; nothing is kept to replay."""
    async with running_server(json_settings(history_size=0)) as live:
        receipt = await publish(live, "t", 3)
        body = (await history(live, f"/history/t?since=0&epoch={receipt['epoch']}")).json()
        samples = await scrape(live)
    assert receipt["seq"] == 3
    assert (body["recovered"], body["messages"]) == (False, [])
    assert samples[("broadcaster_history_messages", ())] == 0


async def test_raw_last_is_ignored_on_the_multiplexed_endpoint() -> None:
    """?last= means nothing on /ws: subscriptions carry their own since or last."""
    async with running_server(json_settings()) as live, client(live.ws_url("/ws?last=x")) as mux:
        await mux.send('{"op":"ping"}')
        assert await receive_json(mux) == {"op": "pong"}
