"""Tests for broadcaster.settings: defaults, BROADCASTER_* variables and their errors."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from typer.testing import CliRunner

from broadcaster.cli import cli
from broadcaster.policy import Overflow
from broadcaster.settings import (
    ENV_PREFIX,
    LogFormat,
    LogLevel,
    Settings,
    describe_errors,
    unknown_settings,
)
from tests.support import JWT_SECRET, PUBLISH_TOKEN, pem

if TYPE_CHECKING:
    from pathlib import Path


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
    assert settings.publish_tokens == ()
    assert settings.client_publish is True
    assert settings.jwt_secret is None
    assert settings.jwt_public_key is None
    assert settings.allowed_origins == ()
    assert settings.max_connections == 10_000
    assert settings.max_subscriptions == 100
    assert settings.max_messages_per_second == 10_000.0
    assert settings.max_bytes_per_second == 16 * 1024 * 1024
    assert settings.max_handshakes_per_second == 10_000.0
    assert settings.handshake_addresses == 10_000
    assert settings.max_header_bytes == 16 * 1024
    assert settings.max_headers == 100
    assert settings.body_timeout == 30.0
    assert settings.body_min_rate == 1024
    assert settings.max_http_connections == 2048
    assert settings.max_http_connections_per_address == 256
    assert settings.publish_open
    assert settings.subscribe_open


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
        ("BROADCASTER_MAX_CONNECTIONS", "0", "greater than 0"),
        ("BROADCASTER_MAX_SUBSCRIPTIONS", "-1", "greater than 0"),
        ("BROADCASTER_MAX_MESSAGES_PER_SECOND", "0", "greater than 0"),
        ("BROADCASTER_MAX_HANDSHAKES_PER_SECOND", "lots", "valid number"),
        ("BROADCASTER_HANDSHAKE_ADDRESSES", "0", "greater than 0"),
        ("BROADCASTER_CLIENT_PUBLISH", "maybe", "valid boolean"),
        ("BROADCASTER_MAX_HEADER_BYTES", "100", "greater than or equal to 1024"),
        ("BROADCASTER_MAX_HEADERS", "0", "greater than 0"),
        ("BROADCASTER_BODY_TIMEOUT", "0", "greater than 0"),
        ("BROADCASTER_BODY_MIN_RATE", "-1", "greater than or equal to 0"),
        ("BROADCASTER_BODY_MIN_RATE", "fast", "valid integer"),
        ("BROADCASTER_MAX_HTTP_CONNECTIONS", "0", "greater than 0"),
        ("BROADCASTER_MAX_HTTP_CONNECTIONS_PER_ADDRESS", "many", "valid integer"),
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


def test_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens and origins are comma-separated; blanks are skipped, origins normalised."""
    monkeypatch.setenv("BROADCASTER_PUBLISH_TOKENS", f" {PUBLISH_TOKEN}, ,{'t' * 16}")
    monkeypatch.setenv("BROADCASTER_ALLOWED_ORIGINS", "https://App.example/,http://localhost:3000")
    settings = Settings()
    assert [t.get_secret_value() for t in settings.publish_tokens] == [PUBLISH_TOKEN, "t" * 16]
    assert settings.allowed_origins == ("https://app.example", "http://localhost:3000")
    assert not settings.publish_open
    assert settings.subscribe_open


def test_empty_secret_variables_leave_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables set to nothing count as unset rather than as empty secrets."""
    for name in ("PUBLISH_TOKENS", "JWT_SECRET", "JWT_PUBLIC_KEY"):
        monkeypatch.setenv(ENV_PREFIX + name, "")
    settings = Settings()
    assert (settings.publish_tokens, settings.jwt_secret, settings.jwt_public_key) == (
        (),
        None,
        None,
    )
    assert settings.publish_open


def test_the_public_key_is_read_from_pem_text_or_a_file(tmp_path: Path) -> None:
    """BROADCASTER_JWT_PUBLIC_KEY takes the PEM itself or the path of a PEM file."""
    text = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    path = tmp_path / "key.pem"
    path.write_text(text)
    for value in (text, str(path)):
        key = Settings(jwt_public_key=value).jwt_public_key
        assert key is not None
        assert key.get_secret_value() == text
        assert not Settings(jwt_public_key=value).subscribe_open


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"publish_tokens": "short"},
            "BROADCASTER_PUBLISH_TOKENS=<hidden>: Value error, a secret needs at least 16 "
            "characters",
        ),
        (
            {"jwt_secret": "short"},
            "BROADCASTER_JWT_SECRET=<hidden>: Value error, a secret needs at least 32 characters",
        ),
        (
            {"jwt_public_key": "/no/such/key.pem"},
            "BROADCASTER_JWT_PUBLIC_KEY=<hidden>: Value error, neither PEM text nor a readable "
            "PEM file",
        ),
    ],
)
def test_bad_secrets_are_described_without_their_value(
    overrides: dict[str, str], expected: str
) -> None:
    """An error about a secret names the variable and the rule, never what was given."""
    with pytest.raises(ValidationError) as raised:
        Settings(**overrides)  # type: ignore[arg-type]
    (line,) = describe_errors(raised.value)
    assert line.startswith(expected)
    assert "short" not in line.removeprefix(expected)


def test_a_secret_and_a_public_key_together_are_refused() -> None:
    """One kind of JWT key: HS256 with a secret, or RS256/ES256 with a public key."""
    key = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(ValidationError) as raised:
        Settings(jwt_secret=JWT_SECRET, jwt_public_key=key)
    assert describe_errors(raised.value) == [
        "set BROADCASTER_JWT_SECRET (HS256) or BROADCASTER_JWT_PUBLIC_KEY (RS256, ES256), not both"
    ]


def test_a_byte_rate_below_the_message_limit_is_refused() -> None:
    """A connection must be able to send at least one largest message a second."""
    with pytest.raises(ValidationError) as raised:
        Settings(max_message_bytes=2048, max_bytes_per_second=1024)
    assert describe_errors(raised.value) == [
        "BROADCASTER_MAX_MESSAGE_BYTES (2048) must not exceed BROADCASTER_MAX_BYTES_PER_SECOND "
        "(1024): a message larger than a second's allowance could never be sent"
    ]


def test_a_key_file_that_is_not_text_is_refused_without_its_content(tmp_path: Path) -> None:
    """A binary file named as the public key is refused, and nothing of it is echoed."""
    path = tmp_path / "key.der"
    path.write_bytes(b"\xff\xfe secret \x00")
    with pytest.raises(ValidationError) as raised:
        Settings(jwt_public_key=str(path))
    assert describe_errors(raised.value) == [
        "BROADCASTER_JWT_PUBLIC_KEY=<hidden>: Value error, neither PEM text nor a readable PEM "
        "file (not text)"
    ]


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
        "Value error, nats:// needs pip install 'broadcaster-ws[nats]'"
    ]


def test_reconnect_delays_must_be_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first reconnect delay above the cap is refused, naming both variables."""
    monkeypatch.setenv("BROADCASTER_BACKPLANE_RECONNECT_MIN", "10")
    (line,) = describe_errors(settings_error())
    assert "BROADCASTER_BACKPLANE_RECONNECT_MIN must not exceed" in line
    assert "BROADCASTER_BACKPLANE_RECONNECT_MAX" in line


