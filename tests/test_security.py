"""End-to-end security: credentials, origins and limits against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from unittest.mock import ANY

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs
from websockets.exceptions import InvalidStatus

from broadcaster.server import warn_if_unauthenticated
from broadcaster.settings import Settings
from tests.support import (
    JWT_SECRET,
    PUBLISH_TOKEN,
    client,
    closed_after,
    drain,
    flood,
    handshake_refusal,
    pem,
    receive_envelopes,
    receive_json,
    running_server,
    subscribe,
    token,
    wait_until,
)

LOCKED = Settings(publish_tokens=PUBLISH_TOKEN, jwt_secret=JWT_SECRET, log_format="json")
AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}


async def test_http_publish_needs_a_valid_bearer_token() -> None:
    """No token: 401 with a challenge; a wrong one or one for another topic: 403; only
    publishes with a publish token or a JWT granting the topic reach subscribers."""
    async with (
        running_server(LOCKED) as live,
        client(live.ws_url(), additional_headers=AUTH) as reader,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        await subscribe(reader, "news")
        missing = await http.post("/publish/news", content="a")
        basic = await http.post("/publish/news", content="b", headers={"authorization": "Basic x"})
        wrong = await http.post("/publish/news", content="c", headers={"authorization": "Bearer x"})
        other = await http.post(
            "/publish/news",
            content="d",
            headers={"authorization": f"Bearer {token(publish=['sport'])}"},
        )
        by_token = await http.post("/publish/news", content="e", headers=AUTH)
        by_jwt = await http.post(
            "/publish/news",
            content="f",
            headers={"authorization": f"Bearer {token(publish=['news'])}"},
        )
        statuses = [r.status_code for r in (missing, basic, wrong, other, by_token, by_jwt)]
        assert statuses == [401, 401, 403, 403, 200, 200]
        assert missing.headers["www-authenticate"] == 'Bearer realm="broadcaster"'
        assert missing.json() == {
            "error": "missing_token",
            "detail": "publishing needs a bearer token",
        }
        assert wrong.json()["detail"].startswith("the token is not valid")
        assert other.json() == {
            "error": "forbidden_topic",
            "detail": "the token does not allow publishing here",
        }
        assert [e["data"] for e in await receive_envelopes(reader, 2)] == ["e", "f"]
        metrics = (await http.get("/metrics")).text
    assert 'broadcaster_refused_total{reason="missing_token"} 2.0' in metrics
    assert 'broadcaster_refused_total{reason="invalid_token"} 1.0' in metrics
    assert 'broadcaster_refused_total{reason="forbidden_topic"} 1.0' in metrics


@pytest.mark.parametrize(
    ("path", "options", "error"),
    [
        ("/ws", {}, "missing_token"),
        ("/ws?token=garbage", {}, "invalid_token"),
        ("/ws", {"additional_headers": {"authorization": "Bearer garbage"}}, "invalid_token"),
        (f"/ws?token={token(lifetime=-60)}", {}, "token_expired"),
        (f"/ws/news?token={token(subscribe=['sport.*'])}", {}, "forbidden_topic"),
        (
            "/ws",
            {"origin": "https://evil.example", "additional_headers": AUTH},
            "origin_not_allowed",
        ),
    ],
)
async def test_a_handshake_without_a_valid_credential_is_refused_with_403(
    path: str, options: dict[str, object], error: str
) -> None:
    """Missing, invalid or expired tokens, forbidden topics and foreign origins get 403."""
    settings = LOCKED.model_copy(update={"allowed_origins": ("https://app.example",)})
    async with running_server(settings) as live:
        status, code, _ = await handshake_refusal(live.ws_url(path), **options)
        assert (status, code) == (403, error)
        assert live.broadcaster.hub.statistics().subscribers == 0


async def test_a_jwt_admits_a_browser_by_query_and_a_service_by_header() -> None:
    """A token in ``?token=`` or in ``Authorization`` admits the client to its topics only;
    a raw-mode client without the right to publish is closed with 1008 when it tries."""
    settings = LOCKED.model_copy(update={"allowed_origins": ("https://app.example",)})
    browser_token = token(subscribe=["news.*"])
    async with (
        running_server(settings) as live,
        client(
            live.ws_url(f"/ws/news.eu?token={browser_token}"), origin="https://app.example"
        ) as browser,
        client(
            live.ws_url(),
            additional_headers={
                "authorization": f"Bearer {token(subscribe=['news.eu'], publish=['news.eu'])}"
            },
        ) as service,
    ):
        await subscribe(service, "news.eu")
        await service.send('{"op": "subscribe", "topic": "sport"}')
        assert (await receive_json(service))["error"] == "forbidden_topic"
        await service.send('{"op": "publish", "topic": "news.eu", "data": "hello"}')
        with anyio.fail_after(10):
            assert await browser.recv() == "hello"
        assert await closed_after(browser, "reply") == (1008, "publishing not permitted")
        assert await receive_envelopes(service, 1) == [
            {"topic": "news.eu", "seq": 1, "data": "hello"}
        ]


async def test_publish_tokens_alone_leave_subscribing_open_and_guard_raw_publishing() -> None:
    """With only publish tokens anyone subscribes; a raw client publishes only with a token."""
    settings = Settings(publish_tokens=PUBLISH_TOKEN, log_format="json")
    async with (
        running_server(settings) as live,
        client(live.ws_url("/ws/chat")) as anonymous,
        client(live.ws_url(f"/ws/chat?token={PUBLISH_TOKEN}")) as publisher,
    ):
        await wait_until(lambda: live.broadcaster.hub.statistics().topics.get("chat") == 2)
        await publisher.send("from the publisher")
        with anyio.fail_after(10):
            assert await anonymous.recv() == "from the publisher"
        assert await closed_after(anonymous, "from anyone") == (1008, "publishing not permitted")


async def test_a_live_connection_is_closed_with_1008_when_its_token_expires() -> None:
    """A subscriber whose JWT runs out while it listens is closed with 1008 and unsubscribed."""
    short_lived = token(subscribe=["t"], lifetime=2)
    async with (
        running_server(LOCKED) as live,
        client(live.ws_url(f"/ws?token={short_lived}")) as connection,
    ):
        await subscribe(connection, "t")
        await drain(connection)
        assert (connection.close_code, connection.close_reason) == (1008, "token expired")
        await wait_until(lambda: live.broadcaster.hub.statistics().topics == {})


async def test_tokens_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    """No log line, broadcaster's or uvicorn's, carries a query token."""
    secret_token = token(subscribe=["t"])
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    with capture_logs() as events:
        async with running_server(LOCKED) as live:
            async with client(live.ws_url(f"/ws/t?token={secret_token}")):
                await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"t": 1})
            await handshake_refusal(live.ws_url(f"/ws/u?token={secret_token}"))
            await handshake_refusal(live.ws_url(f"/ws?token={PUBLISH_TOKEN}x"))
    lines = [record.getMessage() for record in caplog.records]
    assert any(event["event"] == "request_refused" for event in events)
    everything = json.dumps(events, default=str) + "\n".join(lines)
    assert secret_token not in everything
    assert PUBLISH_TOKEN not in everything


async def test_connections_past_the_limit_are_refused_with_503() -> None:
    """MAX_CONNECTIONS refuses further handshakes with 503 and Retry-After until one leaves."""
    settings = Settings(max_connections=2, log_format="json")
    async with running_server(settings) as live:
        async with client(live.ws_url()), client(live.ws_url()):
            status, error, headers = await handshake_refusal(live.ws_url())
            assert (status, error, headers["retry-after"]) == (503, "too_many_connections", "1")
        await wait_until(lambda: live.broadcaster.connections == 0)
        async with client(live.ws_url()) as admitted:
            await subscribe(admitted, "t")


async def test_handshakes_past_the_rate_of_one_address_are_refused_with_429() -> None:
    """MAX_HANDSHAKES_PER_SECOND refuses an address's handshakes over its burst with 429."""
    settings = Settings(max_handshakes_per_second=0.001, log_format="json")
    async with running_server(settings) as live:
        async with client(live.ws_url()) as first:
            status, error, headers = await handshake_refusal(live.ws_url())
            assert (status, error, headers["retry-after"]) == (429, "rate_limited", "1")
            await subscribe(first, "t")


