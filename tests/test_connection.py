"""The connection actor with a fake socket: its exits and the codes it closes with."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from broadcaster.auth import FULL, NO_TOPIC, Grant, TopicPatterns
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
async def running_hub(mailbox_size: int = 100, max_subscriptions: int = 100) -> AsyncIterator[Hub]:
    """Run a hub for the block."""
    hub = Hub(
        mailbox_size=mailbox_size,
        logger=structlog.get_logger(),
        max_subscriptions=max_subscriptions,
    )
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(hub.run)
            yield hub
            tg.cancel_scope.cancel()


def connection(
    socket: FakeSocket,
    hub: Hub,
    topic: str | None = None,
    *,
    settings: Settings | None = None,
    grant: Grant = FULL,
) -> Connection:
    """A connection over ``socket``, with default settings unless given, on a clock that
    stands still so that rate limits never refill."""
    return Connection(
        socket,
        hub,
        settings or Settings(),
        structlog.get_logger(),
        topic,
        grant=grant,
        clock=lambda: 0.0,
    )


async def closed_with(connection: Connection, socket: FakeSocket, *frames: str) -> object:
    """Feed ``frames`` to a connection, run it until it ends, and return its close."""
    for frame in frames:
        socket.to_server.send_nowait(frame)
    with anyio.fail_after(GUARD):
        await connection.run()
    socket.close_streams()
    return socket.closed_with


async def answers(socket: FakeSocket, hub: Hub, frames: list[str], **options: Any) -> list[Any]:
    """Send multiplexed ``frames``, each followed by a ping to wait for its answers (error
    frames come from the reader, others from the hub), and return the answers."""
    pong = {"op": "pong"}
    async with anyio.create_task_group() as tg:
        tg.start_soon(connection(socket, hub, **options).run)
        for count, frame in enumerate(frames, 1):
            await socket.to_server.send(frame)
            await socket.to_server.send('{"op":"ping"}')
            with anyio.fail_after(GUARD):
                while socket.messages().count(pong) < count:
                    socket.received = anyio.Event()
                    await socket.received.wait()
        await socket.to_server.send(None)
    socket.close_streams()
    return [message for message in socket.messages() if message != pong]


def subscribed(topic: str, seq: int = 0) -> dict[str, Any]:
    """Match a subscribed frame by its topic and seq, whatever its epoch."""
    return {"op": "subscribed", "topic": topic, "epoch": ANY, "seq": seq}


def error(code: str, topic: str | None = None) -> dict[str, str]:
    """Match an error frame by its code and the topic it names, whatever its detail."""
    named = {} if topic is None else {"topic": topic}
    return {"op": "error", **named, "error": code, "detail": ANY}


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
    hub = Hub(mailbox_size=1, logger=structlog.get_logger(), max_subscriptions=1)
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


async def test_a_client_over_its_frame_rate_is_closed_with_1008() -> None:
    """Past its burst of frames a second, a connection is closed with 1008."""
    socket = FakeSocket()
    settings = Settings(max_messages_per_second=3)
    async with running_hub() as hub:
        frames = ['{"op":"ping"}'] * 4
        close = await closed_with(connection(socket, hub, settings=settings), socket, *frames)
    assert close == (1008, "rate limit exceeded")
    assert socket.messages() == [{"op": "pong"}] * 3


async def test_a_client_over_its_byte_rate_is_closed_with_1008() -> None:
    """Past its burst of bytes a second, a raw-mode connection is closed with 1008."""
    socket = FakeSocket()
    settings = Settings(max_message_bytes=100, max_bytes_per_second=150)
    async with running_hub() as hub:
        close = await closed_with(
            connection(socket, hub, "t", settings=settings), socket, "x" * 100, "y" * 51
        )
        await anyio.wait_all_tasks_blocked()
        assert dict(hub.statistics().published) == {"ws": 1}
    assert close == (1008, "rate limit exceeded")


@pytest.mark.parametrize("frame", ["x" * 11, "\u00e9" * 6, b"x" * 11])
async def test_a_frame_over_the_size_limit_is_closed_with_1009(frame: str) -> None:
    """A frame over MAX_MESSAGE_BYTES, counted in UTF-8 bytes, closes with 1009 on any server."""
    socket = FakeSocket()
    settings = Settings(max_message_bytes=10)
    async with running_hub() as hub:
        close = await closed_with(connection(socket, hub, "t", settings=settings), socket, frame)
    assert close == (1009, "message too big")
    assert socket.frames == []


async def test_a_connection_is_closed_with_1008_when_its_token_expires() -> None:
    """A client whose token expires while it is connected is closed with 1008."""
    socket = FakeSocket()
    grant = Grant(TopicPatterns.parse(["t"]), NO_TOPIC, expires=time.time() + 0.2)
    async with running_hub() as hub:
        close = await closed_with(connection(socket, hub, grant=grant), socket)
        await anyio.wait_all_tasks_blocked()
        assert hub.statistics().subscribers == 0
    assert close == (1008, "token expired")


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"settings": Settings(client_publish=False)}, "publishing disabled"),
        ({"grant": Grant(TopicPatterns.parse(["t"]), NO_TOPIC)}, "publishing not permitted"),
    ],
)
async def test_a_raw_client_that_may_not_publish_is_closed_with_1008_when_it_tries(
    options: dict[str, Any], reason: str
) -> None:
    """A raw-mode subscriber without the right to publish is closed on its first frame."""
    socket = FakeSocket()
    async with running_hub() as hub:
        close = await closed_with(connection(socket, hub, "t", **options), socket, "hello")
    assert close == (1008, reason)
    assert socket.frames == []


async def test_a_multiplexed_client_gets_error_frames_outside_its_grant() -> None:
    """Subscribing or publishing outside the token's topics is answered with forbidden_topic."""
    socket = FakeSocket()
    grant = Grant(TopicPatterns.parse(["a.*"]), TopicPatterns.parse(["a.x"]))
    frames = [
        '{"op":"subscribe","topic":"b"}',
        '{"op":"subscribe","topic":"a.x"}',
        '{"op":"publish","topic":"a.y","data":1}',
        '{"op":"publish","topic":"a.x","data":2}',
    ]
    async with running_hub() as hub:
        assert await answers(socket, hub, frames, grant=grant) == [
            error("forbidden_topic", "b"),
            subscribed("a.x"),
            error("forbidden_topic", "a.y"),
            {"topic": "a.x", "seq": 1, "data": 2},
        ]


