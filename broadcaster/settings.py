"""Server settings, read once from ``BROADCASTER_*`` environment variables.

No other module reads the environment: the CLI builds one :class:`Settings` and passes it down.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broadcaster.policy import Overflow

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

ENV_PREFIX = "BROADCASTER_"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
# Shorter secrets can be guessed, and PyJWT warns about HS256 keys under 32 bytes.
MIN_SECRET_LENGTH = 32
# A publish token is compared in constant time, but a short one can still be guessed.
MIN_TOKEN_LENGTH = 16
# Settings whose values are secrets: errors name them but never echo what was given.
SECRET_SETTINGS = frozenset({"publish_tokens", "jwt_secret", "jwt_public_key", "admin_token"})


def normal_origin(origin: str) -> str:
    """Spell an origin the one way it is compared: lower case, no trailing slash."""
    return origin.strip().rstrip("/").lower()


def parse_public_key(pem: str) -> tuple[Any, str]:
    """Load a PEM public key and name the one JWT algorithm it verifies.

    Fixing the algorithm from the key, never from a token's header, rules out algorithm
    confusion (RFC 8725, section 2.1).

    Raises:
        ValueError: it is not an RSA or P-256 elliptic-curve public key in PEM.
    """
    # Imported here: cryptography and PyJWT cost a process about 9 MiB, which a server without
    # a JWT key need not pay.
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a PEM public key: {error}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError("only RSA (RS256) and P-256 (ES256) public keys are supported")


def _split_commas(value: Any) -> Any:
    """Read ``a,b`` as ``("a", "b")``, leaving anything but a string to the field's type."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _long_enough(minimum: int) -> Callable[[SecretStr], SecretStr]:
    def check(secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < minimum:
            raise ValueError(f"a secret needs at least {minimum} characters")
        return secret

    return check


def _unset_when_empty(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _read_key(value: Any) -> Any:
    """Take a PEM public key as text, or read it from the file a path names."""
    value = _unset_when_empty(value)
    if isinstance(value, str) and not value.lstrip().startswith("-----BEGIN"):
        try:
            return Path(value).read_text()
        except OSError as error:
            # The reason only: the value may be a secret pasted into the wrong variable.
            raise ValueError(
                f"neither PEM text nor a readable PEM file ({error.strerror})"
            ) from None
        except UnicodeDecodeError:
            raise ValueError("neither PEM text nor a readable PEM file (not text)") from None
    return value


def _valid_key(key: SecretStr | None) -> SecretStr | None:
    if key is not None:
        parse_public_key(key.get_secret_value())
    return key


Origins = Annotated[
    tuple[Annotated[str, AfterValidator(normal_origin)], ...],
    NoDecode,
    BeforeValidator(_split_commas),
]
Tokens = Annotated[
    tuple[Annotated[SecretStr, AfterValidator(_long_enough(MIN_TOKEN_LENGTH))], ...],
    NoDecode,
    BeforeValidator(_split_commas),
]
Secret = Annotated[
    SecretStr | None,
    BeforeValidator(_unset_when_empty),
    AfterValidator(lambda secret: secret and _long_enough(MIN_SECRET_LENGTH)(secret)),
]
PublicKey = Annotated[SecretStr | None, BeforeValidator(_read_key), AfterValidator(_valid_key)]
Token = Annotated[
    SecretStr | None,
    BeforeValidator(_unset_when_empty),
    AfterValidator(lambda token: token and _long_enough(MIN_TOKEN_LENGTH)(token)),
]

# The backplane URL schemes, and the client module (and extra of the same name) each needs.
BACKPLANE_SCHEMES = {"redis": "redis", "rediss": "redis", "nats": "nats", "tls": "nats"}
MEMORY = "memory"
# Messages kept per topic when BROADCASTER_HISTORY_SIZE is unset, unless the backplane is NATS.
DEFAULT_HISTORY_SIZE = 1000


class LogFormat(StrEnum):
    """How log events are rendered."""

    CONSOLE = "console"
    JSON = "json"


class LogLevel(StrEnum):
    """The least severe log level that is written."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Settings(BaseSettings):
    """Every knob of a broadcaster server; immutable once built.

    Raises:
        pydantic.ValidationError: a value is out of range; :func:`describe_errors` words it.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="TCP port to bind.")
    queue_max_messages: PositiveInt = Field(
        1000, description="Messages one connection's outbox holds before the policy applies."
    )
    queue_max_bytes: PositiveInt = Field(
        1024 * 1024, description="Bytes one connection's outbox holds before the policy applies."
    )
    overflow: Overflow = Field(
        Overflow.DROP_OLDEST, description="What to do when a message does not fit an outbox."
    )
    lag_timeout: PositiveFloat = Field(
        60.0,
        description="Seconds an outbox may keep overflowing without catching up before the "
        "connection is closed with 1013, whatever the policy.",
    )
    send_timeout: PositiveFloat = Field(
        60.0,
        description="Seconds one socket write may take before the connection is closed with 1013.",
    )
    close_timeout: PositiveFloat = Field(
        60.0,
        description="Seconds the socket of a connection closed by the server is kept for the "
        "client to read the close frame (and learn why) before it is dropped.",
    )
    max_message_bytes: PositiveInt = Field(
        64 * 1024, description="Largest frame or HTTP body a client may publish."
    )
    socket_send_buffer: Annotated[int, Field(ge=4608)] = Field(
        64 * 1024,
        description="Bytes the kernel may hold for each socket's unsent data (its send "
        "buffer, bookkeeping included), instead of growing it to megabytes; a client's backlog "
        "waits in its outbox, where the overflow policy applies.",
    )
    hub_mailbox_size: PositiveInt = Field(
        10_000, description="Commands queued for the hub before publishers are pushed back."
    )
    ping_interval: PositiveFloat = Field(
        20.0, description="Seconds between protocol-level pings to each client."
    )
    ping_timeout: PositiveFloat = Field(
        20.0, description="Seconds a client has to answer a ping before it is closed."
    )
    idle_timeout: PositiveFloat = Field(
        300.0,
        description="Seconds a multiplexed connection may have no subscription and send "
        "nothing before it is closed with 1008.",
    )
    drain_timeout: PositiveFloat = Field(
        10.0,
        description="Seconds outboxes get to flush after SIGTERM before every socket is "
        "closed with 1001.",
    )
    shutdown_timeout: PositiveInt = Field(
        5, description="Seconds given to open connections to close on shutdown."
    )
    publish_tokens: Tokens = Field(
        (),
        description="Comma-separated bearer tokens that may publish anywhere, over HTTP or "
        "WebSockets; unset (and no JWT key) leaves publishing open to anyone.",
    )
    client_publish: bool = Field(
        True, description="Whether WebSocket clients may publish at all (HTTP is not affected)."
    )
    demo: bool = Field(
        True,
        description="Whether `/` serves the page with the endpoints and a live chat demo; "
        "false makes `/` answer 404.",
    )
    jwt_secret: Secret = Field(
        None, description="HS256 secret of the JWTs that WebSocket clients must present."
    )
    jwt_public_key: PublicKey = Field(
        None,
        description="PEM public key (the text, or a file's path) of RS256 or ES256 JWTs that "
        "WebSocket clients must present.",
    )
    admin_token: Token = Field(
        None,
        description="Bearer token for /connections, /topics and /dashboard, which show peer "
        "addresses; unset lets only loopback clients see them.",
    )
    allowed_origins: Origins = Field(
        (),
        description="Comma-separated origins (scheme://host[:port]) whose pages may open "
        "WebSockets; unset allows any.",
    )
    max_connections: PositiveInt = Field(
        10_000, description="Open WebSocket connections; past it handshakes get 503."
    )
    max_subscriptions: PositiveInt = Field(
        100, description="Topics one multiplexed connection may subscribe to."
    )
    max_messages_per_second: PositiveFloat = Field(
        10_000.0,
        description="Frames a second one connection may send (a second's worth in a burst); "
        "past it the connection is closed with 1008.",
    )
    max_bytes_per_second: PositiveInt = Field(
        16 * 1024 * 1024,
        description="Bytes a second one connection may send (a second's worth in a burst); "
        "past it the connection is closed with 1008.",
    )
    max_handshakes_per_second: PositiveFloat = Field(
        # Room for a load test's thousands of clients on one host; production tightens it.
        10_000.0,
        description="WebSocket handshakes a second from one client address (a second's worth "
        "in a burst); past it they get 429.",
    )
    max_batch_bytes: PositiveInt = Field(
        1024 * 1024, description="Largest body of a batch publish (POST /publish); past it 413."
    )
    max_batch_messages: PositiveInt = Field(
        10_000,
        description="Messages one batch publish may carry, each topic of a broadcast item "
        "counting as one; past it 413.",
    )
    max_batch_messages_per_second: PositiveFloat = Field(
        1_000_000.0,
        description="Messages a second one client address may publish in batches (a second's "
        "worth in a burst); a batch that would exceed it gets 429.",
    )
    flood_penalty: Annotated[float, Field(ge=0)] = Field(
        10.0,
        description="Seconds a client address whose connection was closed for sending faster "
        "than its rate limits allow is refused new WebSocket handshakes (429 flooding); 0 "
        "turns it off. Behind a reverse proxy it needs FORWARDED_ALLOW_IPS, as the handshake "
        "limit does, or every client shares the proxy's address.",
    )
    handshake_timeout: PositiveFloat = Field(
        10.0,
        description="Seconds a new TCP connection has to send a whole HTTP request head (a "
        "WebSocket handshake or a publish) before it is dropped.",
    )
    max_header_bytes: Annotated[int, Field(ge=1024)] = Field(
        16 * 1024,
        description="Bytes an HTTP request head (request line and headers) may take; past it "
        "431, counted as the bytes arrive.",
    )
    max_headers: PositiveInt = Field(
        100, description="Headers an HTTP request may carry; past it 431."
    )
    body_timeout: PositiveFloat = Field(
        30.0,
        description="Seconds an HTTP request body may take to arrive whole, from the end of "
        "its head; past it 408.",
    )
    body_min_rate: Annotated[int, Field(ge=0)] = Field(
        1024,
        description="Bytes a second an HTTP request body must average once it has had 2 "
        "seconds; below it 408. 0 turns the check off.",
    )
    max_http_connections: PositiveInt = Field(
        # A burst as large as the listen backlog may be in its HTTP phase at once.
        2048,
        description="Open HTTP connections (not yet upgraded to WebSockets) per server "
        "process; past it new connections get 503.",
    )
    max_http_connections_per_address: PositiveInt = Field(
        256,
        description="Open HTTP connections from one client address per server process; past "
        "it new connections get 429.",
    )
    handshake_addresses: PositiveInt = Field(
        10_000,
        description="Client addresses whose handshake rate is tracked; the least recently "
        "seen is forgotten first.",
    )
    workers: PositiveInt = Field(
        1,
        description="Worker processes serving one port; more than one needs a shared backplane.",
    )
    backplane: str = Field(
        MEMORY,
        description="`memory` (one process), or the broker that nodes share messages through: "
        "`redis://HOST:PORT[/DB]` or `nats://HOST:PORT`.",
    )
    backplane_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        "broadcaster",
        description="Namespace of this deployment's channels (Redis) or subjects (NATS).",
    )
    backplane_buffer: PositiveInt = Field(
        10_000,
        description="Messages queued toward the broker, and from it toward the hub, before "
        "more are dropped and counted.",
    )
    backplane_timeout: PositiveFloat = Field(
        5.0,
        description="Seconds a broker connect, subscribe, publish or ping may take before the "
        "broker is taken for down.",
    )
    backplane_reconnect_min: PositiveFloat = Field(
        0.1, description="Seconds before the first reconnect to a lost broker; doubles per try."
    )
    backplane_reconnect_max: PositiveFloat = Field(
        5.0, description="Most seconds between two reconnect tries (before jitter)."
    )
    history_size: NonNegativeInt | None = Field(
        None,
        description="Messages kept per topic for clients that resume or rewind; 0 turns "
        "history off. Unset: 1000 with the memory and Redis backplanes (with Redis, history "
        "lives in Redis, shared by every node), 0 with NATS (not supported there yet).",
    )
    history_max_bytes: PositiveInt = Field(
        1024 * 1024, description="Bytes of history kept per topic."
    )
    history_ttl: PositiveFloat = Field(
        120.0,
        description="Seconds after a topic's last publish when its history and its epoch are "
        "forgotten (unless it has subscribers, which keeps its position).",
    )
    history_total_bytes: PositiveInt = Field(
        64 * 1024 * 1024,
        description="Bytes of history over all topics, with a fixed charge per topic; past it "
        "the least recently published topics are forgotten first.",
    )
    recovery_max: PositiveInt = Field(
        1000,
        description="The most messages one resume or rewind replays; a client that missed "
        "more gets recovered: false, and GET /history pages at most this many.",
    )
    log_level: LogLevel = Field(LogLevel.INFO, description="Least severe level logged.")
    log_format: LogFormat | None = Field(
        None, description="`console` or `json`; unset picks console on a terminal, json otherwise."
    )

    @field_validator("backplane")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        if url == MEMORY:
            return url
        parts = urlsplit(url)
        module = BACKPLANE_SCHEMES.get(parts.scheme)
        if module is None or not parts.hostname:
            raise ValueError("use memory, redis://HOST:PORT[/DB] or nats://HOST:PORT")
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{parts.scheme}:// needs pip install 'broadcaster-ws[{module}]'")
        return url

    @model_validator(mode="after")
    def _workers_share_a_broker(self) -> Self:
        if self.workers > 1 and self.backplane == MEMORY:
            raise ValueError(
                f"{ENV_PREFIX}WORKERS={self.workers} needs {ENV_PREFIX}BACKPLANE set to a broker "
                "(redis://... or nats://...): with the memory backplane, clients on different "
                "workers would not see each other's messages"
            )
        if self.backplane_reconnect_min > self.backplane_reconnect_max:
            raise ValueError(
                f"{ENV_PREFIX}BACKPLANE_RECONNECT_MIN must not exceed "
                f"{ENV_PREFIX}BACKPLANE_RECONNECT_MAX"
            )
        return self

    @model_validator(mode="after")
    def _message_fits_outbox(self) -> Self:
        if self.max_message_bytes > self.queue_max_bytes:
            raise ValueError(
                f"{ENV_PREFIX}MAX_MESSAGE_BYTES ({self.max_message_bytes}) must not exceed "
                f"{ENV_PREFIX}QUEUE_MAX_BYTES ({self.queue_max_bytes}): "
                "a message that cannot fit an outbox could never be delivered"
            )
        if self.max_message_bytes > self.max_bytes_per_second:
            raise ValueError(
                f"{ENV_PREFIX}MAX_MESSAGE_BYTES ({self.max_message_bytes}) must not exceed "
                f"{ENV_PREFIX}MAX_BYTES_PER_SECOND ({self.max_bytes_per_second}): "
                "a message larger than a second's allowance could never be sent"
            )
        if self.max_batch_messages > self.max_batch_messages_per_second:
            raise ValueError(
                f"{ENV_PREFIX}MAX_BATCH_MESSAGES ({self.max_batch_messages}) must not exceed "
                f"{ENV_PREFIX}MAX_BATCH_MESSAGES_PER_SECOND "
                f"({self.max_batch_messages_per_second:g}): a full batch could never be sent"
            )
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError(
                f"set {ENV_PREFIX}JWT_SECRET (HS256) or {ENV_PREFIX}JWT_PUBLIC_KEY "
                "(RS256, ES256), not both"
            )
        return self

    @model_validator(mode="after")
    def _history_fits(self) -> Self:
        if self.history_total_bytes < self.history_max_bytes:
            raise ValueError(
                f"{ENV_PREFIX}HISTORY_TOTAL_BYTES ({self.history_total_bytes}) must not be "
                f"less than {ENV_PREFIX}HISTORY_MAX_BYTES ({self.history_max_bytes})"
            )
        if self.history_size and self._nats:
            raise ValueError(
                f"{ENV_PREFIX}HISTORY_SIZE={self.history_size} needs "
                f"{ENV_PREFIX}BACKPLANE=memory or redis://...: history shared by several "
                f"nodes through NATS is not supported yet; set {ENV_PREFIX}HISTORY_SIZE=0 (or "
                "leave it unset) with NATS"
            )
        return self

    @property
    def history_messages(self) -> int:
        """Messages kept per topic: ``HISTORY_SIZE``, or its default for the backplane."""
        if self.history_size is not None:
            return self.history_size
        return 0 if self._nats else DEFAULT_HISTORY_SIZE

    def effective(self) -> dict[str, Any]:
        """Every setting as the server applies it, with secrets masked: what an operator reads
        at start to confirm that their limits took effect."""
        values = self.model_dump(mode="json")
        values["history_size"] = self.history_messages
        values["backplane"] = without_password(self.backplane)
        return values

    @property
    def _nats(self) -> bool:
        return self.backplane.startswith(("nats:", "tls:"))

    @property
    def subscribe_open(self) -> bool:
        """Whether anyone may subscribe: no JWT key is configured."""
        return self.jwt_secret is None and self.jwt_public_key is None

    @property
    def publish_open(self) -> bool:
        """Whether anyone may publish: no publish token and no JWT key is configured."""
        return not self.publish_tokens and self.subscribe_open


