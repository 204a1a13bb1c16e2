"""``POST /publish``: batches and broadcasts, with a result per item and topic, and every refusal
of the request as a whole and of one item."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

import anyio
import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from broadcaster.app import Broadcaster
from broadcaster.auth import CHALLENGE, Authenticator
from broadcaster.hub import BURST
from broadcaster.publishing import HTTPPublish
from tests.brokers import running_broker
from tests.support import (
    JWT_SECRET,
    PUBLISH_TOKEN,
    client,
    json_settings,
    receive_envelopes,
    receive_json,
    running_server,
    scrape,
    subscribe,
    token,
    wait_until,
)
from tests.test_backplane import bridge, node_settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from starlette.responses import Response
    from websockets.asyncio.client import ClientConnection

    from broadcaster.hub import Hub
    from broadcaster.mailbox import BatchResult, Source
    from broadcaster.protocol import Payload
    from tests.support import LiveServer


async def post(live: LiveServer, body: object, **headers: str) -> httpx.Response:
    """POST a batch: ``body`` as a JSON array unless it is already text."""
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        return await http.post("/publish", content=content, headers=headers)


def positions(answer: httpx.Response) -> list[tuple[int, str, int]]:
    """The (item, topic, seq) of each receipt in a batch's answer."""
    return [(r["item"], r["topic"], r["seq"]) for r in answer.json()["results"] if "seq" in r]


def errors(answer: httpx.Response) -> list[tuple[int, str | None, str]]:
    """The (item, topic, error) of each refused message in a batch's answer."""
    results = answer.json()["results"]
    return [(r["item"], r["topic"], r["error"]) for r in results if "error" in r]


async def test_a_batch_is_published_in_order_with_a_receipt_per_item_and_topic() -> None:
    """Items reach subscribers in order; a broadcast item reaches each of its topics, and every
    message gets its receipt with epoch and seq, in item order."""
    async with running_server() as live, client(live.ws_url()) as ws:
        await subscribe(ws, "a", "b")
        batch = [
            {"topic": "a", "data": 1},
            {"topics": ["a", "b", "c"], "data": {"x": "y"}},
            {"topic": "b", "data": "text"},
        ]
        answer = await post(live, batch)
        delivered = await receive_envelopes(ws, 4)
    assert answer.status_code == 200
    assert (answer.json()["published"], answer.json()["failed"]) == (5, 0)
    assert positions(answer) == [(0, "a", 1), (1, "a", 2), (1, "b", 1), (1, "c", 1), (2, "b", 2)]
    results = answer.json()["results"]
    assert {r["epoch"] for r in results[:2]} == {results[0]["epoch"]}
    assert [r["subscribers"] for r in results] == [1, 1, 1, 0, 1]
    assert [(e["topic"], e["seq"], e["data"]) for e in delivered] == [
        ("a", 1, 1),
        ("a", 2, {"x": "y"}),
        ("b", 1, {"x": "y"}),
        ("b", 2, "text"),
    ]


async def test_json_lines_are_a_batch_and_a_bad_line_is_a_bad_item() -> None:
    """JSON lines publish like an array; a line that is not JSON is refused alone."""
    body = '{"topic":"a","data":1}\n\nnot json\n{"topic":"a","data":2}\n'
    async with running_server() as live:
        answer = await post(live, body, **{"content-type": "application/x-ndjson"})
    assert answer.status_code == 200
    assert positions(answer) == [(0, "a", 1), (2, "a", 2)]
    assert errors(answer) == [(1, None, "invalid_json")]


async def test_a_broadcast_to_a_thousand_topics_is_one_request() -> None:
    """One item naming 1,000 topics publishes once to each, with 1,000 receipts."""
    topics = [f"user.{n}" for n in range(1000)]
    async with running_server() as live:
        answer = await post(live, [{"topics": topics, "data": {"notice": "hello"}}])
    assert answer.status_code == 200
    assert [r["topic"] for r in answer.json()["results"]] == topics
    assert {r["seq"] for r in answer.json()["results"]} == {1}


