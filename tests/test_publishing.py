"""``POST /publish/{topic}`` served before FastAPI's machinery, with the same contract."""

from __future__ import annotations

import anyio
import httpx
from fastapi import FastAPI

from broadcaster.app import Broadcaster
from broadcaster.settings import Settings
from tests.support import running_server, scrape


async def test_receipts_refusals_and_counts() -> None:
    """A publish gets its receipt; an invalid topic and bad JSON get 400, and are counted."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        good = await http.post("/publish/news", json={"a": 1})
        bad_topic = await http.post("/publish/bad!topic", content="x")
        bad_json = await http.post(
            "/publish/news", content="{", headers={"content-type": "application/json"}
        )
        samples = await scrape(live)
    assert good.status_code == 200
    assert good.json()["seq"] == 1
    assert good.json()["subscribers"] == 0
    assert (bad_topic.status_code, bad_json.status_code) == (400, 400)
    assert "detail" in bad_topic.json()
    assert bad_json.json()["detail"].startswith("the body is not valid JSON")
    assert samples[("broadcaster_refused_total", (("reason", "invalid_topic"),))] == 1


async def test_a_publish_when_the_hub_is_not_running_is_a_503() -> None:
    """Without a running hub a publish is refused with 503 and Retry-After, not a 500."""
    live = Broadcaster(Settings(log_format="json"))
    scope = {"type": "http", "method": "POST", "headers": [], "client": ("127.0.0.1", 1)}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"x", "more_body": False}

    with anyio.fail_after(5):
        response = await live.publishing.respond("news", scope, receive)
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")


async def test_the_route_stays_documented_and_served_where_the_router_is_mounted() -> None:
    """An app that mounts the router gets the same publish, and the schema describes it."""
    live = Broadcaster(Settings(log_format="json"))
    app = FastAPI()
    app.include_router(live.router, prefix="/live")
    transport = httpx.ASGITransport(app=app)
    async with (
        live.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://test") as http,
    ):
        response = await http.post("/live/publish/news", content="hello")
        schema = (await http.get("/openapi.json")).json()
    assert (response.status_code, response.json()["topic"]) == (200, "news")
    assert "/live/publish/{topic}" in schema["paths"]


async def test_a_plain_request_on_a_websocket_path_is_told_to_upgrade() -> None:
    """``GET /ws`` and ``GET /ws/{topic}`` without an upgrade get 426 and a hint, not 404."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        answers = [await http.get(path) for path in ("/ws", "/ws/news")]
        missing = await http.get("/ws/a/b")
    for answer in answers:
        assert (answer.status_code, answer.headers["upgrade"]) == (426, "websocket")
        assert answer.json()["error"] == "upgrade_required"
    assert missing.status_code == 404
