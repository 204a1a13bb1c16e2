"""`broadcaster serve --workers N`: several processes on one port, sharing Redis."""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING

import anyio
import httpx
import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from tests.brokers import running_broker
from tests.support import (
    client,
    node_health,
    receive_envelopes,
    serving,
    subscribe,
    subscribed_to,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager
    from subprocess import Popen

    from websockets.asyncio.client import ClientConnection

    from tests.support import Health

COUNT = 100
MAX_CLIENTS = 40


def two_workers(broker_url: str) -> AbstractContextManager[tuple[Popen[str], int]]:
    """Serve with two workers sharing the Redis at ``broker_url``."""
    return serving({"BROADCASTER_BACKPLANE": broker_url}, "--workers", "2")


def connections(answers: Health) -> Iterator[int]:
    """Each worker's open connections."""
    return (answer["connections"] for answer in answers.values())


def gone(pid: int) -> bool:
    """Whether a process has exited (a zombie left for init to reap counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_clients_on_both_workers_get_every_message() -> None:
    """Connections land on both workers, and a publish reaches every client once, in order."""
    async with running_broker("redis") as broker, AsyncExitStack() as stack:
        process, port = stack.enter_context(two_workers(broker.url))
        base = f"http://127.0.0.1:{port}"
        clients: list[ClientConnection] = []
        answers: Health = {}
        # The kernel picks the worker that accepts each connection: connect until both hold one.
        while not answers or not all(connections(answers)):
            assert len(clients) < MAX_CLIENTS, "every connection landed on one worker"
            connection = await stack.enter_async_context(client(f"ws://127.0.0.1:{port}/ws"))
            await subscribe(connection, "feed")
            clients.append(connection)
            answers = await node_health(base, 2, lambda a: sum(connections(a)) == len(clients))
        assert len({answer["pid"] for answer in answers.values()}) == 2
        await node_health(base, 2, subscribed_to(1))
        async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
            for n in range(COUNT):
                await http.post("/publish/feed", json={"n": n})
        for connection in clients:
            envelopes = await receive_envelopes(connection, COUNT)
            assert [envelope["data"]["n"] for envelope in envelopes] == list(range(COUNT))
        process.send_signal(signal.SIGTERM)
        for connection in clients:
            with anyio.fail_after(20), pytest.raises(ConnectionClosed):
                await connection.recv()
            assert connection.close_code == 1001
        with anyio.fail_after(20):
            assert await anyio.to_thread.run_sync(process.wait) == 0


async def test_a_worker_that_dies_stops_the_others_with_status_1() -> None:
    """When one worker dies, the supervisor stops the other and exits with status 1."""
    async with running_broker("redis") as broker:
        with two_workers(broker.url) as (process, port):
            answers = await node_health(f"http://127.0.0.1:{port}", 2, lambda a: True)
            first, second = (answer["pid"] for answer in answers.values())
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(20):
                assert await anyio.to_thread.run_sync(process.wait) == 1
            await wait_until(lambda: gone(second))


async def test_workers_stop_when_their_supervisor_is_killed() -> None:
    """Workers whose supervisor was killed outright stop by themselves."""
    async with running_broker("redis") as broker:
        with two_workers(broker.url) as (process, port):
            answers = await node_health(f"http://127.0.0.1:{port}", 2, lambda a: True)
            process.kill()
            for answer in answers.values():
                await wait_until(partial(gone, answer["pid"]))
