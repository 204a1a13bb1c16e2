"""broadcaster.js and the page at ``/``, in headless Chromium against a real server."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import anyio
import httpx

from broadcaster.errors import CloseCode, Closing, LagCause, ShuttingDown, SlowConsumer
from broadcaster.policy import Overflow
from broadcaster.protocol import Payload
from broadcaster.settings import Settings
from tests.support import JWT_SECRET, client, running_server, token, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterable

    from playwright.async_api import Browser, Page

    from tests.support import LiveServer

# Milliseconds a page gets for a condition to hold.
TIMEOUT = 15_000

# Loads broadcaster.js into a page and follows one topic, recording what the client reports.
FOLLOW = """async ({ topic, token, name }) => {
  const { connect } = await import("/client.js");
  const options = { backoffMin: 20, backoffMax: 100, random: () => 1 };
  const client = connect("/ws", token === null ? options : { ...options, token });
  const record = { client, seen: [], states: [], closes: [], gaps: [], errors: [] };
  client.on("state", (state, detail) => {
    record.states.push(state);
    if (detail.code !== undefined) record.closes.push(detail.code);
  });
  client.on("gap", (gap) => record.gaps.push(gap));
  client.on("error", (error) => record.errors.push([error.code, error.topic]));
  client.subscribe(topic, (data, meta) => record.seen.push([meta.seq, data, meta.replayed]));
  window[name] = record;
}"""


async def follow(
    page: Page, live: LiveServer, topic: str, *, name: str = "follower", jwt: str | None = None
) -> None:
    """Open a same-origin page (once) and start a client ``name`` following ``topic``."""
    if page.url == "about:blank":
        await page.goto(f"{live.http_url}/healthz")
    await page.evaluate(FOLLOW, {"topic": topic, "token": jwt, "name": name})


async def wait_page(page: Page, condition: str, arg: Any = None) -> None:
    """Wait until the JavaScript ``condition`` (a function of ``arg``) holds in ``page``."""
    await page.wait_for_function(condition, arg=arg, timeout=TIMEOUT)


async def publish(http: httpx.AsyncClient, topic: str, data: Any) -> int:
    """Publish JSON over HTTP; return the seq it took."""
    response = await http.post(
        f"/publish/{topic}", content=json.dumps(data), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    seq: int = response.json()["seq"]
    return seq


async def publish_while_restarting(
    live: LiveServer, http: httpx.AsyncClient, values: Iterable[int]
) -> None:
    """Act out a restart: close every connection with 1001, refuse handshakes until at least
    one has been refused, publish ``values`` to "news" meanwhile, then take handshakes again."""
    live.broadcaster.draining = True
    close_all(live, ShuttingDown())
    await wait_until(lambda: live.broadcaster.metrics.totals.refused["draining"] >= 1)
    for n in values:
        await publish(http, "news", n)
    live.broadcaster.draining = False


def close_all(live: LiveServer, error: Closing, topic: str | None = None) -> None:
    """Close every connection subscribed to ``topic`` (to anything, when ``None``) from the
    server's side, as the server does for ``error``."""
    for subscriber in live.broadcaster.hub.subscribers():
        if topic in subscriber.topics or (topic is None and subscriber.topics):
            subscriber.outbox.fail(error)


