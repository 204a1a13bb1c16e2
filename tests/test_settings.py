"""Tests for broadcaster.settings: defaults, BROADCASTER_* variables and their errors."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from broadcaster.policy import Overflow
from broadcaster.settings import ENV_PREFIX, LogFormat, LogLevel, Settings, describe_errors


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any BROADCASTER_* variable of the environment the tests run in."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def settings_error() -> ValidationError:
    """Return the ValidationError that building Settings from the environment raises."""
    with pytest.raises(ValidationError) as raised:
        Settings()
    return raised.value


def test_defaults() -> None:
    """Without variables, Settings holds the documented defaults."""
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.queue_max_messages == 1000
    assert settings.queue_max_bytes == 1024 * 1024
    assert settings.overflow is Overflow.DROP_OLDEST
    assert settings.lag_timeout == 60.0
    assert settings.send_timeout == 60.0
    assert settings.max_message_bytes == 64 * 1024
    assert settings.hub_mailbox_size == 10_000
    assert settings.shutdown_timeout == 5
    assert settings.log_level is LogLevel.INFO
    assert settings.log_format is None
    assert settings.max_message_bytes <= settings.queue_max_bytes


def test_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """BROADCASTER_* variables set the matching fields, parsed to their types."""
    monkeypatch.setenv("BROADCASTER_QUEUE_MAX_MESSAGES", "5")
    monkeypatch.setenv("BROADCASTER_QUEUE_MAX_BYTES", "2048")
    monkeypatch.setenv("BROADCASTER_MAX_MESSAGE_BYTES", "2048")
    monkeypatch.setenv("BROADCASTER_OVERFLOW", "disconnect")
    monkeypatch.setenv("BROADCASTER_LAG_TIMEOUT", "2.5")
    monkeypatch.setenv("BROADCASTER_PORT", "0")
    monkeypatch.setenv("BROADCASTER_HOST", "0.0.0.0")
    monkeypatch.setenv("BROADCASTER_LOG_FORMAT", "json")
    monkeypatch.setenv("BROADCASTER_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.queue_max_messages == 5
    assert settings.queue_max_bytes == settings.max_message_bytes == 2048
    assert settings.overflow is Overflow.DISCONNECT
    assert settings.lag_timeout == 2.5
    assert settings.port == 0
    assert settings.host == "0.0.0.0"
    assert settings.log_format is LogFormat.JSON
    assert settings.log_level is LogLevel.DEBUG


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only BROADCASTER_-prefixed variables are read, not bare field names."""
    monkeypatch.setenv("QUEUE_MAX_MESSAGES", "5")
    monkeypatch.setenv("PORT", "1234")
    settings = Settings()
    assert settings.queue_max_messages == 1000
    assert settings.port == 8000


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("BROADCASTER_QUEUE_MAX_MESSAGES", "many", "valid integer"),
        ("BROADCASTER_QUEUE_MAX_MESSAGES", "1.5", "valid integer"),
        ("BROADCASTER_QUEUE_MAX_MESSAGES", "0", "greater than 0"),
        ("BROADCASTER_QUEUE_MAX_MESSAGES", "-3", "greater than 0"),
        ("BROADCASTER_QUEUE_MAX_BYTES", "0", "greater than 0"),
        ("BROADCASTER_HUB_MAILBOX_SIZE", "-1", "greater than 0"),
        ("BROADCASTER_LAG_TIMEOUT", "0", "greater than 0"),
        ("BROADCASTER_SEND_TIMEOUT", "soon", "valid number"),
        ("BROADCASTER_PORT", "70000", "less than or equal to 65535"),
        ("BROADCASTER_PORT", "-1", "greater than or equal to 0"),
        ("BROADCASTER_OVERFLOW", "fast", "'drop_oldest', 'drop_newest' or 'disconnect'"),
        ("BROADCASTER_OVERFLOW", "DISCONNECT", "'drop_oldest', 'drop_newest' or 'disconnect'"),
        ("BROADCASTER_LOG_FORMAT", "xml", "'console' or 'json'"),
        ("BROADCASTER_LOG_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
    ],
)
def test_bad_values_are_described_by_variable_value_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    """A bad value raises ValidationError, worded with the variable, the value and the rule."""
    monkeypatch.setenv(variable, value)
    lines = describe_errors(settings_error())
    assert len(lines) == 1
    assert lines[0].startswith(f"{variable}={value!r}: ")
    assert allowed in lines[0]