def test_history_defaults() -> None:
    """History is on by default in memory mode and with Redis, with a two-minute window, and
    off with NATS."""
    settings = Settings()
    assert settings.history_size is None
    assert settings.history_messages == 1000
    assert settings.history_max_bytes == 1024 * 1024
    assert settings.history_ttl == 120.0
    assert settings.history_total_bytes == 64 * 1024 * 1024
    assert settings.recovery_max == 1000
    assert Settings(history_size=0).history_messages == 0
    assert Settings(backplane="redis://127.0.0.1:6379").history_messages == 1000
    assert Settings(backplane="nats://127.0.0.1:4222").history_messages == 0


def test_history_with_nats_is_refused_naming_both_settings() -> None:
    """HISTORY_SIZE above 0 with NATS is refused, naming both settings; Redis shares it."""
    with pytest.raises(ValidationError) as raised:
        Settings(history_size=10, backplane="nats://127.0.0.1:4222")
    [line] = describe_errors(raised.value)
    assert line.startswith("BROADCASTER_HISTORY_SIZE=10 needs BROADCASTER_BACKPLANE=memory")
    assert "BROADCASTER_BACKPLANE=memory or redis://" in line
    assert Settings(history_size=0, backplane="nats://127.0.0.1:4222").history_messages == 0
    assert Settings(history_size=10, backplane="redis://127.0.0.1:6379").history_messages == 10


def test_the_history_budget_must_hold_one_topic() -> None:
    """HISTORY_TOTAL_BYTES below HISTORY_MAX_BYTES is refused, naming both."""
    with pytest.raises(ValidationError) as raised:
        Settings(history_total_bytes=1000, history_max_bytes=2000)
    assert describe_errors(raised.value) == [
        "BROADCASTER_HISTORY_TOTAL_BYTES (1000) must not be less than "
        "BROADCASTER_HISTORY_MAX_BYTES (2000)"
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HISTORY_SIZE", "-1"),
        ("HISTORY_MAX_BYTES", "0"),
        ("HISTORY_TTL", "0"),
        ("HISTORY_TOTAL_BYTES", "many"),
        ("RECOVERY_MAX", "0"),
    ],
)
def test_bad_history_values_are_described(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Each history setting is validated and named with its value."""
    monkeypatch.setenv(ENV_PREFIX + name, value)
    [line] = describe_errors(settings_error())
    assert line.startswith(f"{ENV_PREFIX}{name}={value!r}: ")


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    """A misspelt BROADCASTER_ variable is found, with the setting it was likely meant to be."""
    environ = {
        "BROADCASTER_QUEU_MAX_MESSAGES": "5",
        "BROADCASTER_PORT": "1",
        "BROADCASTER_ZZZ": "1",
        "PATH": "/bin",
    }
    assert unknown_settings(environ) == [
        ("BROADCASTER_QUEU_MAX_MESSAGES", "BROADCASTER_QUEUE_MAX_MESSAGES"),
        ("BROADCASTER_ZZZ", None),
    ]


def test_effective_settings_mask_every_secret() -> None:
    """The startup line shows the limits as applied, and no token, key or broker password."""
    settings = Settings(
        publish_tokens="p" * 20,
        jwt_secret="s" * 40,
        backplane="redis://user:hunter2hunter2@127.0.0.1:6379/0",
        queue_max_messages=5,
    )
    effective = settings.effective()
    shown = json.dumps(effective)
    assert "p" * 20 not in shown
    assert "s" * 40 not in shown
    assert "hunter2" not in shown
    assert effective["backplane"] == "redis://user:***@127.0.0.1:6379/0"
    assert effective["queue_max_messages"] == 5
    assert effective["history_size"] == settings.history_messages
    assert set(effective) == set(Settings.model_fields)


def test_serve_help_lists_every_setting_with_its_default() -> None:
    """`serve --help` names each BROADCASTER_* variable and the value it has when unset."""
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert f"{ENV_PREFIX}{name.upper()} [" in result.output
    assert "BROADCASTER_QUEUE_MAX_MESSAGES [1000]" in result.output
    assert "default: 8000" in result.output
