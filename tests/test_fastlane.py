"""The fastlane and plain ASGI sends put the same bytes on the wire."""

from __future__ import annotations

import json

import httpx
from structlog.testing import capture_logs

from tests.support import RawClient, running_server, wait_until

TEXTS = ["short", "m" * 200, "l" * 70_000]
BINARIES = [b"\x00\x01", bytes(range(256)) * 200]


async def capture(plain_asgi: bool) -> tuple[bytes, bytes]:
    """Publish the same messages to a multiplexed and a raw client; return their raw bytes."""
    with capture_logs() as logs:
        async with running_server(plain_asgi=plain_asgi) as live:
            mux = await RawClient.connect(live, "/ws")
            raw = await RawClient.connect(live, "/ws/bin")
            await mux.send_text(json.dumps({"op": "subscribe", "topic": "t"}))
            await mux.read_messages(1)
            # The acknowledgement carries the server's epoch, random per process: compare
            # from the messages on.
            mux.wire.clear()
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