def test_every_bad_variable_is_described(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bad values give one line each, so all can be fixed at once."""
    monkeypatch.setenv("BROADCASTER_QUEUE_MAX_MESSAGES", "0")
    monkeypatch.setenv("BROADCASTER_OVERFLOW", "fast")
    lines = describe_errors(settings_error())
    assert sorted(line.split("=")[0] for line in lines) == [
        "BROADCASTER_OVERFLOW",
        "BROADCASTER_QUEUE_MAX_MESSAGES",
    ]


def test_a_message_limit_above_the_outbox_bound_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_MESSAGE_BYTES above QUEUE_MAX_BYTES is rejected, naming both variables and values."""
    monkeypatch.setenv("BROADCASTER_QUEUE_MAX_BYTES", "100")
    monkeypatch.setenv("BROADCASTER_MAX_MESSAGE_BYTES", "101")
    lines = describe_errors(settings_error())
    assert len(lines) == 1
    assert "BROADCASTER_MAX_MESSAGE_BYTES (101)" in lines[0]
    assert "BROADCASTER_QUEUE_MAX_BYTES (100)" in lines[0]
    assert "must not exceed" in lines[0]


def test_the_default_outbox_bound_applies_to_the_message_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message limit above the default outbox bound is rejected too."""
    monkeypatch.setenv("BROADCASTER_MAX_MESSAGE_BYTES", str(1024 * 1024 + 1))
    lines = describe_errors(settings_error())
    assert lines == [
        f"BROADCASTER_MAX_MESSAGE_BYTES ({1024 * 1024 + 1}) must not exceed "
        f"BROADCASTER_QUEUE_MAX_BYTES ({1024 * 1024}): "
        "a message that cannot fit an outbox could never be delivered"
    ]


def test_a_message_limit_equal_to_the_outbox_bound_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_MESSAGE_BYTES equal to QUEUE_MAX_BYTES is allowed."""
    monkeypatch.setenv("BROADCASTER_QUEUE_MAX_BYTES", "100")
    monkeypatch.setenv("BROADCASTER_MAX_MESSAGE_BYTES", "100")
    assert Settings().max_message_bytes == 100


def test_keyword_arguments_are_validated_like_variables() -> None:
    """Settings built in code are checked by the same rules and described the same way."""
    with pytest.raises(ValidationError) as raised:
        Settings(queue_max_messages=0)
    assert describe_errors(raised.value) == [
        "BROADCASTER_QUEUE_MAX_MESSAGES=0: Input should be greater than 0"
    ]


def test_settings_are_frozen() -> None:
    """A built Settings cannot be changed."""
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.queue_max_messages = 1  # type: ignore[misc]
    assert settings.queue_max_messages == 1000


def test_settings_are_hashable_and_compare_by_value() -> None:
    """Frozen settings with the same values are equal and hash alike."""
    assert Settings(port=1) == Settings(port=1)
    assert hash(Settings(port=1)) == hash(Settings(port=1))
    assert Settings(port=1) != Settings(port=2)


def test_scale_out_defaults() -> None:
    """One worker, the memory backplane, and the documented broker settings."""
    settings = Settings()
    assert (settings.workers, settings.backplane) == (1, "memory")
    assert settings.backplane_prefix == "broadcaster"
    assert (settings.backplane_buffer, settings.backplane_timeout) == (10_000, 5.0)
    assert (settings.backplane_reconnect_min, settings.backplane_reconnect_max) == (0.1, 5.0)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379", "rediss://cache:6380/2", "nats://127.0.0.1:4222", "tls://n:1"]
)
def test_broker_urls_are_accepted(url: str) -> None:
    """Redis and NATS URLs, with or without TLS, are taken as they are."""
    assert Settings(backplane=url, workers=2).backplane == url


def test_a_broker_without_its_client_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker whose client library is not installed is refused, naming the extra."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("BROADCASTER_BACKPLANE", "nats://127.0.0.1:4222")
    assert describe_errors(settings_error()) == [
        "BROADCASTER_BACKPLANE='nats://127.0.0.1:4222': "
        "Value error, nats:// needs pip install 'broadcaster[nats]'"
    ]


def test_reconnect_delays_must_be_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first reconnect delay above the cap is refused, naming both variables."""
    monkeypatch.setenv("BROADCASTER_BACKPLANE_RECONNECT_MIN", "10")
    (line,) = describe_errors(settings_error())
    assert "BROADCASTER_BACKPLANE_RECONNECT_MIN must not exceed" in line
    assert "BROADCASTER_BACKPLANE_RECONNECT_MAX" in line