async def test_served_client_page_and_types() -> None:
    """The client, its declarations and the page are served with their content types."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        script = await http.get("/client.js")
        types = await http.get("/client.d.ts")
        page = await http.get("/")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["x-typescript-types"] == "./client.d.ts"
    assert "export function connect(" in script.text
    assert types.status_code == 200
    assert types.headers["content-type"] == "application/typescript; charset=utf-8"
    assert "export function connect(url?: string, options?: Options): Client;" in types.text
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'import { connect } from "./client.js";' in page.text


async def test_demo_off_answers_404_at_root_and_still_serves_the_client() -> None:
    """With DEMO=false, / answers 404 and /client.js is still there."""
    settings = Settings(demo=False, log_format="json")
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        root = await http.get("/")
        script = await http.get("/client.js")
    assert (root.status_code, root.json()) == (404, {"detail": "Not Found"})
    assert script.status_code == 200


async def test_page_shows_endpoints_and_two_pages_chat(browser: Browser) -> None:
    """The page at / links the endpoints, and two pages exchange chat messages through it."""
    async with running_server() as live:
        alice, bob = await browser.new_page(), await browser.new_page()
        for page, name in ((alice, "alice"), (bob, "bob")):
            response = await page.goto(f"{live.http_url}/")
            assert response is not None
            assert response.status == 200
            await page.fill("#name", name)
            await wait_page(
                page, "() => document.getElementById('status').className === 'connected'"
            )
        links = await alice.eval_on_selector_all("#endpoints a", "links => links.map(a => a.href)")
        for path in ("/client.js", "/client.d.ts", "/metrics", "/dashboard", "/docs"):
            assert f"{live.http_url}{path}" in links
        await alice.fill("#text", "hello bob")
        await alice.click("#send")
        await wait_page(bob, "() => document.getElementById('log').innerText.includes('hello bob')")
        await bob.fill("#text", "hi alice")
        await bob.click("#send")
        await wait_page(
            alice, "() => document.getElementById('log').innerText.includes('hi alice')"
        )
        lines = await alice.eval_on_selector_all(
            "#log li",
            "items => items.map(i => [i.children[1].textContent, i.children[2].textContent])",
        )
        assert lines == [["alice", "hello bob"], ["bob", "hi alice"]]
        assert live.broadcaster.hub.statistics().topics == {"chat": 2}


async def test_client_resumes_after_1001_and_1013_with_no_loss_and_no_duplicate(
    browser: Browser,
) -> None:
    """Closed by the server with 1001 and then 1013, the client reconnects and resumes: each
    message once, in order, those published while it was away replayed."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        page = await browser.new_page()
        await follow(page, live, "news")
        await wait_page(page, "() => window.follower.client.state === 'connected'")
        for n in range(1, 4):
            await publish(http, "news", n)
        await wait_page(page, "() => window.follower.seen.length === 3")

        await publish_while_restarting(live, http, range(4, 7))
        await wait_page(page, "() => window.follower.seen.length === 6")

        # A slow consumer cut off with 1013 is told to try again later, and does.
        close_all(live, SlowConsumer(LagCause.LAG))
        for n in range(7, 10):
            await publish(http, "news", n)
        await wait_page(page, "() => window.follower.seen.length === 9")
        record = await page.evaluate("({ ...window.follower, client: null })")
    assert [seq for seq, _, _ in record["seen"]] == list(range(1, 10))
    assert [data for _, data, _ in record["seen"]] == list(range(1, 10))
    assert [replayed for _, _, replayed in record["seen"][3:6]] == [True] * 3
    assert record["closes"][:2] == [1001, 1006]  # then refused handshakes, seen as 1006
    assert record["closes"][-1] == 1013
    assert (record["gaps"], record["errors"]) == ([], [])


async def test_no_loss_across_three_forced_reconnects_during_a_200_per_second_stream(
    browser: Browser,
) -> None:
    """A page loses no message and sees none twice while a 200 msg/s stream runs and the
    server drops its connection three times."""
    count, rate, cuts = 600, 200, {150: 1013, 300: 1001, 450: 1011}
    async with running_server() as live, client(live.ws_url()) as publisher:
        page = await browser.new_page()
        await follow(page, live, "stream")
        await wait_page(page, "() => window.follower.client.state === 'connected'")
        start = anyio.current_time()
        for n in range(count):
            if n in cuts:
                await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"stream": 1})
                close_all(live, Closing(CloseCode(cuts[n]), "cut by the test"))
            await publisher.send(json.dumps({"op": "publish", "topic": "stream", "data": n}))
            # One publish every 1/rate seconds: a bounded rate, not a wait for a state.
            await anyio.sleep(max(0.0, start + (n + 1) / rate - anyio.current_time()))
        await wait_page(page, "(count) => window.follower.seen.length >= count", count)
        record = await page.evaluate("({ ...window.follower, client: null })")
    assert [[seq, data] for seq, data, _ in record["seen"]] == [[n + 1, n] for n in range(count)]
    assert record["closes"] == list(cuts.values())
    assert record["states"].count("connected") == 4
    assert (record["gaps"], record["errors"]) == ([], [])


