"""What the server's registry says, through ``GET /topics``: subscribers per topic.

A raw socket is subscribed by the server after its handshake, with nothing sent to the
client, and a connection leaves the registry shortly after its socket closes, with no sign to
the outside; ``/topics`` is the only way to tell, and it has no event to wait on, hence the
polling, always against a deadline.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# How often the registry is asked again while waiting on it.
POLL_SECONDS = 0.05


class RegistryRefused(Exception):
    """The server refused ``GET /topics``: it wants the admin token, or another one."""


def listed_topics(base_url: str, timeout: float, token: str | None) -> dict[str, int] | None:
    """Return the server's subscriber count per topic; ``None`` if it does not say.

    Raises:
        RegistryRefused: the server answered 401 or 403 (``token`` is its
            ``BROADCASTER_ADMIN_TOKEN``, needed unless this machine is the server's).
    """
    url = "http" + base_url.removeprefix("ws") + "/topics"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as response:
            listed = json.load(response)
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise RegistryRefused(
                f"GET /topics answered {error.code}: give the server's "
                "BROADCASTER_ADMIN_TOKEN with --admin-token"
            ) from None
        return None
    except (OSError, ValueError):
        return None
    return listed if isinstance(listed, dict) else None


def wait_listed(
    base_url: str, wanted: Mapping[str, int], timeout: float, token: str | None
) -> bool:
    """Wait until the server lists at least ``wanted`` subscribers on each topic.

    Returns false when ``timeout`` seconds pass first; a server without ``/topics`` is
    not waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        listed = listed_topics(base_url, timeout, token)
        if listed is None or all(listed.get(t, 0) >= n for t, n in wanted.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def leftover(base_url: str, topics: Iterable[str], timeout: float, token: str | None) -> int | None:
    """Return the subscribers still listed on ``topics``, once none are or ``timeout`` passes.

    ``None`` when the server does not say.
    """
    names = list(topics)
    deadline = time.monotonic() + timeout
    while True:
        listed = listed_topics(base_url, timeout, token)
        if listed is None:
            return None
        left = sum(listed.get(name, 0) for name in names)
        if left == 0 or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_SECONDS)
