"""The WebSocket opening handshake as bytes in and bytes out (RFC 6455, section 4.2).

Pure: no I/O. :class:`broadcaster.ws_protocol.WebSocketProtocol` parses the request head
that uvicorn passes on with :func:`parse_request`, checks it with :func:`refusal`, and answers
with :func:`accept_response` or :func:`http_response`.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from wsproto.utilities import generate_accept_token

if TYPE_CHECKING:
    from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# A Sec-WebSocket-Key is 16 random bytes in base64.
KEY_LENGTH = 24


@dataclass(frozen=True, slots=True)
class Request:
    """An upgrade request's head, with header names in lower case as ASGI wants them.

    ``fields`` holds each header's value by name, its repeats joined with commas.
    """

    method: bytes
    raw_path: bytes
    query_string: bytes
    headers: Headers
    fields: dict[bytes, bytes]

    @property
    def subprotocols(self) -> list[str]:
        """The subprotocols the client offers, in its order of preference."""
        offered = self.fields.get(b"sec-websocket-protocol")
        if offered is None:
            return []
        return [name.strip() for name in offered.decode("latin-1").split(",") if name.strip()]


def parse_request(head: bytes) -> Request:
    """Read a request head that an HTTP parser has already accepted."""
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    headers = []
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            headers.append((name, value))
            fields[name] = fields[name] + b"," + value if name in fields else value
    raw_path, _, query = target.partition(b"?")
    return Request(method, raw_path, query, headers, fields)


def refusal(request: Request) -> tuple[HTTPStatus, Headers] | None:
    """The status (and headers) that answer a request that is no valid WebSocket handshake,
    or ``None`` for a valid one."""
    connection = {t.strip().lower() for t in (request.fields.get(b"connection") or b"").split(b",")}
    if request.method != b"GET" or b"upgrade" not in connection:
        return HTTPStatus.BAD_REQUEST, []
    if request.fields.get(b"sec-websocket-version") != b"13":
        return HTTPStatus.UPGRADE_REQUIRED, [(b"sec-websocket-version", b"13")]
    if len(request.fields.get(b"sec-websocket-key") or b"") != KEY_LENGTH:
        return HTTPStatus.BAD_REQUEST, []
    return None


def accept_response(
    request: Request, subprotocol: str | None, headers: Iterable[tuple[bytes, bytes]]
) -> bytes:
    """The 101 that completes the handshake of a valid ``request``."""
    key = request.fields.get(b"sec-websocket-key") or b""
    head = [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + generate_accept_token(key) + b"\r\n"
    ]
    if subprotocol:
        head.append(b"sec-websocket-protocol: " + subprotocol.encode() + b"\r\n")
    head.extend(name + b": " + value + b"\r\n" for name, value in headers)
    head.append(b"\r\n")
    return b"".join(head)


def http_response(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes | None) -> bytes:
    """An HTTP response that refuses the upgrade and closes the connection; with no ``body``,
    only its head (the body follows, delimited by its ``content-length`` or the close)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    headers = list(headers)
    head = [f"HTTP/1.1 {status} {phrase}\r\n".encode(), b"connection: close\r\n"]
    if body is not None and all(name.lower() != b"content-length" for name, _ in headers):
        head.append(b"content-length: %d\r\n" % len(body))
    head.extend(name + b": " + value + b"\r\n" for name, value in headers)
    head.append(b"\r\n")
    return b"".join(head) + (body or b"")
