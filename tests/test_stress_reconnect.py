"""``broadcaster stress`` with reconnecting clients, on one node and on two sharing Redis, and
what the tool says about a run that failed or that no threshold judged."""

from __future__ import annotations

import io
import json
import multiprocessing
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from rich.console import Console
from websockets.asyncio.server import ServerConnection, serve

from broadcaster.client import Tracker
from broadcaster.settings import Settings
from broadcaster.stress import Kind, Mode, Scenario, Thresholds, run_scenario
from broadcaster.stress.clients import Tally, message_data
from broadcaster.stress.messages import ClientSpec, WorkerPlan
from broadcaster.stress.plot import draw
from broadcaster.stress.render import print_report
from broadcaster.stress.resume import Judge
from broadcaster.stress.scenario import DEFAULT_MAX_MESSAGE_BYTES
from broadcaster.stress.worker import Worker
from tests.brokers import running_broker
from tests.support import running_server, scrape
from tests.test_backplane import node_settings

if TYPE_CHECKING:
    from pathlib import Path

    from broadcaster.stress import Report

STRESS = [sys.executable, "-m", "broadcaster", "stress"]
EVERY = (0.1, 0.4)
MET = Thresholds(max_lost=0, max_duplicates=0, max_out_of_order=0, require_recovered=True)


def message(seq: int, counter: int | None = None) -> dict[str, Any]:
    """Return a multiplexed message of topic ``t`` as the server sends it."""
    data = message_data(counter or seq, time.time_ns(), 64, b"x" * 64).decode()
    return {"topic": "t", "seq": seq, "data": data}


def test_the_judge_counts_what_the_server_sent_that_the_tracker_skips() -> None:
    """Duplicates, out-of-order messages and resume answers are counted on the wire, while the
    tracker delivers every seq once, in order, and fills a gap with since."""
    judge, tally = Judge(Tracker.of(["t"])), Tally()
    now = time.time_ns()
    subscribed = {"op": "subscribed", "topic": "t", "epoch": "e", "seq": 0}
    assert judge.take(subscribed, tally, now) is None
    for seq in (1, 2, 2):
        assert judge.take(message(seq), tally, now) is None
    fill = judge.take(message(4), tally, now)
    assert fill is not None
    assert json.loads(fill)["since"] == {"epoch": "e", "seq": 2}
    assert judge.take(message(3), tally, now) is None
    recovered = {**subscribed, "seq": 4, "recovered": True}
    for item in (recovered, message(3), message(4)):
        assert judge.take(item, tally, now) is None
    assert judge.take({**subscribed, "seq": 9, "recovered": False}, tally, now) is None
    assert judge.take(message(10), tally, now) is None
    assert (judge.duplicates, judge.out_of_order) == (1, 1)
    assert (judge.recovered, judge.not_recovered, judge.position("t")) == (1, 1, 10)
    assert (tally.received, tally.gaps, tally.last_seq) == (5, 5, 10)


def test_the_judge_digest_tells_identical_sequences_apart() -> None:
    """Two clients that delivered the same (epoch, seq, data) have one digest; another data at
    the same seq gives another."""
    digests = []
    for counters in ((1, 2), (1, 2), (1, 3)):
        judge = Judge(Tracker.of(["t"]))
        judge.take({"op": "subscribed", "topic": "t", "epoch": "e", "seq": 0}, Tally(), 0)
        for seq, counter in enumerate(counters, start=1):
            item = {"topic": "t", "seq": seq, "data": f"{counter} 0 x"}
            judge.take(item, Tally(), 0)
        digests.append(judge.digest.hexdigest())
    assert digests[0] == digests[1] != digests[2]