async def test_bad_items_are_refused_one_by_one_and_the_rest_goes_out() -> None:
    """Each kind of bad item gets its own error in its place; the good items are published
    and the refusals are counted."""
    batch: list[Any] = [
        {"topic": "ok", "data": 0},
        "not an object",
        {"topic": "ok"},
        {"topic": "a", "topics": ["b"], "data": 1},
        {"topics": [], "data": 1},
        {"topics": ["x", "x"], "data": 1},
        {"topic": "bad topic", "data": 1},
        {"topics": ["fine", 7], "data": 1},
        {"topic": "ok", "data": "\ud800"},
        {"topic": "ok", "data": "x" * 2000},
        {"topic": "ok", "data": 1},
    ]
    # A lone surrogate cannot be published: json.dumps escapes it, the server refuses it.
    async with running_server(json_settings(max_message_bytes=1024)) as live:
        answer = await post(live, batch)
        samples = await scrape(live)
    assert answer.status_code == 200
    assert positions(answer) == [(0, "ok", 1), (10, "ok", 2)]
    assert errors(answer) == [
        (1, None, "invalid_item"),
        (2, None, "invalid_item"),
        (3, None, "invalid_item"),
        (4, None, "invalid_item"),
        (5, None, "invalid_item"),
        (6, None, "invalid_topic"),
        (7, None, "invalid_topic"),
        (8, None, "invalid_json"),
        (9, None, "message_too_big"),
    ]
    assert all(r["detail"] for r in answer.json()["results"] if "error" in r)
    assert samples[("broadcaster_refused_total", (("reason", "invalid_item"),))] == 5


async def test_topics_the_token_may_not_publish_to_are_refused_alone() -> None:
    """A JWT granting ``news.*`` publishes there; its other topics are refused per topic,
    within a broadcast too."""
    granted = {"authorization": f"Bearer {token(publish=['news.*'])}"}
    batch = [{"topics": ["news.eu", "sport", "news.us"], "data": 1}, {"topic": "sport", "data": 2}]
    async with running_server(json_settings(jwt_secret=JWT_SECRET)) as live:
        answer = await post(live, batch, **granted)
    assert answer.status_code == 200
    assert positions(answer) == [(0, "news.eu", 1), (0, "news.us", 1)]
    assert errors(answer) == [(0, "sport", "forbidden_topic"), (1, "sport", "forbidden_topic")]


async def test_requests_are_refused_whole_for_their_credential_size_count_and_rate() -> None:
    """401 without a token, 403 with a bad one, 400 for a body that is not a batch, 413 for
    too many bytes or messages, 429 past the rate; nothing of them is published."""
    limits = json_settings(
        publish_tokens=PUBLISH_TOKEN,
        max_batch_bytes=4096,
        max_batch_messages=10,
        max_batch_messages_per_second=15,
    )
    bearer = {"authorization": f"Bearer {PUBLISH_TOKEN}"}
    ten = [{"topics": [f"t{n}" for n in range(5)], "data": n} for n in range(2)]
    async with running_server(limits) as live:
        missing = await post(live, ten)
        forged = await post(live, ten, authorization="Bearer forged-token-0123456789")
        not_array = await post(live, "[1, 2", **bearer)
        empty = await post(live, "\n\n", **bearer)
        too_large = await post(live, [{"topic": "t", "data": "x" * 5000}], **bearer)
        too_many = await post(live, [*ten, {"topic": "t", "data": 0}], **bearer)
        allowed = await post(live, ten, **bearer)
        limited = await post(live, ten, **bearer)
        topics = live.broadcaster.hub.statistics().published
    assert (missing.status_code, missing.headers["www-authenticate"]) == (
        401,
        CHALLENGE["WWW-Authenticate"],
    )
    assert forged.status_code == 403
    assert (not_array.status_code, empty.status_code) == (400, 400)
    assert not_array.json()["detail"].startswith("the body is not a JSON array")
    assert (too_large.status_code, too_many.status_code) == (413, 413)
    assert "at most 10" in too_many.json()["detail"]
    assert allowed.json()["published"] == 10
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
    assert sum(topics.values()) == 10


async def test_a_batch_when_the_hub_is_not_running_is_a_503() -> None:
    """Without a running hub a batch is refused whole with 503 and Retry-After."""
    live = Broadcaster(json_settings())
    scope = {"type": "http", "method": "POST", "headers": [], "client": ("127.0.0.1", 1)}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b'[{"topic":"t","data":1}]', "more_body": False}

    with anyio.fail_after(5):
        response = await live.publishing.respond_batch(scope, receive)
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")


