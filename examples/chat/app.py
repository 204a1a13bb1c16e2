"""The classic FastAPI WebSocket chat, served by broadcaster.

Run it from the project's root, with the project's virtualenv::

    .venv/bin/python examples/chat/app.py                          # http://127.0.0.1:8000/
    BROADCASTER_PORT=8080 .venv/bin/python examples/chat/app.py

Then open the page in two browser tabs. Every tab connects to ``/ws/chat`` in raw mode, so
each frame a tab sends is published verbatim to every tab on the topic, the sender included:
the page shows a message once the server has fanned it out, never before. Other clients can
join the conversation too, for example ``curl -d 'hello from curl' localhost:8000/publish/chat``.

Unlike the classic "for each connection: await send" manager, a tab that stops reading cannot
stall the others: each socket has a bounded outbox and the server's overflow policy
(``BROADCASTER_OVERFLOW``) decides what happens to a laggard. Every ``BROADCASTER_*``
variable applies, as it does to ``broadcaster serve``.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi.responses import HTMLResponse

from broadcaster import Settings, create_app
from broadcaster.cli import load_settings
from broadcaster.log import configure_logging
from broadcaster.server import run

if TYPE_CHECKING:
    from collections.abc import Callable

    from fastapi import FastAPI

# Read once: the page is small and never changes while the server runs.
INDEX_HTML = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")


def build_app(settings: Settings, on_hub_failure: Callable[[], None] = lambda: None) -> FastAPI:
    """Return broadcaster's app (``/ws``, ``/ws/{topic}``, ``/publish/{topic}``...) plus ``/``.

    Args:
        settings: the server's settings.
        on_hub_failure: called if the hub crashes, so that the server can stop rather than
            accept sockets that would never receive anything.
    """
    app = create_app(settings, on_hub_failure)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(INDEX_HTML)

    return app


def main() -> None:
    """Serve the chat until SIGINT or SIGTERM, configured like ``broadcaster serve``."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    # run() serves through broadcaster's own WebSocket protocol class for uvicorn.
    sys.exit(run(settings, partial(build_app, settings)))


if __name__ == "__main__":
    main()
