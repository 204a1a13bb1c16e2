"""``broadcaster stress``: its fake clients' counting, a small scenario in CI, and the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio
import psutil
import pytest
from rich.console import Console
from typer.testing import CliRunner

import broadcaster
from broadcaster.cli import cli
from broadcaster.settings import Settings
from broadcaster.stress import Kind, Scenario, Snapshot, Thresholds, run_scenario
from broadcaster.stress.clients import Tally, bucket, bucket_micros, message_data
from broadcaster.stress.messages import KindProgress
from broadcaster.stress.plot import plot
from broadcaster.stress.render import ProgressView
from broadcaster.stress.report import percentile
from broadcaster.stress.spawned import Sample, pin
from tests.support import running_server

if TYPE_CHECKING:
    from pathlib import Path

STRESS = [sys.executable, "-m", "broadcaster", "stress"]
# Small outboxes that still fit a 64 KiB message, so stalled clients are cut off quickly.
# Room for about half a second of a scenario's 64 KiB messages at 50 a second: enough for a
# fast client's pauses, far less than a stalled client falls behind.
SMALL_QUEUES = {
    "BROADCASTER_OVERFLOW": "disconnect",
    "BROADCASTER_QUEUE_MAX_MESSAGES": "32",
    "BROADCASTER_QUEUE_MAX_BYTES": str(2 * 1024 * 1024),
    "BROADCASTER_MAX_MESSAGE_BYTES": str(128 * 1024),
}


def data(counter: int, sent_ns: int) -> str:
    """Return a message's data as the publisher makes it, 64 bytes long."""
    return message_data(counter, sent_ns, 64, b"x" * 64).decode()


def envelope(seq: int, counter: int, sent_ns: int) -> str:
    """Return a multiplexed message envelope as the server encodes it."""
    message = {"topic": "news", "seq": seq, "data": data(counter, sent_ns)}
    return json.dumps(message, separators=(",", ":"))


def test_tally_counts_envelopes_coalesced_arrays_and_seq_gaps() -> None:
    """Multiplexed frames are counted per envelope, in objects and arrays, with seq gaps."""
    now = time.time_ns()
    sent = now - 5_000_000
    tally = Tally()
    tally.begin(t0_ns=sent - 1_500_000_000, bin_ns=10**9, bin_count=3)
    single = envelope(1, 1, sent).encode()
    array = "[" + ",".join(envelope(n, n, sent) for n in (2, 4)) + "]"
    assert tally.mux(single, now) == 1
    assert tally.mux(array.encode(), now) == 2
    assert tally.mux(b'{"topic":"news","seq":x,"data":"5"}', now) == 0
    assert (tally.received, tally.gaps, tally.last_counter, tally.unparsed) == (3, 1, 4, 1)
    assert tally.bins == [0, 3, 0]
    assert percentile(tally.histogram, 0.99) == pytest.approx(5.0, rel=0.04)


def test_tally_takes_raw_counters_as_seq() -> None:
    """Raw frames count by the publisher's counter: a jump is a gap, a step back a reorder."""
    now = time.time_ns()
    tally = Tally()
    tally.begin(t0_ns=now, bin_ns=10**9, bin_count=2)
    for counter in (1, 2, 5, 3):
        assert tally.raw(data(counter, now).encode(), now) == 1
    assert tally.raw(b"not a message", now) == 0
    assert (tally.received, tally.gaps, tally.reordered, tally.unparsed) == (4, 2, 1, 1)


@pytest.mark.parametrize("micros", [0, 1, 63, 64, 100, 999, 123_456, 10**8])
def test_latency_buckets_keep_three_percent(micros: int) -> None:
    """A latency read back from its histogram bucket is within about 3 % of itself."""
    assert bucket_micros(bucket(micros)) == pytest.approx(micros, rel=0.032, abs=1)


