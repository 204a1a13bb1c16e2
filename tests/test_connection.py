"""The connection actor with a fake socket: its exits and the codes it closes with."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from broadcaster.connection import Connection
from broadcaster.hub import Hub
from broadcaster.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from broadcaster.protocol import Frame
    from broadcaster.writer import Lane

GUARD = 10


class FakeSocket:
    """A socket whose client is the test: it feeds messages in and reads frames out."""

    lane: Lane | None = None

    def __init__(self, *, fail_on_receive: bool = False) -> None:
        self.to_server, self._incoming = anyio.create_memory_object_stream[str | bytes | None](100)
        self.frames: list[Frame] = []
        self.received = anyio.Event()
        self.closed_with: tuple[int, str] | None = None
        self._fail_on_receive = fail_on_receive

    async def receive(self) -> str | bytes | None:
        if self._fail_on_receive:
            raise RuntimeError("socket exploded")
        # Like uvicorn, hand over what has arrived without a checkpoint.
        try:
            return self._incoming.receive_nowait()
        except anyio.WouldBlock:
            return await self._incoming.receive()

    async def send(self, frames: Sequence[Frame]) -> None:
        self.frames.extend(frames)
        self.received.set()

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def close_streams(self) -> None:
        self.to_server.close()
        self._incoming.close()

    def messages(self) -> list[Any]:
        return [json.loads(frame.data) for frame in self.frames]


@asynccontextmanager
async def running_hub(mailbox_size: int = 100) -> AsyncIterator[Hub]:
    """Run a hub for the block."""
    hub = Hub(mailbox_size=mailbox_size, logger=structlog.get_logger())
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            yield hub
            tg.cancel_scope.cancel()


def connection(socket: FakeSocket, hub: Hub, topic: str | None = None) -> Connection:
    """A connection with default settings over ``socket``."""
    return Connection(socket, hub, Settings(), structlog.get_logger(), topic)


async def test_a_flood_larger_than_the_mailbox_waits_for_room_and_loses_nothing() -> None:
    """A reader publishing faster than a one-slot mailbox drains waits, and every frame arrives."""
    socket = FakeSocket()
    for n in range(50):
        socket.to_server.send_nowait(str(n))
    async with running_hub(mailbox_size=1) as hub, anyio.create_task_group() as tg:
        tg.start_soon(connection(socket, hub, "t").run)
        with anyio.fail_after(GUARD):
            while len(socket.frames) < 50:
                socket.received = anyio.Event()
                await socket.received.wait()
        await socket.to_server.send(None)
    socket.close_streams()
    assert [frame.data for frame in socket.frames] == [str(n) for n in range(50)]
    assert hub.statistics().topics == {}


async def test_client_leaving_ends_the_connection_without_a_close_frame() -> None:
    """When the client goes, the connection leaves the hub and does not try to close."""
    socket = FakeSocket()
    async with running_hub() as hub:
        async with anyio.create_task_group() as tg:
            tg.start_soon(connection(socket, hub).run)
            await socket.to_server.send('{"op":"subscribe","topic":"t"}')
            await socket.to_server.send('{"op":"ping"}')
            await socket.to_server.send(None)
        await anyio.wait_all_tasks_blocked()
        assert hub.statistics().subscribers == 0
    socket.close_streams()
    assert socket.closed_with is None


async def test_hub_stopping_closes_the_connection_with_1001() -> None:
    """A hub that stops closes its connections with 1001 and the shutdown reason."""
    socket = FakeSocket()
    async with anyio.create_task_group() as outer:
        async with running_hub() as hub:
            outer.start_soon(connection(socket, hub).run)
            await socket.to_server.send('{"op":"subscribe","topic":"t"}')
            with anyio.fail_after(GUARD):
                await socket.received.wait()
    socket.close_streams()
    assert socket.closed_with == (1001, "server shutting down")


async def test_an_unexpected_error_closes_with_1011_and_logs_the_traceback() -> None:
    """A bug in a connection closes only that connection with 1011 and logs it with exc_info."""
    socket = FakeSocket(fail_on_receive=True)
    async with running_hub() as hub:
        with capture_logs() as logs:
            await connection(socket, hub).run()
        assert hub.statistics().running
    socket.close_streams()
    assert socket.closed_with == (1011, "internal error")
    crashed = [e for e in logs if e["event"] == "connection_crashed"]
    assert len(crashed) == 1
    assert crashed[0]["log_level"] == "error"


async def test_a_stopped_hub_refuses_the_connection_with_1011() -> None:
    """A connection that starts after the hub stopped is closed with 1011 at once."""
    socket = FakeSocket()
    hub = Hub(mailbox_size=1, logger=structlog.get_logger())
    await connection(socket, hub).run()
    socket.close_streams()
    assert socket.closed_with == (1011, "hub stopped")


@pytest.mark.parametrize("frame", ['{"op":"subscribe","topic":"t"}', '{"op":"bogus"}'])
async def test_control_frames_answer_in_order(frame: str) -> None:
    """Each command is answered in order, and ping is always answered with pong."""
    socket = FakeSocket()
    async with running_hub() as hub, anyio.create_task_group() as tg:
        tg.start_soon(connection(socket, hub).run)
        await socket.to_server.send(frame)
        await socket.to_server.send('{"op":"ping"}')
        with anyio.fail_after(GUARD):
            while len(socket.frames) < 2:
                socket.received = anyio.Event()
                await socket.received.wait()
        await socket.to_server.send(None)
    socket.close_streams()
    first, second = socket.messages()
    assert first["op"] in ("subscribed", "error")
    assert second == {"op": "pong"}
