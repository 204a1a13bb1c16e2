"""Publishes over ``/ws`` that ask for an ack: the position comes back, or an error with the
same ``id``."""

from __future__ import annotations

import json
from unittest.mock import ANY

import pytest

from broadcaster.settings import Settings
from tests.support import (
    JWT_SECRET,
    client,
    receive_envelopes,
    receive_json,
    running_server,
    subscribe,
    token,
)


def publish(topic: object, data: object = 1, **fields: object) -> str:
    return json.dumps({"op": "publish", "topic": topic, "data": data, **fields})


@pytest.mark.parametrize("plain_asgi", [False, True], ids=["fastlane", "plain"])
async def test_acks_carry_the_position_in_order(plain_asgi: bool) -> None:
    """Many publishes with ids, sent without waiting, are acked in order with the epoch and
    seq their subscribers see, even past a full hub mailbox; a publish without an id gets no
    answer."""
    settings = Settings(log_format="json", hub_mailbox_size=2)
    async with (
        running_server(settings, plain_asgi=plain_asgi) as live,
        client(live.ws_url()) as reader,
        client(live.ws_url()) as writer,
    ):
        await subscribe(reader, "news")
        await writer.send(publish("news", "quiet"))
        for n in range(200):
            await writer.send(publish("news", n, id=n if n % 2 else f"m{n}"))
        acks = [await receive_json(writer) for _ in range(200)]
        delivered = await receive_envelopes(reader, 201)
    assert acks[:2] == [
        {"op": "ack", "id": "m0", "topic": "news", "epoch": ANY, "seq": 2},
        {"op": "ack", "id": 1, "topic": "news", "epoch": ANY, "seq": 3},
    ]
    assert [ack["seq"] for ack in acks] == [e["seq"] for e in delivered[1:]]
    assert {ack["epoch"] for ack in acks} == {acks[0]["epoch"]}


async def test_a_refused_publish_is_answered_with_its_id() -> None:
    """A forbidden topic, a bad topic and missing data are errors carrying the publish's id;
    an id that is not one is ``invalid_id``; the connection stays open."""
    grant = token(subscribe=["*"], publish=["news"])
    settings = Settings(log_format="json", jwt_secret=JWT_SECRET)
    async with running_server(settings) as live, client(live.ws_url(f"/ws?token={grant}")) as ws:
        answers = []
        for frame in (
            publish("sport", id=1),
            publish("bad topic", id="two"),
            json.dumps({"op": "publish", "topic": "news", "id": 3}),
            publish("news", id=[4]),
            publish("news", id="x" * 65),
            publish("news", id=-1),
            publish("news", id=7),
        ):
            await ws.send(frame)
            answers.append(await receive_json(ws))
    assert [(a["op"], a.get("id"), a.get("error")) for a in answers] == [
        ("error", 1, "forbidden_topic"),
        ("error", "two", "invalid_topic"),
        ("error", 3, "missing_field"),
        ("error", None, "invalid_id"),
        ("error", None, "invalid_id"),
        ("error", None, "invalid_id"),
        ("ack", 7, None),
    ]


async def test_a_server_without_client_publishes_refuses_with_the_id() -> None:
    """With client publishes off, a publish asking for an ack gets ``publish_disabled``."""
    settings = Settings(log_format="json", client_publish=False)
    async with running_server(settings) as live, client(live.ws_url()) as ws:
        await ws.send(publish("news", id="a"))
        answer = await receive_json(ws)
    assert (answer["id"], answer["error"]) == ("a", "publish_disabled")
