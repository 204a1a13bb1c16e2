"""Close codes and the exception tree.

::

    BroadcasterError
    ├── ProtocolError          a client frame could not be understood; answered with an error frame
    ├── HubBusy                the hub's mailbox is full; HTTP publishers get 503
    ├── HubStopped             the hub is not running
    ├── Refused                a handshake or HTTP publish is refused with an HTTP status
    ├── BackplaneDown          the broker cannot be reached; the bridge reconnects
    └── Closing                the connection must be closed with ``code`` and ``reason``
        ├── SlowConsumer       1013: the client could not keep up
        ├── Flooding           1008: the client sent faster than it may
        └── ShuttingDown       1001: the server is stopping

A client that disconnects is not an error and has no exception here.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

# The ASGI scope extension in which broadcaster's HTTP protocol records that it refused a
# request itself (a body too slow, say) and counted it: ``{"error": CODE}`` once it has.
SERVER_REFUSAL = "broadcaster.server_refusal"


# The header that tells a refused client to try again in a second.
RETRY = {"Retry-After": "1"}


class CloseCode(IntEnum):
    """WebSocket close codes the server sends (RFC 6455, section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class LagCause(StrEnum):
    """Why a slow consumer was cut off."""

    QUEUE_FULL = "queue_full"
    LAG = "lag"
    SEND_TIMEOUT = "send_timeout"
    PING_TIMEOUT = "ping_timeout"


class BroadcasterError(Exception):
    """Root of every error this package raises."""


class ProtocolError(BroadcasterError):
    """A client frame was malformed; the connection stays open.

    Args:
        error: a stable snake_case code for clients to match on.
        detail: a sentence for humans.
        id: the ``id`` of the publish it refuses, when the client asked for an ack.
        topic: the topic of the command it refuses, when the command named a valid one, so
            that a client with several subscribes or publishes in flight knows which failed.
    """

    def __init__(
        self, error: str, detail: str, id: str | int | None = None, topic: str | None = None
    ) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail
        self.id = id
        self.topic = topic


class HubBusy(BroadcasterError):
    """The hub's mailbox is full; try again shortly."""


class HubStopped(BroadcasterError):
    """The hub is not running, so nothing can be published or subscribed."""


class BackplaneDown(BroadcasterError):
    """The broker could not be reached, or the connection to it was lost."""


class Closing(BroadcasterError):
    """The connection has to be closed with this code and reason."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class SlowConsumer(Closing):
    """The client did not keep up with its messages (close 1013, ``slow consumer``)."""

    def __init__(self, cause: LagCause) -> None:
        super().__init__(CloseCode.TRY_AGAIN_LATER, "slow consumer")
        self.cause = cause


class Flooding(Closing):
    """The client sent more frames or bytes a second than it may (close 1008,
    ``rate limit exceeded``); its address may be refused for a while."""

    def __init__(self) -> None:
        super().__init__(CloseCode.POLICY_VIOLATION, "rate limit exceeded")


class ShuttingDown(Closing):
    """The server is stopping (close 1001)."""

    def __init__(self) -> None:
        super().__init__(CloseCode.GOING_AWAY, "server shutting down")


class Refused(BroadcasterError):
    """A request refused before it is served: a WebSocket handshake or an HTTP publish.

    Args:
        status: the HTTP status that answers it (401, 403, 429, 503...).
        error: a stable snake_case code for clients to match on.
        detail: a sentence for humans; never the credential that was presented.
        headers: response headers, such as ``Retry-After`` or ``WWW-Authenticate``.
    """

    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}
