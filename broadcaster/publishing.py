"""``POST /publish/{topic}``: one HTTP publish, from its request to its receipt.

:class:`HTTPPublish` answers a publish from the ASGI scope and receive channel alone, with no
per-request machinery: the app from ``create_app`` serves it before FastAPI's middleware and
router, and the FastAPI route (which keeps the endpoint in the OpenAPI schema, and serves
apps that mount the router themselves) calls the same method. Nothing is logged on success.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.responses import Response

from broadcaster.errors import (
    RETRY,
    SERVER_REFUSAL,
    BackplaneDown,
    HubBusy,
    HubStopped,
    ProtocolError,
    Refused,
)
from broadcaster.mailbox import Source
from broadcaster.protocol import Payload, parse_json_body, validate_topic

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import Receive, Scope

    from broadcaster.auth import Authenticator
    from broadcaster.hub import Hub

JSON = "application/json"
# A publisher that left before its body arrived; 499 as nginx logs it, never sent.
CLIENT_GONE = Refused(499, "client_disconnected", "the client left before its body arrived")


class HTTPPublish:
    """Publishes HTTP request bodies through the hub and answers with their receipts.

    Args:
        hub: the running hub.
        auth: checks the request's bearer token against the topic.
        max_body: the largest body, ``BROADCASTER_MAX_MESSAGE_BYTES``.
        count_refusal: counts and logs (at debug level) a refused request.
    """

    def __init__(
        self,
        hub: Hub,
        auth: Authenticator,
        max_body: int,
        count_refusal: Callable[[Refused, str | None], None],
    ) -> None:
        self._hub = hub
        self._auth = auth
        self._max_body = max_body
        self._count_refusal = count_refusal
        self._too_large = Refused(
            413, "body_too_large", f"the body is larger than {max_body} bytes"
        )

    async def respond(self, topic: str, scope: Scope, receive: Receive) -> Response:
        """Publish the request's body to ``topic`` and return the response that answers it:
        200 with the receipt; 400, 401, 403, 413 or 503 with ``{"detail": ...}`` (503 also
        when history is shared through a broker that is down)."""
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else None
        headers = dict(scope["headers"])
        try:
            # Before the body is read: an unauthenticated client gets nothing read for it.
            authorization = headers.get(b"authorization")
            self._auth.authorize_publish(
                authorization.decode("latin-1") if authorization else None, topic
            )
            try:
                validate_topic(topic)
            except ProtocolError as error:
                raise Refused(400, error.error, error.detail) from None
            body = await self._read_body(headers, receive)
        except Refused as refused:
            if refused is CLIENT_GONE and scope.get("extensions", {}).get(SERVER_REFUSAL):
                # The server cut the body off and counted that itself.
                return Response(status_code=refused.status)
            self._count_refusal(refused, peer)
            return _detail(refused.status, refused.detail, refused.headers)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        try:
            payload = _payload(content_type, body)
            pending = self._hub.publish_nowait(topic, payload, Source.HTTP)
            receipt = await pending.wait()
        except ProtocolError as error:
            return _detail(400, f"the body is not valid JSON: {error.detail}")
        except HubBusy:
            return _detail(503, "the hub is busy; retry shortly", RETRY)
        except HubStopped:
            return _detail(503, "the hub is not running", RETRY)
        except BackplaneDown as error:
            # History is shared and the broker that numbers it is down: no node may number
            # this publish on its own.
            self._count_refusal(Refused(503, "backplane_down", str(error)), peer)
            return _detail(503, str(error), RETRY)
        fields = {
            "topic": receipt.topic,
            "epoch": receipt.epoch,
            "seq": receipt.seq,
            "subscribers": receipt.subscribers,
        }
        return Response(json.dumps(fields, separators=(",", ":")), media_type=JSON)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """Read the body, up to the limit.

        Raises:
            Refused: 413 ``body_too_large``; :data:`CLIENT_GONE` when the client leaves.
        """
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise self._too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise CLIENT_GONE
            body += message.get("body", b"")
            if len(body) > self._max_body:
                raise self._too_large
            if not message.get("more_body", False):
                return bytes(body)


def _payload(content_type: str, body: bytes) -> Payload:
    """The payload a body makes, by its media type: JSON parsed, octets as bytes, else text
    (bytes if it is not UTF-8).

    Raises:
        ProtocolError: ``application/json`` that does not parse.
    """
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == JSON:
        return parse_json_body(body)
    if media_type == "application/octet-stream":
        return Payload(body)
    try:
        return Payload(body.decode())
    except UnicodeDecodeError:
        return Payload(body)


def _detail(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"detail": detail}, separators=(",", ":"))
    return Response(body, status, headers=headers, media_type=JSON)