@pytest.mark.parametrize(
    ("scenario", "thresholds", "expected"),
    [
        (Scenario(reconnect=1, reconnect_every=(2, 1)), Thresholds(), "--reconnect-every"),
        (Scenario(mode=Mode.RAW, reconnect=1), Thresholds(), "need --mode mux"),
        (Scenario(other_urls=("ws://x:1",)), Thresholds(), "further nodes need --url"),
        (Scenario(url="ws://x:1", other_urls=("x:2",)), Thresholds(), "--url must start with"),
        (Scenario(), Thresholds(max_lost=0), "need reconnecting clients"),
        (Scenario(reconnect=1), Thresholds(max_duplicates=-1), "must be 0 or more"),
        (
            Scenario(size=DEFAULT_MAX_MESSAGE_BYTES),
            Thresholds(),
            f"over the server's BROADCASTER_MAX_MESSAGE_BYTES ({DEFAULT_MAX_MESSAGE_BYTES})",
        ),
        (
            Scenario(server_env={"BROADCASTER_MAX_MESSAGE_BYTES": "1024"}, size=1000),
            Thresholds(),
            "--size 1000: a message is 1052 bytes once enveloped",
        ),
        (
            Scenario(url="ws://x:1", size=65_500),
            Thresholds(),
            "(65536, its default, assumed for --url)",
        ),
    ],
)
def test_bad_reconnect_settings_are_named(
    scenario: Scenario, thresholds: Thresholds, expected: str
) -> None:
    """Settings that cannot make a reconnecting run, or a message too big once enveloped, are
    named before anything starts."""
    problems = scenario.problems() + thresholds.problems(scenario)
    assert any(expected in problem for problem in problems), problems


def test_the_assumed_message_limit_is_the_servers_default() -> None:
    """The limit assumed for a server given with --url is the server's own default."""
    assert Settings().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES


def printed(report: Report, violations: list[str], *, judged: bool) -> list[str]:
    """Return the report's lines as a log file 80 columns wide gets them."""
    out = io.StringIO()
    print_report(report, violations, Console(file=out, width=80), judged=judged)
    return out.getvalue().splitlines()


def test_reconnecting_clients_resume_without_losing_anything() -> None:
    """Clients that drop their connection abruptly and resume with since each get every seq
    once, in order, every resume recovered; the report says so, unwrapped, and names no
    threshold when none was given; every panel of the plot says what it draws."""
    scenario = Scenario(fast=1, reconnect=6, reconnect_every=EVERY, rate=100, duration=2)
    report = run_scenario(scenario)
    reconnect = report.kinds[Kind.RECONNECT]
    assert reconnect.expected == 6 * report.publisher.published > 0
    assert (reconnect.delivered, reconnect.lost, reconnect.gaps) == (reconnect.expected, 0, 0)
    assert (reconnect.duplicates, reconnect.reordered, reconnect.diverged) == (0, 0, 0)
    assert reconnect.sessions >= 6
    assert reconnect.recovered >= reconnect.sessions - 6 > 0
    assert reconnect.not_recovered == 0
    assert reconnect.closes == {}
    assert report.failures() == []
    assert MET.violations(report) == []
    lines = printed(report, [], judged=False)
    assert "health: reconnect: all 6 clients got every message; resumes:" in "\n".join(lines)
    assert lines[-1].startswith("no thresholds were given")
    assert any(line.startswith("server (pid") and line.endswith("lines logged") for line in lines)
    figure = draw(report)
    latency, delivery, memory, cpu = figure.axes
    for axes in (latency, delivery, memory):
        assert axes.get_title()
        assert axes.get_xlabel()
        assert axes.get_ylabel()
    assert "CPU" in memory.get_title()
    assert cpu.get_ylabel() == "CPU (% of a core)"
    legend = memory.get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == ["RSS", "publishing", "CPU"]
    data = report.to_json()
    assert data["kinds"]["reconnect"]["recovered"] == reconnect.recovered
    assert data["failures"] == []


def test_resumes_that_cannot_recover_miss_the_thresholds() -> None:
    """With history off, resumes after missed messages say recovered: false and lose them; the
    reconnect thresholds name what they missed."""
    scenario = Scenario(
        server_env={"BROADCASTER_HISTORY_SIZE": "0"},
        fast=0,
        reconnect=4,
        reconnect_every=EVERY,
        rate=100,
        duration=2,
    )
    report = run_scenario(scenario)
    reconnect = report.kinds[Kind.RECONNECT]
    assert reconnect.not_recovered > 0
    assert reconnect.lost > 0
    missed = {line.split()[0].rstrip(":") for line in MET.violations(report)}
    assert missed == {"--max-lost", "--require-recovered"}
    lines = printed(report, MET.violations(report), judged=True)
    assert any(line.startswith("health: reconnect: lost ") for line in lines)
    assert lines[-1].startswith("FAIL --require-recovered")