async def test_an_allowed_origin_and_a_client_without_one_may_connect() -> None:
    """The origin allowlist admits its origins and non-browser clients, which send none."""
    settings = Settings(allowed_origins="https://app.example", log_format="json")
    async with (
        running_server(settings) as live,
        client(live.ws_url(), origin="https://app.example") as browser,
        client(live.ws_url()) as service,
    ):
        await subscribe(browser, "t")
        await subscribe(service, "t")
        status, error, _ = await handshake_refusal(live.ws_url(), origin="https://evil.example")
        assert (status, error) == (403, "origin_not_allowed")


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        (Settings(host="0.0.0.0"), True),
        (Settings(host="example.com"), True),
        (Settings(host="0.0.0.0", publish_tokens=PUBLISH_TOKEN), False),
        (Settings(host="127.0.0.1"), False),
        (Settings(host="::1"), False),
        (Settings(host="localhost"), False),
    ],
)
def test_an_open_server_on_a_public_address_warns_at_start(
    settings: Settings, warned: bool
) -> None:
    """Binding beyond loopback with nobody needing a token to publish logs a warning."""
    with capture_logs() as logs:
        warn_if_unauthenticated(settings)
    assert [e["event"] for e in logs] == (["unauthenticated_bind"] if warned else [])


def production_environment(key_file: Path) -> dict[str, str]:
    """The security page's recommended production variables, with this test's secrets filled
    in."""
    page = (Path(__file__).parents[1] / "docs" / "security.md").read_text()
    section = page.split("## Recommended production configuration", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    filled = {
        "BROADCASTER_HOST": "127.0.0.1",
        "BROADCASTER_PUBLISH_TOKENS": PUBLISH_TOKEN,
        "BROADCASTER_JWT_PUBLIC_KEY": str(key_file),
    }
    variables = dict(line.split("=", 1) for line in block.splitlines() if line)
    return {k: filled.get(k, v) for k, v in variables.items() if k.startswith("BROADCASTER_")}


async def test_the_documented_production_configuration_refuses_every_unauthenticated_try(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Configured as the security page advises, the server refuses anonymous publishing and
    subscribing, foreign origins, client publishing, floods and handshake storms, while a
    client with a valid JWT receives what a publish token holder publishes."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwt-public.pem"
    key_file.write_text(pem(private_key.public_key()))
    for name, value in production_environment(key_file).items():
        monkeypatch.setenv(name, value)
    settings = Settings(log_format="json")
    assert (settings.allowed_origins, settings.client_publish) == (("https://app.example",), False)
    credential = token(
        subscribe=["news.*"], publish=["news.eu"], secret=private_key, algorithm="ES256"
    )
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
        client(live.ws_url(f"/ws?token={credential}"), origin="https://app.example") as reader,
    ):
        await subscribe(reader, "news.eu")
        anonymous_publish = await http.post("/publish/news.eu", content="x")
        assert anonymous_publish.status_code == 401
        assert (await handshake_refusal(live.ws_url("/ws/news.eu")))[:2] == (403, "missing_token")
        foreign = await handshake_refusal(
            live.ws_url(f"/ws?token={credential}"), origin="https://evil.example"
        )
        assert foreign[:2] == (403, "origin_not_allowed")
        await reader.send('{"op": "publish", "topic": "news.eu", "data": "x"}')
        assert (await receive_json(reader))["error"] == "publish_disabled"
        await reader.send('{"op": "subscribe", "topic": "admin"}')
        assert (await receive_json(reader))["error"] == "forbidden_topic"
        published = await http.post("/publish/news.eu", json="real", headers=AUTH)
        receipt = {"topic": "news.eu", "epoch": ANY, "seq": 1, "subscribers": 1}
        assert published.json() == receipt
        assert await receive_envelopes(reader, 1) == [
            {"topic": "news.eu", "seq": 1, "data": "real"}
        ]
        flooded = await flood(live.ws_url(f"/ws?token={credential}"))
        assert flooded == (1008, "rate limit exceeded")
        # The flooder's address is refused for FLOOD_PENALTY, before any handshake limit.
        assert await handshake_storm(live.ws_url(f"/ws?token={credential}")) == (
            429,
            "flooding",
        )


async def handshake_storm(url: str, limit: int = 10_000) -> tuple[int, str | None]:
    """Open and close connections to ``url`` until one is refused; return its status and error."""
    for _ in range(limit):
        try:
            async with client(url):
                pass
        except InvalidStatus as error:
            return error.response.status_code, json.loads(error.response.body or b"{}")["error"]
    raise AssertionError(f"{limit} handshakes were all accepted")