async def test_no_reconnect_after_token_expired_until_a_new_token(browser: Browser) -> None:
    """Closed with 1008 "token expired", the client stays away, while one closed with 1013
    at the same backoff comes back, and so does one whose token was replaced in time; given
    a new token, it reconnects and resumes."""
    settings = Settings(jwt_secret=JWT_SECRET, log_format="json")
    publisher = {"authorization": f"Bearer {token(publish=['news'])}"}
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, headers=publisher, trust_env=False) as http,
    ):
        page = await browser.new_page()
        await follow(page, live, "news", name="expiring", jwt=token(subscribe=["*"], lifetime=2))
        await follow(page, live, "news", name="control", jwt=token(subscribe=["*"]))
        await follow(page, live, "other", name="renewed", jwt=token(subscribe=["*"], lifetime=2))
        for name in ("expiring", "control", "renewed"):
            await wait_page(page, f"() => window.{name}.client.state === 'connected'")
        await page.evaluate("(t) => window.renewed.client.setToken(t)", token(subscribe=["*"]))
        await publish(http, "news", "before")
        await wait_page(page, "() => window.expiring.seen.length === 1")

        await wait_page(page, "() => window.expiring.client.state === 'unauthorized'")
        await wait_page(
            page,
            "() => window.renewed.closes.length === 1 && "
            "window.renewed.states.at(-1) === 'connected'",
        )
        assert await page.evaluate("window.renewed.closes") == [1008]
        await publish(http, "news", "while away")
        # The control client's reconnect takes the backoff the other would have waited.
        close_all(live, SlowConsumer(LagCause.LAG), "news")
        await wait_page(
            page,
            "() => window.control.states.at(-1) === 'connected' && "
            "window.control.closes.length === 1",
        )
        assert await page.evaluate("window.expiring.client.state") == "unauthorized"
        assert live.broadcaster.metrics.totals.refused["token_expired"] == 0
        assert live.broadcaster.metrics.totals.accepted == 5

        await page.evaluate("(t) => window.expiring.client.setToken(t)", token(subscribe=["*"]))
        await wait_page(page, "() => window.expiring.seen.length === 2")
        record = await page.evaluate("({ ...window.expiring, client: null })")
    assert record["seen"] == [[1, "before", False], [2, "while away", True]]
    assert record["closes"] == [1008]
    assert record["states"] == ["connected", "unauthorized", "connecting", "connected"]


async def overflow_a_page(page: Page, live: LiveServer, http: httpx.AsyncClient) -> None:
    """Follow "news" on ``page``, then publish 1, then 2 to 11 queued at once (an outbox of
    three keeps only three of them), then 12, whose seq shows the page its gap."""
    await follow(page, live, "news")
    await wait_page(page, "() => window.follower.client.state === 'connected'")
    await publish(http, "news", 1)
    await wait_page(page, "() => window.follower.seen.length === 1")
    # Queued together, the hub offers them all at once: the outbox keeps three.
    for n in range(2, 12):
        live.broadcaster.hub.publish_nowait("news", Payload.from_data(n))
    await wait_page(page, "() => window.follower.seen.length === 4")
    await publish(http, "news", 12)


async def test_client_fills_a_seq_gap_from_history(browser: Browser) -> None:
    """Messages the server dropped for a slow page are replayed into the gap they left."""
    settings = Settings(overflow=Overflow.DROP_NEWEST, queue_max_messages=3, log_format="json")
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        page = await browser.new_page()
        await overflow_a_page(page, live, http)
        await wait_page(page, "() => window.follower.seen.length === 12")
        record = await page.evaluate("({ ...window.follower, client: null })")
    assert [[seq, data] for seq, data, _ in record["seen"]] == [[n, n] for n in range(1, 13)]
    assert [replayed for _, _, replayed in record["seen"][:4]] == [False] * 4
    assert all(replayed for _, _, replayed in record["seen"][4:11])
    assert (record["gaps"], record["errors"], record["closes"]) == ([], [], [])


async def test_client_gives_up_on_a_gap_whose_replays_keep_being_cut_short(
    browser: Browser,
) -> None:
    """When the overflow policy drops the head of every replay, the client stops asking after
    a few tries, reports the gap, and goes on."""
    settings = Settings(overflow=Overflow.DROP_OLDEST, queue_max_messages=3, log_format="json")
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        page = await browser.new_page()
        await overflow_a_page(page, live, http)
        await wait_page(page, "() => window.follower.seen.length === 5")
        record = await page.evaluate("({ ...window.follower, client: null })")
        recoveries = dict(live.broadcaster.hub.statistics().recoveries)
    assert [[seq, data] for seq, data, _ in record["seen"]] == [[1, 1]] + [
        [n, n] for n in range(9, 13)
    ]
    [gap] = record["gaps"]
    assert (gap["after"]["seq"], gap["resumed"]["seq"]) == (1, 8)
    assert recoveries == {"recovered": 3}


