"""Who may subscribe and publish: publish tokens, JWTs and topic patterns. No I/O.

A credential is a bearer token: from the ``Authorization: Bearer`` header, or, for a
WebSocket handshake (browsers cannot set headers on one), the ``token`` query parameter.
One of ``BROADCASTER_PUBLISH_TOKENS`` grants everything; a JWT signed with the configured key
grants the topics its ``subscribe`` and ``publish`` claims list, until its ``exp``. With
neither configured, everyone may do everything, as before this module existed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broadcaster.errors import Refused
from broadcaster.settings import Settings, normal_origin, parse_public_key

if TYPE_CHECKING:
    from collections.abc import Mapping

# The query parameter a browser puts its token in, since it cannot set headers on a handshake.
TOKEN_PARAMETER = "token"
# What a 401 tells the client to present.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="broadcaster"'}


@dataclass(frozen=True, slots=True)
class TopicPatterns:
    """A set of topics: exact names, ``prefix.*`` patterns, or ``*`` for every topic."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, claim: object) -> TopicPatterns:
        """Read a JWT claim: a list of topic names and patterns.

        Raises:
            ValueError: the claim is not a list of strings.
        """
        if not isinstance(claim, list) or not all(isinstance(item, str) for item in claim):
            raise ValueError("a list of topic names and patterns")
        names = frozenset(item for item in claim if not item.endswith("*"))
        # "news.*" keeps its dot, so that it matches "news.eu" but not "newsletter".
        prefixes = tuple(item[:-1] for item in claim if item.endswith(".*"))
        return cls(names, prefixes, everything="*" in claim)

    def matches(self, topic: str) -> bool:
        """Whether ``topic`` is in the set."""
        return self.everything or topic in self.names or topic.startswith(self.prefixes)


EVERY_TOPIC = TopicPatterns(everything=True)
NO_TOPIC = TopicPatterns()


@dataclass(frozen=True, slots=True)
class Grant:
    """What one credential allows, and until when (Unix seconds; ``None`` for ever)."""

    subscribe: TopicPatterns
    publish: TopicPatterns
    expires: float | None = None


FULL = Grant(EVERY_TOPIC, EVERY_TOPIC)


def bearer(authorization: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header, ``None`` without one."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    """Turns credentials into grants, as the settings say.

    Args:
        settings: the publish tokens and JWT key, if any.
    """

    def __init__(self, settings: Settings) -> None:
        self._tokens = [token.get_secret_value().encode() for token in settings.publish_tokens]
        self._key: Any = None
        self._algorithm = "HS256"
        if settings.jwt_secret is not None:
            self._key = settings.jwt_secret.get_secret_value()
        elif settings.jwt_public_key is not None:
            pem = settings.jwt_public_key.get_secret_value()
            self._key, self._algorithm = parse_public_key(pem)
        self._subscribe_open = settings.subscribe_open
        self._publish_open = settings.publish_open

    def handshake(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Grant:
        """Return what a WebSocket handshake's credential allows.

        Raises:
            Refused: 403 ``missing_token`` when subscribing needs one and none was given;
                403 ``invalid_token`` or ``token_expired`` for a credential that is not valid.
        """
        credential = bearer(headers.get("authorization")) or query.get(TOKEN_PARAMETER)
        if credential is None and self._subscribe_open:
            return Grant(EVERY_TOPIC, EVERY_TOPIC if self._publish_open else NO_TOPIC)
        return self.grant(credential)

    def authorize_publish(self, authorization: str | None, topic: str) -> None:
        """Check an HTTP publish's ``Authorization`` header.

        Raises:
            Refused: 401 ``missing_token`` (with ``WWW-Authenticate``) without a bearer
                token; 403 ``invalid_token``, ``token_expired`` or ``forbidden_topic``.
        """
        if self._publish_open:
            return
        if not self.publish_topics(authorization).matches(topic):
            raise Refused(403, "forbidden_topic", "the token does not allow publishing here")

    def publish_topics(self, authorization: str | None) -> TopicPatterns:
        """Return the topics an HTTP publish's ``Authorization`` header may publish to.

        Raises:
            Refused: 401 ``missing_token`` (with ``WWW-Authenticate``) without a bearer
                token; 403 ``invalid_token`` or ``token_expired``.
        """
        if self._publish_open:
            return EVERY_TOPIC
        credential = bearer(authorization)
        if credential is None:
            raise Refused(401, "missing_token", "publishing needs a bearer token", CHALLENGE)
        return self.grant(credential).publish

    def grant(self, credential: str | None) -> Grant:
        """Return what ``credential`` allows.

        Raises:
            Refused: 403 ``missing_token``, ``invalid_token`` or ``token_expired``.
        """
        if self._publish_open:
            return FULL  # nothing is configured: credentials are neither needed nor checked
        if credential is None:
            raise Refused(403, "missing_token", "a token is needed to connect")
        if self._is_publish_token(credential):
            return FULL
        if self._key is None:
            raise Refused(403, "invalid_token", "the token is not a publish token")
        import jwt  # only servers with a JWT key load it (see parse_public_key)

        try:
            claims = jwt.decode(
                credential, self._key, algorithms=[self._algorithm], options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise Refused(403, "token_expired", "the token has expired") from None
        except jwt.InvalidTokenError as error:
            raise Refused(403, "invalid_token", f"the token is not valid: {error}") from None
        try:
            subscribe = TopicPatterns.parse(claims.get("subscribe", []))
            publish = TopicPatterns.parse(claims.get("publish", []))
        except ValueError as error:
            raise Refused(403, "invalid_token", f"topic claims must be {error}") from None
        return Grant(subscribe, publish, float(claims["exp"]))

    def _is_publish_token(self, credential: str) -> bool:
        presented = credential.encode(errors="replace")
        # Compare with every token, so that the time taken says nothing about which matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake's ``Origin`` may connect: always without an allowlist, and for
    clients that send none (browsers always send one, so only they are held to the list).

    Args:
        origin: the handshake's ``Origin`` header.
        allowed: origins spelled by :func:`normal_origin`.
    """
    return origin is None or not allowed or normal_origin(origin) in allowed