async def test_client_publishing_switched_off_answers_publish_disabled() -> None:
    """With CLIENT_PUBLISH off a publish frame is refused; subscribing still works."""
    socket = FakeSocket()
    frames = ['{"op":"publish","topic":"t","data":1}', '{"op":"subscribe","topic":"t"}']
    async with running_hub() as hub:
        settings = Settings(client_publish=False)
        assert await answers(socket, hub, frames, settings=settings) == [
            error("publish_disabled", "t"),
            subscribed("t"),
        ]


async def test_subscriptions_past_the_limit_are_refused_until_one_is_dropped() -> None:
    """MAX_SUBSCRIPTIONS bounds a connection's topics; repeats and freed places are fine."""
    socket = FakeSocket()
    frames = [
        '{"op":"subscribe","topic":"a"}',
        '{"op":"subscribe","topic":"b"}',
        '{"op":"subscribe","topic":"c"}',
        '{"op":"subscribe","topic":"a"}',
        '{"op":"unsubscribe","topic":"a"}',
        '{"op":"subscribe","topic":"c"}',
    ]
    async with running_hub(max_subscriptions=2) as hub:
        assert await answers(socket, hub, frames) == [
            subscribed("a"),
            subscribed("b"),
            error("too_many_subscriptions", "c"),
            subscribed("a"),
            {"op": "unsubscribed", "topic": "a"},
            subscribed("c"),
        ]
