"""The operators' views: the admin token on ``/connections``, ``/topics`` and ``/dashboard``,
the dashboard's stream of snapshots, and the page itself in a real browser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from pydantic import ValidationError

from broadcaster.app import create_app
from broadcaster.settings import Settings, describe_errors
from tests.support import client, running_server, scrape, sse_events, subscribe

if TYPE_CHECKING:
    from playwright.async_api import Browser

    from tests.support import LiveServer

ADMIN_TOKEN = "admin-token-0123456789"
ADMIN_PATHS = ["/topics", "/connections", "/dashboard", "/dashboard/events"]
# Where the browser test leaves its screenshot (ignored by git, like every PNG).
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


async def get(settings: Settings, path: str, host: str, **options: object) -> httpx.Response:
    """Ask an app that is not running, from a client at ``host``."""
    transport = httpx.ASGITransport(create_app(settings), client=(host, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.get(path, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_without_an_admin_token_only_loopback_may_look(path: str) -> None:
    """With no admin token set, a client that is not on loopback gets 403 saying why."""
    response = await get(Settings(log_format="json"), path, "203.0.113.7")
    assert response.status_code == 403
    assert response.json()["error"] == "admin_loopback_only"
    assert "BROADCASTER_ADMIN_TOKEN" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/topics", "/connections", "/dashboard"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_without_an_admin_token_loopback_may_look(path: str, host: str) -> None:
    """With no admin token set, loopback clients see the operators' views."""
    assert (await get(Settings(log_format="json"), path, host)).status_code == 200


@pytest.mark.parametrize("path", ADMIN_PATHS)
@pytest.mark.parametrize(
    ("options", "status", "error"),
    [
        ({}, 401, "missing_admin_token"),
        (
            {"headers": {"Authorization": "Bearer wrong-token-0123456789"}},
            403,
            "invalid_admin_token",
        ),
        ({"params": {"token": "wrong-token-0123456789"}}, 403, "invalid_admin_token"),
    ],
)
async def test_with_an_admin_token_everyone_must_present_it(
    path: str, options: dict[str, object], status: int, error: str
) -> None:
    """With an admin token set, even loopback clients are refused without it."""
    settings = Settings(log_format="json", admin_token=ADMIN_TOKEN)
    response = await get(settings, path, "127.0.0.1", **options)
    assert (response.status_code, response.json()["error"]) == (status, error)
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="broadcaster"'