@pytest.mark.parametrize(
    ("scenario", "thresholds", "expected"),
    [
        (Scenario(fast=0), Thresholds(), "at least one client"),
        (Scenario(size=8), Thresholds(), "--size must be at least"),
        (Scenario(url="http://x"), Thresholds(), "--url must start with ws://"),
        (Scenario(publish_url="http://x"), Thresholds(), "publisher's URL must start with ws://"),
        (Scenario(server_env={"PATH": "/"}), Thresholds(), "only BROADCASTER_* variables"),
        (Scenario(url="ws://x:1"), Thresholds(max_rss_mib=10), "--max-rss-mib needs a spawned"),
        (Scenario(), Thresholds(require_stalled_closed=True), "needs stalled clients"),
        (Scenario(), Thresholds(min_fast_delivery=2), "fraction from 0 to 1"),
        (Scenario(load_cpus=(100_000,)), Thresholds(), "this machine has cores 0 to"),
        (Scenario(url="ws://x:1", server_cpus=(0,)), Thresholds(), "a spawned server only"),
    ],
)
def test_bad_settings_are_named(scenario: Scenario, thresholds: Thresholds, expected: str) -> None:
    """Settings that cannot make a run are each named before anything starts."""
    problems = scenario.problems() + thresholds.problems(scenario)
    assert any(expected in problem for problem in problems), problems


def test_progress_is_a_live_table_on_a_terminal_and_sparse_lines_elsewhere() -> None:
    """A terminal gets a table redrawn in place; a log gets one line per few seconds."""
    snapshot = Snapshot(
        phase="publishing",
        elapsed=1.0,
        duration=2,
        published=10,
        kinds={Kind.FAST: KindProgress(connected=2, received=20)},
        clients={Kind.FAST: 2, Kind.SLOW: 0},
        server=Sample(at=0.0, rss_mib=50.0, cpu_percent=12.0),
    )
    terminal = io.StringIO()
    with ProgressView(Console(file=terminal, force_terminal=True), live=True) as view:
        view(snapshot)
    assert "closed by server" in terminal.getvalue()
    log = io.StringIO()
    with ProgressView(Console(file=log, width=200), live=False) as view:
        view(snapshot)
        view(snapshot)
    expected = "stress: publishing 1/2 s; published 10; fast 20 received, 2/2 open; server 50 MiB"
    assert log.getvalue().splitlines() == [expected + " 12% CPU"]


