"""The ``broadcaster`` command as an operator runs it: a real process, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

from broadcaster.server import GC_YOUNG_THRESHOLD
from tests.support import client, serving, subscribe

SERVE = [sys.executable, "-m", "broadcaster", "serve"]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion with extra environment variables."""
    return subprocess.run(
        [*SERVE, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BROADCASTER_OVERFLOW", "drop_everything", "'drop_oldest', 'drop_newest' or 'disconnect'"),
        ("BROADCASTER_QUEUE_MAX_MESSAGES", "0", "greater than 0"),
        ("BROADCASTER_QUEUE_MAX_BYTES", "lots", "valid integer"),
        ("BROADCASTER_LAG_TIMEOUT", "-1", "greater than 0"),
        ("BROADCASTER_PORT", "70000", "less than or equal to 65535"),
        ("BROADCASTER_BACKPLANE", "kafka://127.0.0.1:9092", "use memory, redis://"),
        ("BROADCASTER_BACKPLANE", "redis://", "use memory, redis://"),
        ("BROADCASTER_BACKPLANE_PREFIX", "a b", "should match pattern"),
        ("BROADCASTER_MAX_HEADER_BYTES", "512", "greater than or equal to 1024"),
        ("BROADCASTER_BODY_TIMEOUT", "never", "valid number"),
    ],
)
def test_bad_setting_exits_2_naming_the_variable(variable: str, value: str, expected: str) -> None:
    """A bad value stops the server with status 2 and names the variable, value and rule."""
    result = run({variable: value})
    assert result.returncode == 2
    assert variable in result.stderr
    assert repr(value) in result.stderr
    assert expected in result.stderr


def test_history_with_a_broker_backplane_exits_2_naming_both() -> None:
    """HISTORY_SIZE above 0 with a broker is refused at start, naming both variables."""
    result = run({"BROADCASTER_HISTORY_SIZE": "100", "BROADCASTER_BACKPLANE": "nats://h:4222"})
    assert result.returncode == 2
    assert "BROADCASTER_HISTORY_SIZE" in result.stderr
    assert "BROADCASTER_BACKPLANE" in result.stderr


def test_message_larger_than_the_outbox_is_refused() -> None:
    """MAX_MESSAGE_BYTES above QUEUE_MAX_BYTES is refused, naming both variables."""
    result = run({"BROADCASTER_MAX_MESSAGE_BYTES": "2048", "BROADCASTER_QUEUE_MAX_BYTES": "1024"})
    assert result.returncode == 2
    assert "BROADCASTER_MAX_MESSAGE_BYTES" in result.stderr
    assert "BROADCASTER_QUEUE_MAX_BYTES" in result.stderr


def test_several_workers_need_a_broker() -> None:
    """--workers 2 with the memory backplane is refused with status 2, naming both variables."""
    result = run({}, "--workers", "2")
    assert result.returncode == 2
    assert "BROADCASTER_WORKERS=2 needs BROADCASTER_BACKPLANE" in result.stderr
    assert "would not see each other's messages" in result.stderr


def test_busy_port_exits_2() -> None:
    """A port that is taken is reported with status 2 rather than a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run({}, "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert "cannot bind" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_with_1001_and_exits_0(signum: signal.Signals) -> None:
    """SIGTERM or SIGINT closes every socket with 1001 and the process exits with status 0."""
    with serving() as (process, port):
        async with client(f"ws://127.0.0.1:{port}/ws", open_timeout=30) as connection:
            await subscribe(connection, "a")
            process.send_signal(signum)
            with anyio.fail_after(20), pytest.raises(ConnectionClosed):
                await connection.recv()
            assert connection.close_code == 1001
        with anyio.fail_after(20):
            status = await anyio.to_thread.run_sync(process.wait)
        assert status == 0


def test_a_misspelt_variable_is_warned_about_at_start() -> None:
    """The server starts, and says which variable it did not know and what was meant."""
    with serving({"BROADCASTER_QUEU_MAX_MESSAGES": "5"}) as (process, _):
        assert process.stderr is not None
        warning = json.loads(process.stderr.readline())
    assert warning["event"] == "unknown_setting"
    assert warning["level"] == "warning"
    assert (warning["variable"], warning["closest"]) == (
        "BROADCASTER_QUEU_MAX_MESSAGES",
        "BROADCASTER_QUEUE_MAX_MESSAGES",
    )


def test_the_startup_line_shows_the_settings_applied_with_secrets_masked() -> None:
    """`server_starting` names every setting as applied, so an operator can confirm a limit,
    and never a token."""
    token = "t" * 24
    env = {
        **os.environ,
        "BROADCASTER_LOG_FORMAT": "json",
        "BROADCASTER_QUEUE_MAX_MESSAGES": "7",
        "BROADCASTER_PUBLISH_TOKENS": token,
    }
    with subprocess.Popen(
        [*SERVE, "--port", "0"], env=env, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline()
        finally:
            process.terminate()
            process.wait(30)
            assert process.stderr is not None
            process.stderr.close()
    first = json.loads(line)
    assert first["event"] == "server_starting"
    assert first["gc_threshold"][0] >= GC_YOUNG_THRESHOLD
    assert first["settings"]["queue_max_messages"] == 7
    assert first["settings"]["overflow"] == "drop_oldest"
    assert first["settings"]["publish_tokens"] == ["**********"]
    assert token not in line
