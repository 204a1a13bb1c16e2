"""The baseline: the classic FastAPI "ConnectionManager", which awaits each socket in turn.

It speaks broadcaster's wire protocol (raw ``/ws/{topic}``, multiplexed ``/ws`` with per-topic
``seq``, ``POST /publish/{topic}``) so that the same stress scenarios drive both servers, and
encodes each message once per publish, as broadcaster does. What it does not do is isolate
its clients: a publish awaits every subscriber's send before the next one starts, so one
client that stops reading stalls all of them, and nothing bounds what queues up.

Run it as users run the classic example, with uvicorn's defaults::

    .venv/bin/uvicorn --app-dir benchmarks classic:app --port 8001

``python benchmarks/classic.py`` serves it on a free port and announces the port on stderr,
as ``broadcaster serve`` does, so that ``broadcaster stress`` can spawn and measure it.

``python benchmarks/classic.py --drop-failed-sends`` serves the pattern as it is usually
patched once clients come and go: a send that fails forgets that socket instead of failing
the whole publish (and with it the publisher's connection). It still awaits each socket in
turn.
"""

from __future__ import annotations

import json
import socket
import sys
from collections import defaultdict
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

app = FastAPI(title="classic ConnectionManager")


class ConnectionManager:
    """Topic to sockets, and a publish that awaits each socket in turn."""

    def __init__(self, *, drop_failed_sends: bool = False) -> None:
        self.drop_failed_sends = drop_failed_sends
        self.raw: defaultdict[str, set[WebSocket]] = defaultdict(set)
        self.mux: defaultdict[str, set[WebSocket]] = defaultdict(set)
        self.seq: defaultdict[str, int] = defaultdict(int)

    async def publish(self, topic: str, raw: str, data_json: str) -> int:
        """Send to every subscriber of ``topic``, one after the other."""
        self.seq[topic] += 1
        envelope = f'{{"topic":"{topic}","seq":{self.seq[topic]},"data":{data_json}}}'
        for websocket in list(self.raw[topic]):
            await self.send(websocket, raw)
        for websocket in list(self.mux[topic]):
            await self.send(websocket, envelope)
        return len(self.raw[topic]) + len(self.mux[topic])

    async def send(self, websocket: WebSocket, text: str) -> None:
        """Send one message; with ``drop_failed_sends``, a socket that fails is forgotten."""
        if not self.drop_failed_sends:
            await websocket.send_text(text)
            return
        try:
            await websocket.send_text(text)
        except Exception:  # whatever a gone client raises: the patch catches them all
            self.forget(websocket)

    def forget(self, websocket: WebSocket) -> None:
        """Remove a socket from every topic."""
        for members in (*self.raw.values(), *self.mux.values()):
            members.discard(websocket)


manager = ConnectionManager(drop_failed_sends="--drop-failed-sends" in sys.argv[1:])


@app.websocket("/ws/{topic}")
async def raw_endpoint(websocket: WebSocket, topic: str) -> None:
    """Raw mode: every text frame is published to ``topic`` verbatim."""
    await websocket.accept()
    manager.raw[topic].add(websocket)
    try:
        while True:
            text = await websocket.receive_text()
            await manager.publish(topic, text, json.dumps(text))
    except WebSocketDisconnect:
        manager.forget(websocket)


@app.websocket("/ws")
async def mux_endpoint(websocket: WebSocket) -> None:
    """Multiplexed mode: subscribe, unsubscribe, publish and ping as JSON frames."""
    await websocket.accept()
    try:
        while True:
            frame: dict[str, Any] = json.loads(await websocket.receive_text())
            op, topic = frame.get("op"), frame.get("topic", "")
            if op == "subscribe":
                manager.mux[topic].add(websocket)
                await websocket.send_text(json.dumps({"op": "subscribed", "topic": topic}))
            elif op == "unsubscribe":
                manager.mux[topic].discard(websocket)
            elif op == "publish":
                data = frame["data"]
                raw = data if isinstance(data, str) else json.dumps(data)
                await manager.publish(topic, raw, json.dumps(data))
            elif op == "ping":
                await websocket.send_text('{"op":"pong"}')
    except WebSocketDisconnect:
        manager.forget(websocket)


@app.post("/publish/{topic}")
async def publish_endpoint(topic: str, request: Request) -> dict[str, Any]:
    """Publish the body as text, awaiting every subscriber."""
    text = (await request.body()).decode()
    subscribers = await manager.publish(topic, text, json.dumps(text))
    return {"topic": topic, "seq": manager.seq[topic], "subscribers": subscribers}


def main() -> None:
    """Serve on a free 127.0.0.1 port, announcing it the way ``broadcaster serve`` does.

    Everything else is uvicorn's defaults, as the classic example runs.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    announcement = {"event": "server_starting", "host": "127.0.0.1", "port": sock.getsockname()[1]}
    print(json.dumps(announcement), file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