@pytest.mark.parametrize(
    "options",
    [{"headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}, {"params": {"token": ADMIN_TOKEN}}],
)
async def test_the_admin_token_opens_the_views_from_anywhere(options: dict[str, object]) -> None:
    """The admin token, as a header or in the query, lets any address in."""
    settings = Settings(log_format="json", admin_token=ADMIN_TOKEN)
    for path in ("/topics", "/connections", "/dashboard"):
        response = await get(settings, path, "203.0.113.7", **options)
        assert response.status_code == 200, path
    page = await get(settings, "/dashboard", "203.0.113.7", **options)
    assert page.headers["content-type"].startswith("text/html")
    assert "dashboard.js" in page.text
    script = await get(settings, "/dashboard.js", "203.0.113.7")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "dashboard/events" in script.text


def test_the_admin_token_is_a_secret_of_some_length() -> None:
    """A short admin token is refused at start without showing it; an empty one is unset."""
    with pytest.raises(ValidationError) as error:
        Settings(admin_token="short")
    assert describe_errors(error.value) == [
        "BROADCASTER_ADMIN_TOKEN=<hidden>: Value error, a secret needs at least 16 characters"
    ]
    assert Settings(admin_token="").admin_token is None
    assert ADMIN_TOKEN not in repr(Settings(admin_token=ADMIN_TOKEN))


async def test_refusals_are_counted() -> None:
    """A refused look at an operators' view shows in ``broadcaster_refused``."""
    settings = Settings(log_format="json", admin_token=ADMIN_TOKEN)
    async with running_server(settings) as live, httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(live.http_url + "/topics")).status_code == 401
        samples = await scrape(live)
    assert samples[("broadcaster_refused_total", (("reason", "missing_admin_token"),))] == 1


async def next_snapshot(live: LiveServer, path: str = "/dashboard/events") -> dict[str, Any]:
    async with (
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
        http.stream("GET", path) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        with anyio.fail_after(10):
            async for event in sse_events(response):
                snapshot: dict[str, Any] = event.json()
                return snapshot
    raise AssertionError("the stream ended")


async def test_snapshots_hold_the_metrics_the_slowest_connections_and_the_backplane() -> None:
    """Each snapshot carries the numbers ``/metrics`` shows, the connections and the backplane."""
    async with running_server() as live, client(live.ws_url()) as ws:
        await subscribe(ws, "a", "b")
        async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
            for _ in range(3):
                assert (await http.post("/publish/a", json=1)).status_code == 200
        snapshot = await next_snapshot(live)
        samples = await scrape(live)
    metrics = snapshot["metrics"]
    assert metrics["broadcaster_connections"] == samples[("broadcaster_connections", ())] == 1
    assert metrics["broadcaster_topics"] == 2
    published = ("broadcaster_messages_published_total", (("source", "http"),))
    assert metrics["broadcaster_messages_published_total"] == {"http": samples[published]}
    assert samples[published] == 3
    assert not any(name.endswith("_bucket") for name in metrics)
    assert [(row["mode"], row["subscriptions"]) for row in snapshot["connections"]] == [("mux", 2)]
    assert snapshot["backplane"] is None


async def dashboard_matches_metrics(live: LiveServer, browser: Browser) -> None:
    """Open the dashboard and wait until it shows what ``/metrics`` says."""
    page = await browser.new_page()
    try:
        await page.goto(live.http_url + "/dashboard")
        samples = await scrape(live)
        published = sum(v for (name, _), v in samples.items() if name.endswith("published_total"))
        expected = {
            "connections": samples[("broadcaster_connections", ())],
            "topics": samples[("broadcaster_topics", ())],
            "published": published,
        }
        shown = {name: f"{value:,.0f}".replace(",", " ") for name, value in expected.items()}
        await page.wait_for_function(
            """(shown) => Object.entries(shown).every(
                ([id, text]) => document.getElementById(id).textContent === text)""",
            arg=shown,
            timeout=10_000,
        )
        assert await page.text_content("#status") == "live"
    finally:
        await page.close()


async def test_the_dashboard_shows_the_numbers_of_metrics(browser: Browser) -> None:
    """In a browser, the dashboard shows the connections, topics and publishes of /metrics."""
    async with running_server() as live, client(live.ws_url()) as ws:
        await subscribe(ws, "a", "b", "c")
        async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
            for value in range(5):
                assert (await http.post("/publish/a", json=value)).status_code == 200
        await dashboard_matches_metrics(live, browser)


async def test_a_screenshot_of_the_dashboard_under_load(browser: Browser) -> None:
    """With subscribers and a stream of publishes, the page's rates move; the screenshot is
    saved as ``artifacts/dashboard.png``."""
    async with running_server() as live, anyio.create_task_group() as tg:
        for index in range(8):
            tg.start_soon(subscriber, live, f"load.{index % 3}")
        done = anyio.Event()
        tg.start_soon(publisher, live, done)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            await page.goto(live.http_url + "/dashboard")
            await page.wait_for_function(
                """() => document.getElementById("connections").textContent === "8"
                    && document.getElementById("publish-rate").textContent !== "0.0"
                    && Number(document.body.dataset.snapshots) >= 4""",
                timeout=20_000,
            )
            rate = await page.text_content("#publish-rate")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)
        finally:
            await page.close()
            done.set()
            tg.cancel_scope.cancel()
    assert rate is not None
    assert float(rate.replace(" ", "")) > 0
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


async def subscriber(live: LiveServer, topic: str) -> None:
    async with client(live.ws_url()) as ws:
        await subscribe(ws, topic)
        async for _ in ws:
            pass


async def publisher(live: LiveServer, done: anyio.Event) -> None:
    """Publish to the load topics in turn until ``done`` (at most 100 000 messages)."""
    async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
        for count in range(100_000):
            if done.is_set():
                return
            body = json.dumps({"n": count})
            await http.post(f"/publish/load.{count % 3}", content=body)


async def test_the_stream_ends_once_a_drain_is_done() -> None:
    """After SIGTERM's drain the dashboard's stream ends, so that it does not hold the server."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
        http.stream("GET", "/dashboard/events") as response,
    ):
        events = sse_events(response)
        with anyio.fail_after(10):
            first = await anext(events)
            assert "broadcaster_connections" in first.json()["metrics"]
            drained = anyio.Event()
            live.broadcaster.request_drain(drained.set)
            await drained.wait()
            left = [event async for event in events]
        assert len(left) <= 2  # the snapshots written while the drain ran
