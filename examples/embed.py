"""Embed broadcaster into an existing FastAPI app: live order updates under ``/live``.

Run it, subscribe to ``orders`` and place an order::

    .venv/bin/python examples/embed.py
    .venv/bin/python examples/subscriber.py orders --url ws://127.0.0.1:8000/live/ws
    curl -H 'content-type: application/json' -d '{"item": "tea", "quantity": 2}' \\
        http://127.0.0.1:8000/orders

The app owns its routes (``POST /orders``, ``GET /orders``) and mounts broadcaster's under
``/live``: ``/live/ws``, ``/live/ws/{topic}``, ``/live/publish/{topic}``, ``/live/healthz`` and
``/live/topics``. The hub runs in the app's lifespan; application code publishes with
``await live.publish(topic, data)``, which waits for room in the hub's mailbox rather than
failing, so a burst of orders is slowed down instead of lost. Every ``BROADCASTER_*``
variable applies, for example ``BROADCASTER_PORT=8001 .venv/bin/python examples/embed.py``.
``python examples/embed.py`` serves with broadcaster's WebSocket protocol class; under any
other ASGI server (``uvicorn --app-dir examples embed:app``) the app works too, through
plain ASGI sends.
"""

from __future__ import annotations

import itertools
import sys
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from broadcaster import Broadcaster, HubStopped, Settings
from broadcaster.log import configure_logging
from broadcaster.server import run

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class NewOrder(BaseModel):
    """An order as a client places it."""

    item: Annotated[str, Field(min_length=1, max_length=100)]
    quantity: Annotated[int, Field(gt=0, le=1000)]


class Order(NewOrder):
    """An order as the shop records it."""

    id: int
    placed_at: datetime


# The existing app's configuration would normally live here too. Settings() reads the
# BROADCASTER_* variables: queue bounds, overflow policy, timeouts, host and port.
settings = Settings()
live = Broadcaster(settings)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the hub while the app runs; other startup work (database pools...) goes here too."""
    async with live.lifespan():
        yield


app = FastAPI(title="shop", lifespan=lifespan)
app.include_router(live.router, prefix="/live")

_orders: list[Order] = []
_ids = itertools.count(1)


@app.post("/orders", status_code=201)
async def place_order(new: NewOrder) -> Order:
    """Record an order and tell every subscriber of ``orders`` about it."""
    order = Order(id=next(_ids), placed_at=datetime.now(UTC), **new.model_dump())
    _orders.append(order)
    try:
        await live.publish("orders", {"event": "placed", "order": order.model_dump(mode="json")})
    except HubStopped:
        raise HTTPException(503, "live updates are down") from None
    return order


@app.get("/orders")
async def list_orders() -> list[Order]:
    """Every order placed since the app started."""
    return _orders


def main() -> None:
    """Serve the shop until SIGINT or SIGTERM, with broadcaster's WebSocket protocol class."""
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(run(settings, lambda stop_server: app))


if __name__ == "__main__":
    main()
