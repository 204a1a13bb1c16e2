"""The fastlane and plain ASGI sends put the same bytes on the wire."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anyio
import httpx
from structlog.testing import capture_logs
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from tests.support import LiveServer, running_server, wait_until

if TYPE_CHECKING:
    from anyio.abc import SocketStream

TEXTS = ["short", "m" * 200, "l" * 70_000]
BINARIES = [b"\x00\x01", bytes(range(256)) * 200]


class RawClient:
    """A WebSocket client that keeps every byte the server sent after the handshake."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.protocol = WSConnection(ConnectionType.CLIENT)
        self.wire = bytearray()
        self.messages: list[str | bytes] = []
        self._partial: list[str | bytes] = []

    @classmethod
    async def connect(cls, live: LiveServer, path: str) -> RawClient:
        """Connect and complete the opening handshake."""
        client = cls(await anyio.connect_tcp("127.0.0.1", live.port))
        await client.stream.send(client.protocol.send(Request(host="127.0.0.1", target=path)))
        while not any(isinstance(e, AcceptConnection) for e in client._feed(await client._read())):
            pass
        client.wire.clear()
        return client

    async def send_text(self, text: str) -> None:
        """Send one text message."""
        await self.stream.send(self.protocol.send(TextMessage(data=text)))

    async def read_messages(self, count: int) -> None:
        """Read until ``count`` messages have arrived in all."""
        with anyio.fail_after(10):
            while len(self.messages) < count:
                data = await self._read()
                self.wire += data
                for event in self._feed(data):
                    if isinstance(event, Message):
                        self._partial.append(event.data)
                        if event.message_finished:
                            joined = self._partial[0][:0].join(self._partial)  # type: ignore[arg-type]
                            self.messages.append(joined)
                            self._partial.clear()

    async def _read(self) -> bytes:
        return await self.stream.receive()

    def _feed(self, data: bytes) -> list[object]:
        self.protocol.receive_data(data)
        return list(self.protocol.events())


async def capture(plain_asgi: bool) -> tuple[bytes, bytes]:
    """Publish the same messages to a multiplexed and a raw client; return their raw bytes."""
    with capture_logs() as logs:
        async with running_server(plain_asgi=plain_asgi) as live:
            mux = await RawClient.connect(live, "/ws")
            raw = await RawClient.connect(live, "/ws/bin")
            await mux.send_text(json.dumps({"op": "subscribe", "topic": "t"}))
            await mux.read_messages(1)
            await wait_until(lambda: live.broadcaster.hub.statistics().topics == {"t": 1, "bin": 1})
            for text in TEXTS:
                await live.broadcaster.publish("t", text)
            async with httpx.AsyncClient(base_url=live.http_url, trust_env=False) as http:
                for body in BINARIES:
                    response = await http.post(
                        "/publish/bin",
                        content=body,
                        headers={"content-type": "application/octet-stream"},
                    )
                    assert response.status_code == 200
            await mux.read_messages(1 + len(TEXTS))
            await raw.read_messages(len(BINARIES))
            await mux.stream.aclose()
            await raw.stream.aclose()
    assert [json.loads(m)["data"] for m in mux.messages[1:]] == TEXTS
    assert raw.messages == BINARIES
    opened = [e for e in logs if e["event"] == "connection_opened"]
    assert [e["fastlane"] for e in opened] == [not plain_asgi] * 2
    return bytes(mux.wire), bytes(raw.wire)


async def test_fastlane_and_plain_asgi_write_identical_bytes() -> None:
    """Text frames of every length class and binary frames are byte-for-byte the same."""
    assert await capture(plain_asgi=False) == await capture(plain_asgi=True)