async def test_client_reports_a_gap_that_history_cannot_fill(browser: Browser) -> None:
    """Back after more messages than the history keeps, the client reports a gap and goes
    on from the live position."""
    settings = Settings(history_size=2, log_format="json")
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        page = await browser.new_page()
        await follow(page, live, "news")
        await wait_page(page, "() => window.follower.client.state === 'connected'")
        await publish(http, "news", 1)
        await wait_page(page, "() => window.follower.seen.length === 1")
        await publish_while_restarting(live, http, range(2, 7))
        await wait_page(page, "() => window.follower.gaps.length === 1")
        await publish(http, "news", 7)
        await wait_page(page, "() => window.follower.seen.length === 2")
        record = await page.evaluate("({ ...window.follower, client: null })")
    assert [[seq, data] for seq, data, _ in record["seen"]] == [[1, 1], [7, 7]]
    [gap] = record["gaps"]
    assert (gap["topic"], gap["after"]["seq"], gap["resumed"]["seq"]) == ("news", 1, 6)
    assert gap["after"]["epoch"] == gap["resumed"]["epoch"]


async def test_refused_publishes_reject_and_a_forbidden_subscribe_is_reported(
    browser: Browser,
) -> None:
    """A publish the token does not grant rejects with the server's error, one it grants
    resolves with its position, and a subscribe it does not grant is reported with its topic
    and dropped."""
    settings = Settings(jwt_secret=JWT_SECRET, log_format="json")
    async with running_server(settings) as live:
        page = await browser.new_page()
        jwt = token(subscribe=["news"], publish=["news"])
        await follow(page, live, "news", jwt=jwt)
        await wait_page(page, "() => window.follower.client.state === 'connected'")
        outcomes = await page.evaluate(
            """async () => {
              const client = window.follower.client;
              const outcome = (promise) => promise.then((receipt) => receipt, (e) => e.code);
              const refused = outcome(client.publish("chat", "not mine"));
              const taken = outcome(client.publish("news", "mine"));
              return [await refused, await taken];
            }"""
        )
        assert outcomes == ["forbidden_topic", {"topic": "news", "epoch": ANY, "seq": 1}]
        await wait_page(page, "() => window.follower.seen.length === 1")
        await page.evaluate("window.follower.client.subscribe('secret', () => {})")
        await wait_page(page, "() => window.follower.errors.length === 1")
        assert await page.evaluate("window.follower.errors") == [["forbidden_topic", "secret"]]
        await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"news": 1})
        closed = await page.evaluate(
            """() => {
              const client = window.follower.client;
              client.close();
              return client.publish("news", "too late").catch((error) => error.code);
            }"""
        )
        assert closed == "closed"
        assert await page.evaluate("window.follower.seen") == [[1, "mine", False]]


async def test_publish_rejects_when_client_publishing_is_off(browser: Browser) -> None:
    """With CLIENT_PUBLISH=false, a publish rejects with publish_disabled."""
    settings = Settings(client_publish=False, log_format="json")
    async with running_server(settings) as live:
        page = await browser.new_page()
        await follow(page, live, "news")
        code = await page.evaluate(
            "() => window.follower.client.publish('news', 1).catch((error) => error.code)"
        )
        assert code == "publish_disabled"
        assert await page.evaluate("window.follower.errors") == []


async def test_subscribe_rewinds_with_last_and_resumes_from_a_stored_position(
    browser: Browser,
) -> None:
    """`last` starts with the latest messages of the history; `since` with those after a
    position the page kept."""
    async with (
        running_server() as live,
        httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http,
    ):
        receipts = []
        for n in range(1, 6):
            response = await http.post("/publish/news", json=n)
            receipts.append(response.json())
        page = await browser.new_page()
        await page.goto(f"{live.http_url}/healthz")
        since = {"epoch": receipts[1]["epoch"], "seq": receipts[1]["seq"]}
        await page.evaluate(
            """async (since) => {
              const { connect } = await import("/client.js");
              const client = connect("/ws");
              window.rewound = [];
              window.resumed = [];
              const keep = (into) => (data, meta) => into.push([meta.seq, data, meta.replayed]);
              client.subscribe("news", keep(window.rewound), { last: 2 });
              connect("/ws").subscribe("news", keep(window.resumed), { since });
            }""",
            since,
        )
        await wait_page(page, "() => window.rewound.length === 2 && window.resumed.length === 3")
        await publish(http, "news", 6)
        await wait_page(page, "() => window.rewound.length === 3 && window.resumed.length === 4")
        rewound = await page.evaluate("window.rewound")
        resumed = await page.evaluate("window.resumed")
    assert rewound == [[4, 4, True], [5, 5, True], [6, 6, False]]
    assert resumed == [[3, 3, True], [4, 4, True], [5, 5, True], [6, 6, False]]