async def test_a_batch_larger_than_the_mailbox_waits_for_room() -> None:
    """A batch of more hub commands (one per BURST messages) than the hub's mailbox holds is
    published whole, in order."""
    count = 4 * BURST + 1
    async with running_server(json_settings(hub_mailbox_size=2)) as live:
        answer = await post(live, [{"topic": "t", "data": n} for n in range(count)])
    assert [seq for _, _, seq in positions(answer)] == list(range(1, count + 1))


async def test_the_batch_route_is_documented_and_served_where_the_router_is_mounted() -> None:
    """An app that mounts the router serves batches too, and the schema describes the route."""
    live = Broadcaster(json_settings())
    app = FastAPI()
    app.include_router(live.router, prefix="/live")
    transport = httpx.ASGITransport(app=app)
    async with (
        live.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://test") as http,
    ):
        response = await http.post("/live/publish", json=[{"topic": "t", "data": 1}])
        schema = (await http.get("/openapi.json")).json()
    assert (response.status_code, response.json()["published"]) == (200, 1)
    assert "post" in schema["paths"]["/live/publish"]


def test_a_full_batch_must_fit_the_rate() -> None:
    """A batch size the rate limit could never admit is refused at start, naming both."""
    with pytest.raises(ValidationError, match="MAX_BATCH_MESSAGES_PER_SECOND"):
        json_settings(max_batch_messages=100, max_batch_messages_per_second=10)


async def test_with_history_on_redis_a_batch_is_numbered_by_redis_or_refused_per_item() -> None:
    """Through Redis, batched messages get the broker's positions; while Redis is down each
    is refused as ``backplane_down`` (and a WebSocket publish with an id gets its error with
    that id), with no position handed out by the node."""
    async with (
        running_broker("redis") as broker,
        running_server(node_settings(broker.url)) as live,
        client(live.ws_url()) as ws,
    ):
        answer = await post(live, [{"topics": ["a", "b"], "data": 1}, {"topic": "a", "data": 2}])
        broker.kill()
        await wait_until(lambda: not bridge(live).statistics().up)
        refused = await post(live, [{"topic": "a", "data": 3}])
        await ws.send(json.dumps({"op": "publish", "topic": "a", "data": 4, "id": "x"}))
        error = await receive_json(ws)
    assert positions(answer) == [(0, "a", 1), (0, "b", 1), (1, "a", 2)]
    assert refused.status_code == 200
    assert errors(refused) == [(0, "a", "backplane_down")]
    assert (error["op"], error["id"], error["error"]) == ("error", "x", "backplane_down")


async def envelope_texts(connection: ClientConnection, count: int) -> str:
    """The text of frames received until they hold ``count`` envelopes, joined."""
    texts: list[str] = []
    envelopes = 0
    while envelopes < count:
        with anyio.fail_after(10):
            text = await connection.recv()
        assert isinstance(text, str)
        frame = json.loads(text)
        envelopes += len(frame) if isinstance(frame, list) else 1
        texts.append(text)
    return "".join(texts)


async def test_data_is_published_as_the_json_text_it_was_sent_as() -> None:
    """Each item's data reaches subscribers spelled as sent (spaces, escapes, number forms, a
    long number), next to items that are not an object or hold an integer of more digits than
    Python's json module reads; a string reaches raw subscribers as itself."""
    spelled = '{"b" : [1, 2.50, "caf\\u00e9"]}'
    long = "1." + "0" * 5000
    huge = "9" * 5000
    body = (
        f'[{{"topic":"a", "data": {spelled} }}, 7, {{"topic":"a","data":{long}}},'
        f' {{"topic":"a","data":[{huge}]}}, {{"topic":"r","data":"caf\\u00e9"}}]'
    )
    async with (
        running_server() as live,
        client(live.ws_url()) as ws,
        client(live.ws_url("/ws/r")) as raw,
    ):
        await subscribe(ws, "a")
        answer = await post(live, body)
        received = await envelope_texts(ws, 2)
        with anyio.fail_after(10):
            text = await raw.recv()
    assert positions(answer) == [(0, "a", 1), (2, "a", 2), (4, "r", 1)]
    assert errors(answer) == [(1, None, "invalid_item"), (3, None, "invalid_json")]
    assert "4300 digits" in answer.json()["results"][3]["detail"]
    assert '{"topic":"a","seq":1,"data":' + spelled + "}" in received
    assert '{"topic":"a","seq":2,"data":' + long + "}" in received
    assert text == "café"