async def test_two_nodes_on_redis_give_every_client_one_identical_sequence() -> None:
    """Clients of two nodes sharing Redis, resuming on the other node at each reconnect while
    messages are published through both, all deliver one identical (epoch, seq, data)
    sequence, each message once."""
    async with running_broker("redis") as broker:
        settings = node_settings(broker.url)
        async with running_server(settings) as a, running_server(settings) as b:
            scenario = Scenario(
                url=f"ws://127.0.0.1:{a.port}",
                other_urls=(f"ws://127.0.0.1:{b.port}",),
                fast=2,
                reconnect=6,
                reconnect_every=EVERY,
                rate=100,
                duration=2,
            )
            with anyio.fail_after(120):
                report = await anyio.to_thread.run_sync(run_scenario, scenario)
            counts = [await scrape(node) for node in (a, b)]
    reconnect, fast = report.kinds[Kind.RECONNECT], report.kinds[Kind.FAST]
    assert reconnect.expected == 6 * report.publisher.published > 0
    assert (reconnect.delivered, reconnect.lost, reconnect.diverged) == (reconnect.expected, 0, 0)
    assert (reconnect.duplicates, reconnect.reordered, reconnect.not_recovered) == (0, 0, 0)
    assert reconnect.recovered > 0
    assert (fast.delivered, fast.gaps, fast.reordered) == (fast.expected, 0, 0)
    assert len({c.digest for c in report.clients if c.kind is Kind.RECONNECT}) == 1
    assert MET.violations(report) == []
    assert report.leftover_subscribers == 0
    for samples in counts:
        # Each node took publishes and more connections than it had clients at the start.
        assert samples[("broadcaster_messages_published_total", (("source", "ws"),))] > 0
        assert samples[("broadcaster_connections_accepted_total", ())] > 4 + 1


async def test_a_publisher_cut_off_is_a_failed_run(tmp_path: Path) -> None:
    """A server that closes the publisher with 1009 (its message limit is below what the tool
    assumes for --url) makes a failed run: named, with each kind's health, exit status 2."""
    out = tmp_path / "out.json"
    args = "--fast 2 --duration 1 --rate 20 --size 2000"
    async with running_server(Settings(log_format="json", max_message_bytes=1024)) as live:
        with anyio.fail_after(120):
            command = [*STRESS, "--url", f"ws://127.0.0.1:{live.port}", *args.split()]
            completed = await anyio.run_process([*command, "--json", str(out)], check=False)
    stdout = completed.stdout.decode()
    assert completed.returncode == 2, completed.stderr.decode()
    assert "FAILED RUN the server closed the publisher's connection: 1009" in stdout
    assert "health: fast: lost " in stdout or "health: fast: nothing was expected" in stdout
    assert "OK every threshold met" not in stdout
    report = json.loads(out.read_text())
    assert report["failures"][0].startswith("the server closed the publisher's connection: 1009")


async def test_a_connection_whose_subscribe_is_never_answered_is_closed() -> None:
    """A reconnecting client's connection that times out before its subscribe is answered is
    dropped, rather than left open to deliver alongside the next one."""
    closed = anyio.Event()

    async def never_answers(connection: ServerConnection) -> None:
        await connection.wait_closed()
        closed.set()

    async with serve(never_answers, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        plan = WorkerPlan(
            index=0,
            base_url=f"ws://127.0.0.1:{port}",
            mode=Mode.MUX,
            clients=(ClientSpec(Kind.RECONNECT, "t"),),
            publisher=None,
            seed=0,
            duration=1,
            drain=1,
            slow_rate=1,
            stall_for=None,
            churn_stay=1,
            receive_buffer=8192,
            connect_timeout=0.5,
            progress_seconds=1,
        )
        parent, child = multiprocessing.Pipe()
        with parent, child:
            worker = Worker(plan, child)
            with pytest.raises(TimeoutError):
                await worker._open(worker.clients[0])
        with anyio.fail_after(10):
            await closed.wait()
