"""What the server's registry says, through ``GET /topics``: subscribers per topic.

A raw socket is subscribed by the server after its handshake, with nothing sent to the
client, and a connection leaves the registry shortly after its socket closes, with no sign to
the outside; ``/topics`` is the only way to tell, and it has no event to wait on, hence the
polling, always against a deadline.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# How often the registry is asked again while waiting on it.
POLL_SECONDS = 0.05


def listed_topics(base_url: str, timeout: float) -> dict[str, int] | None:
    """Return the server's subscriber count per topic; ``None`` if it does not say."""
    url = "http" + base_url.removeprefix("ws") + "/topics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            listed = json.load(response)
    except (OSError, ValueError):
        return None
    return listed if isinstance(listed, dict) else None


def wait_listed(base_url: str, wanted: Mapping[str, int], timeout: float) -> bool:
    """Wait until the server lists at least ``wanted`` subscribers on each topic.

    Returns false when ``timeout`` seconds pass first; a server without ``/topics`` is
    not waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        listed = listed_topics(base_url, timeout)
        if listed is None or all(listed.get(t, 0) >= n for t, n in wanted.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def leftover(base_url: str, topics: Iterable[str], timeout: float) -> int | None:
    """Return the subscribers still listed on ``topics``, once none are or ``timeout`` passes.

    ``None`` when the server does not say.
    """
    names = list(topics)
    deadline = time.monotonic() + timeout
    while True:
        listed = listed_topics(base_url, timeout)
        if listed is None:
            return None
        left = sum(listed.get(name, 0) for name in names)
        if left == 0 or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_SECONDS)