async def test_data_that_is_not_json_refuses_the_array_or_its_line() -> None:
    """NaN, infinities and data nested too deeply refuse a JSON array whole (400
    ``invalid_batch``) and, in JSON lines, their line alone (``invalid_json``); data that is
    not UTF-8 refuses its item alone in either; data nested less deeply is published as
    sent."""
    deep = "[" * 5000 + "]" * 5000
    nested = "[" * 500 + "]" * 500
    lines = "\n".join(
        [
            '{"topic":"a","data":NaN}',
            '{"topic":"a","data":-Infinity}',
            f'{{"topic":"a","data":{deep}}}',
            f'{{"topic":"a","data":{nested}}}',
            '{"topic":"a","data":"caf\xe9"}',
        ]
    )
    async with running_server() as live, client(live.ws_url()) as ws:
        await subscribe(ws, "a")
        nan = await post(live, '[{"topic":"a","data":1},{"topic":"a","data":NaN}]')
        infinity = await post(live, '[{"topic":"a","data":Infinity}]')
        too_deep = await post(live, f'[{{"topic":"a","data":{deep}}}]')
        not_utf8 = await post(live, b'[{"topic":"b","data":1},{"topic":"b","data":"caf\xe9"}]')
        per_line = await post(live, lines.encode("latin-1"))
        received = await envelope_texts(ws, 1)
    for refused, reason in [
        (nan, "NaN is not valid JSON"),
        (infinity, "Infinity is not valid JSON"),
        (too_deep, "nested too deeply"),
    ]:
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_batch")
        assert reason in refused.json()["detail"]
    assert positions(not_utf8) == [(0, "b", 1)]
    assert errors(not_utf8) == [(1, None, "invalid_json")]
    assert "can't decode byte 0xe9" in not_utf8.json()["results"][1]["detail"]
    assert positions(per_line) == [(3, "a", 1)]
    assert errors(per_line) == [(n, None, "invalid_json") for n in (0, 1, 2, 4)]
    assert received == '{"topic":"a","seq":1,"data":' + nested + "}"


class HeldHub:
    """A stand-in for the hub that holds every batch until ``release`` is set, and records for
    each batch it is given how many requests had been answered by then."""

    def __init__(self, answers: dict[str, Response]) -> None:
        self.answered_before: list[int] = []
        self.release = anyio.Event()
        self._answers = answers

    async def publish_batch(
        self, messages: Sequence[tuple[str, Payload]], source: Source
    ) -> list[BatchResult | None]:
        self.answered_before.append(len(self._answers))
        await self.release.wait()
        return [("e", seq, 0) for seq in range(1, len(messages) + 1)]


async def test_batches_are_read_and_published_one_at_a_time() -> None:
    """A batch that arrives while another is being handed to the hub waits for it before it is
    read into items, so that one batch's items are in memory at a time, not every batch's."""
    answers: dict[str, Response] = {}
    hub = HeldHub(answers)
    config = json_settings()
    publishing = HTTPPublish(cast("Hub", hub), Authenticator(config), config, lambda *_: None)
    scope = {"type": "http", "method": "POST", "headers": [], "client": ("127.0.0.1", 1)}
    received: set[str] = set()

    async def publish(topic: str) -> None:
        async def receive() -> dict[str, object]:
            received.add(topic)
            body = json.dumps([{"topic": topic, "data": 1}]).encode()
            return {"type": "http.request", "body": body, "more_body": False}

        answers[topic] = await publishing.respond_batch(scope, receive)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(publish, "a")
        await wait_until(lambda: len(hub.answered_before) == 1)
        tasks.start_soon(publish, "b")
        # Once its body is read, b runs on to the hub with no checkpoint, or waits for a.
        await wait_until(lambda: "b" in received)
        hub.release.set()
    assert hub.answered_before == [0, 1]
    assert [answers[topic].status_code for topic in "ab"] == [200, 200]
