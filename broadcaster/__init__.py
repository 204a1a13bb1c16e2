"""broadcaster: a WebSocket fan-out server where one slow client never stalls the others."""

from broadcaster.app import Broadcaster, create_app
from broadcaster.backplane.bridge import Bridge
from broadcaster.backplane.episodes import BridgeStatistics
from broadcaster.errors import (
    BackplaneDown,
    BroadcasterError,
    CloseCode,
    Closing,
    HubBusy,
    HubStopped,
    ProtocolError,
    Refused,
    ShuttingDown,
    SlowConsumer,
)
from broadcaster.hub import Hub, HubStatistics
from broadcaster.mailbox import Receipt
from broadcaster.outbox import Outbox, OutboxStatistics
from broadcaster.policy import Overflow
from broadcaster.settings import Settings

__all__ = [
    "BackplaneDown",
    "Bridge",
    "BridgeStatistics",
    "Broadcaster",
    "BroadcasterError",
    "CloseCode",
    "Closing",
    "Hub",
    "HubBusy",
    "HubStatistics",
    "HubStopped",
    "Outbox",
    "OutboxStatistics",
    "Overflow",
    "ProtocolError",
    "Receipt",
    "Refused",
    "Settings",
    "ShuttingDown",
    "SlowConsumer",
    "create_app",
]
