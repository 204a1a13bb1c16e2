"""What operators see: the admin check, the slowest connections, and the dashboard's stream.

``/connections``, ``/topics`` and ``/dashboard`` show peer addresses and topic names, so they
need ``BROADCASTER_ADMIN_TOKEN``; with none set, only loopback clients may see them. The
dashboard page (``static/dashboard.html``) draws what ``/dashboard/events`` streams: a JSON
snapshot every :data:`INTERVAL` seconds, read from the same registry that ``/metrics`` renders,
with the slowest connections and the backplane's state.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import time
from typing import TYPE_CHECKING, Any

import anyio

from broadcaster.auth import CHALLENGE, TOKEN_PARAMETER, bearer
from broadcaster.errors import Refused
from broadcaster.http_protocol import drop_connection

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from prometheus_client import CollectorRegistry
    from pydantic import SecretStr
    from starlette.types import Receive, Scope, Send

    from broadcaster.backplane.bridge import Bridge
    from broadcaster.hub import Hub
    from broadcaster.mailbox import Subscriber
    from broadcaster.outbox import OutboxStatistics

# Seconds between two snapshots of the dashboard's stream.
INTERVAL = 1.0
# Connections listed in each snapshot, the slowest first.
SLOWEST = 10
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def check_admin(
    token: SecretStr | None, headers: Mapping[str, str], query: Mapping[str, str], host: str
) -> None:
    """Let an operator in: with the admin token (a Bearer header, or ``?token=`` for pages), or
    from a loopback address when no admin token is configured.

    Raises:
        Refused: 401 ``missing_admin_token``, 403 ``invalid_admin_token``, or 403
            ``admin_loopback_only`` when no admin token is set and the client is not local.
    """
    if token is None:
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise Refused(
                403,
                "admin_loopback_only",
                "without BROADCASTER_ADMIN_TOKEN only loopback clients may see this; "
                "set it and present it as a Bearer token or ?token=",
            )
        return
    credential = bearer(headers.get("authorization")) or query.get(TOKEN_PARAMETER)
    if credential is None:
        raise Refused(401, "missing_admin_token", "this needs the admin token", CHALLENGE)
    if not hmac.compare_digest(credential.encode(), token.get_secret_value().encode()):
        raise Refused(403, "invalid_admin_token", "the token is not the admin token")


def slowest(hub: Hub, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` connections holding the most queued bytes: who is slow right now."""
    now = time.monotonic()
    rows = [_describe(s, s.outbox.statistics(), now) for s in hub.subscribers()]
    rows.sort(key=lambda row: row["queued_bytes"], reverse=True)
    return rows[:limit]


def _describe(subscriber: Subscriber, stats: OutboxStatistics, now: float) -> dict[str, Any]:
    oldest = None if stats.oldest_born is None else round(now - stats.oldest_born, 3)
    return {
        "conn_id": subscriber.conn_id,
        "peer": subscriber.peer,
        "mode": subscriber.mode.value,
        "subscriptions": len(subscriber.topics),
        "queued_messages": stats.queued_messages,
        "queued_bytes": stats.queued_bytes,
        "oldest_queued_seconds": oldest,
        "dropped": stats.dropped,
        "sent": stats.sent,
        "connected_seconds": round(now - subscriber.opened_at, 3),
    }


def snapshot(registry: CollectorRegistry, hub: Hub, bridge: Bridge | None) -> dict[str, Any]:
    """What the dashboard shows at one moment.

    ``metrics`` maps each sample of the ``/metrics`` registry (histogram buckets left out) to
    its value, or, for a labelled metric, to its values by label.
    """
    metrics: dict[str, Any] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            if sample.labels:
                label = ",".join(sample.labels.values())
                metrics.setdefault(sample.name, {})[label] = sample.value
            else:
                metrics[sample.name] = sample.value
    return {
        "time": time.time(),
        "metrics": metrics,
        "connections": slowest(hub, SLOWEST),
        "backplane": None if bridge is None else dataclasses.asdict(bridge.statistics()),
    }


async def stream(
    scope: Scope,
    receive: Receive,
    send: Send,
    make: Callable[[], dict[str, Any]],
    send_timeout: float,
    until: anyio.Event,
) -> None:
    """Answer one request with an event stream of ``make()`` every :data:`INTERVAL` seconds,
    until the client goes, a write takes longer than ``send_timeout``, or ``until`` is set
    (then the response ends, at most one interval later)."""
    await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
    while not until.is_set():
        body = b"data: " + json.dumps(make(), separators=(",", ":")).encode() + b"\n\n"
        with anyio.move_on_after(send_timeout) as write:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if write.cancelled_caught:
            await drop_connection(scope, receive)
            return
        with anyio.move_on_after(INTERVAL):
            while (await receive())["type"] != "http.disconnect":
                pass  # the body of a GET, if any, means nothing
            return
    await send({"type": "http.response.body", "body": b"", "more_body": False})