def without_password(url: str) -> str:
    """``url`` with the password in its user information, if any, masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{parts.netloc.rpartition('@')[2]}").geturl()


def describe_errors(error: ValidationError) -> list[str]:
    """Word each validation error as the variable, the value given and what is allowed."""
    lines = []
    for item in error.errors():
        if not item["loc"]:
            lines.append(str(item["ctx"]["error"]) if "ctx" in item else item["msg"])
            continue
        name = str(item["loc"][0])
        value = "<hidden>" if name in SECRET_SETTINGS else repr(item["input"])
        lines.append(f"{ENV_PREFIX}{name.upper()}={value}: {item['msg']}")
    return lines


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The ``BROADCASTER_*`` variables that name no setting, each with the closest one that
    does (``None`` when none is close), so that a misspelt limit does not go unnoticed.

    Args:
        environ: the variables to look at; ``os.environ`` by default.
    """
    known = [name.upper() for name in Settings.model_fields]
    found = []
    for name in sorted(os.environ if environ is None else environ):
        suffix = name.removeprefix(ENV_PREFIX)
        if name.startswith(ENV_PREFIX) and suffix not in known:
            closest = difflib.get_close_matches(suffix, known, n=1)
            found.append((name, ENV_PREFIX + closest[0] if closest else None))
    return found