def test_small_scenario_isolates_stalled_clients(tmp_path: Path) -> None:
    """Fast clients get every message while stalled ones are closed with 1013, churn is clean;
    the server's CPU time is measured on the core it was kept on."""
    cores = sorted(os.sched_getaffinity(0))
    scenario = Scenario(
        server_env=SMALL_QUEUES,
        fast=20,
        stalled=2,
        churn=2,
        churn_stay=0.2,
        rate=50,
        size=64 * 1024,
        duration=2,
        procs=1,
        server_cpus=(cores[0],),
        load_cpus=(cores[-1],),
    )
    report = run_scenario(scenario)
    fast, stalled, churn = (report.kinds[k] for k in (Kind.FAST, Kind.STALLED, Kind.CHURN))
    assert fast.expected == 20 * report.publisher.published > 0
    assert (fast.delivered, fast.min_delivery) == (fast.expected, 1.0)
    assert fast.closes == {}
    assert set(fast.delivered_over_time) <= {1.0, None}
    assert stalled.closes == {"1013 slow consumer": 2}
    assert stalled.delivered < stalled.expected
    assert churn.sessions >= 2
    assert churn.unparsed == fast.unparsed == 0
    assert report.leftover_subscribers == 0
    assert report.server is not None
    assert (report.server.exit_status, report.server.error_lines) == (0, 0)
    assert report.server.cpus == [cores[0]]
    assert report.server.cpu_seconds is not None
    assert report.server.cpu_window_seconds is not None
    assert 0 < report.server.cpu_seconds < report.server.cpu_window_seconds
    assert report.server.cpu_window_seconds >= report.publisher.seconds
    met = Thresholds(min_fast_delivery=1, require_stalled_closed=True, max_server_errors=0)
    assert met.violations(report) == []
    missed = Thresholds(max_p99_ms=1e-6, max_rss_mib=1).violations(report)
    assert [line.split()[0] for line in missed] == ["--max-p99-ms", "--max-rss-mib"]
    json.dumps(report.to_json())
    plot(report, tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


def test_pin_moves_every_thread_of_a_process() -> None:
    """``pin`` keeps each thread of a running process, and the threads it starts later, on the
    cores given."""
    core = sorted(os.sched_getaffinity(0))[-1]
    code = (
        "import os, sys, threading\n"
        "done = threading.Event()\n"
        "threading.Thread(target=done.wait).start()\n"
        "print('started', flush=True)\n"
        "sys.stdin.readline()\n"
        "later = lambda: print(sorted(os.sched_getaffinity(0)), flush=True)\n"
        "threading.Thread(target=later).start()\n"
        "done.set()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        assert child.stdout.readline() == "started\n"
        pin(child.pid, [core])
        threads = [thread.id for thread in psutil.Process(child.pid).threads()]
        assert len(threads) == 2
        assert all(os.sched_getaffinity(thread) == {core} for thread in threads)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == f"[{core}]\n"
        assert child.wait(timeout=30) == 0


def test_cli_spawns_a_server_and_writes_json_to_stdout() -> None:
    """``--spawn --json`` exits 0 with every threshold met and only JSON on stdout."""
    args = "--spawn --env BROADCASTER_OVERFLOW=disconnect --publisher http --fast 3 --duration 1"
    completed = subprocess.run(
        [*STRESS, *args.split(), "--min-fast-delivery", "1", "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["kinds"]["fast"]["delivered"] == 3 * report["publisher"]["published"] > 0
    assert report["publisher"]["via"] == "http"
    assert report["server"]["exit_status"] == 0
    assert "OK every threshold met" in completed.stderr


async def test_cli_against_a_running_server_fails_a_threshold(tmp_path: Path) -> None:
    """Against ``--url``, a threshold that is missed is named and the exit status is 1."""
    out = tmp_path / "out.json"
    args = "--mode raw --fast 3 --slow 1 --churn 1 --duration 1 --rate 40"
    thresholds = "--max-p99-ms 0.001 --min-fast-delivery 1"
    async with running_server(Settings(log_format="json")) as live:
        with anyio.fail_after(120):
            url = f"ws://127.0.0.1:{live.port}"
            command = [*STRESS, "--url", url, *args.split(), *thresholds.split()]
            completed = await anyio.run_process([*command, "--json", str(out)], check=False)
    stdout = completed.stdout.decode()
    assert completed.returncode == 1, completed.stderr.decode()
    assert "FAIL --max-p99-ms 0.001" in stdout
    assert "--min-fast-delivery" not in stdout
    report = json.loads(out.read_text())
    assert report["spawned"] is False
    assert report["kinds"]["fast"]["delivered"] == 3 * report["publisher"]["published"] > 0
    assert report["leftover_subscribers"] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "give either --url or --spawn"),
        (["--spawn", "--url", "ws://127.0.0.1:1"], "give either --url or --spawn"),
        (["--spawn", "--env", "BROADCASTER_OVERFLOW"], "--env takes KEY=VALUE"),
        (["--url", "ws://127.0.0.1:1", "--max-rss-mib", "5"], "--max-rss-mib needs a spawned"),
        (["--spawn", "--procs", "0"], "--procs must be 1 or more"),
    ],
)
def test_cli_bad_arguments_exit_2(args: list[str], expected: str) -> None:
    """Bad arguments stop ``broadcaster stress`` with status 2 before anything starts."""
    result = CliRunner().invoke(cli, ["stress", *args])
    assert result.exit_code == 2
    assert expected in result.output


def test_cli_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the stress extra's packages the command exits 2 naming the extra."""
    monkeypatch.setitem(sys.modules, "picows", None)
    monkeypatch.delattr(broadcaster, "stress")
    for name in [name for name in sys.modules if name.startswith("broadcaster.stress")]:
        monkeypatch.delitem(sys.modules, name)
    result = CliRunner().invoke(cli, ["stress", "--spawn"])
    assert result.exit_code == 2
    assert "install broadcaster-ws[stress]" in result.output


async def test_cli_needs_the_admin_token_of_a_server_that_has_one() -> None:
    """A raw-mode run waits on ``GET /topics``: with the server's admin token it runs; without
    it the run fails naming the option, instead of skipping the wait unnoticed."""
    token = "a" * 24
    settings = Settings(log_format="json", admin_token=token)
    args = "--mode raw --fast 2 --duration 0.5 --rate 20 --drain 1"
    async with running_server(settings) as live:
        command = [*STRESS, "--url", f"ws://127.0.0.1:{live.port}", *args.split()]
        with anyio.fail_after(120):
            refused = await anyio.run_process(command, check=False)
            granted = await anyio.run_process([*command, "--admin-token", token], check=False)
    assert refused.returncode == 2
    assert "--admin-token" in refused.stderr.decode() + refused.stdout.decode()
    assert granted.returncode == 0, granted.stderr.decode()
