"""Tests for broadcaster.auth: topic patterns, publish tokens, JWT grants and origins."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
from base64 import urlsafe_b64encode
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broadcaster.auth import (
    CHALLENGE,
    EVERY_TOPIC,
    FULL,
    NO_TOPIC,
    Authenticator,
    TopicPatterns,
    bearer,
    origin_allowed,
)
from broadcaster.errors import Refused
from broadcaster.settings import Settings, parse_public_key
from tests.support import JWT_SECRET, PUBLISH_TOKEN, pem, token

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def refusal(call: Any, *args: Any) -> tuple[int, str]:
    """Call ``call`` and return the status and error code of the Refused it raises."""
    with pytest.raises(Refused) as refused:
        call(*args)
    assert refused.value.detail
    return refused.value.status, refused.value.error


@pytest.mark.parametrize(
    ("claim", "topic", "matches"),
    [
        (["news"], "news", True),
        (["news"], "news.eu", False),
        (["news.*"], "news.eu", True),
        (["news.*"], "news.eu.fr", True),
        (["news.*"], "news", False),
        (["news.*"], "newsletter", False),
        (["*"], "anything", True),
        ([], "news", False),
        (["a", "b.*"], "b.c", True),
    ],
)
def test_topic_patterns_match_exact_names_prefixes_and_everything(
    claim: list[str], topic: str, matches: bool
) -> None:
    """A claim lists exact topics, ``prefix.*`` patterns, or ``*`` for every topic."""
    assert TopicPatterns.parse(claim).matches(topic) is matches


@pytest.mark.parametrize("claim", ["news", [1], {"news": True}, None])
def test_a_topic_claim_that_is_not_a_list_of_strings_is_refused(claim: object) -> None:
    """Anything but a list of strings is not a topic claim."""
    with pytest.raises(ValueError, match="list of topic names"):
        TopicPatterns.parse(claim)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_reads_only_bearer_headers(header: str | None, expected: str | None) -> None:
    """The token of an ``Authorization: Bearer`` header; nothing for any other scheme."""
    assert bearer(header) == expected


def test_without_configuration_everyone_may_do_everything() -> None:
    """No token and no key: no credential is needed, and one that is given is not checked."""
    auth = Authenticator(Settings())
    assert auth.handshake({}, {}) == FULL
    assert auth.handshake({"authorization": "Bearer nonsense"}, {}) == FULL
    auth.authorize_publish(None, "t")


def test_publish_tokens_guard_publishing_but_not_subscribing() -> None:
    """With only publish tokens, anyone subscribes; publishing needs one of the tokens."""
    auth = Authenticator(Settings(publish_tokens=f"{'o' * 16},{PUBLISH_TOKEN}"))
    anonymous = auth.handshake({}, {})
    assert (anonymous.subscribe, anonymous.publish) == (EVERY_TOPIC, NO_TOPIC)
    assert auth.handshake({"authorization": f"Bearer {PUBLISH_TOKEN}"}, {}) == FULL
    assert auth.handshake({}, {"token": PUBLISH_TOKEN}) == FULL
    assert refusal(auth.handshake, {}, {"token": "guess"}) == (403, "invalid_token")
    auth.authorize_publish(f"Bearer {PUBLISH_TOKEN}", "t")
    assert refusal(auth.authorize_publish, None, "t") == (401, "missing_token")
    assert refusal(auth.authorize_publish, "Bearer guess", "t") == (403, "invalid_token")


def test_a_missing_bearer_token_is_challenged() -> None:
    """A 401 says how to authenticate, in ``WWW-Authenticate``."""
    auth = Authenticator(Settings(publish_tokens=PUBLISH_TOKEN))
    with pytest.raises(Refused) as refused:
        auth.authorize_publish("Basic dXNlcjpwYXNz", "t")
    assert refused.value.headers == CHALLENGE


def test_a_jwt_grants_the_topics_of_its_claims_until_it_expires() -> None:
    """An HS256 token's subscribe and publish claims become the grant, with its expiry."""
    auth = Authenticator(Settings(jwt_secret=JWT_SECRET))
    signed = token(subscribe=["news.*"], publish=["chat"])
    grant = auth.grant(signed)
    assert grant.subscribe.matches("news.eu")
    assert not grant.subscribe.matches("chat")
    assert grant.publish.matches("chat")
    assert grant.expires == jwt.decode(signed, options={"verify_signature": False})["exp"]
    auth.authorize_publish(f"Bearer {token(publish=['chat'])}", "chat")
    assert refusal(auth.authorize_publish, f"Bearer {token(publish=['chat'])}", "news") == (
        403,
        "forbidden_topic",
    )


def test_a_jwt_without_topic_claims_grants_nothing() -> None:
    """A valid token with no claims may connect but subscribe and publish to nothing."""
    grant = Authenticator(Settings(jwt_secret=JWT_SECRET)).grant(token())
    assert (grant.subscribe, grant.publish) == (NO_TOPIC, NO_TOPIC)


@pytest.mark.parametrize(
    ("credential", "error"),
    [
        (None, "missing_token"),
        ("not.a.jwt", "invalid_token"),
        (token(lifetime=-10), "token_expired"),
        (token(lifetime=None), "invalid_token"),
        (token(secret="w" * 32), "invalid_token"),
        (token(subscribe="news"), "invalid_token"),
        (token(publish=[7]), "invalid_token"),
        (token(algorithm="HS512"), "invalid_token"),
    ],
)
def test_a_bad_jwt_is_refused_with_403(credential: str | None, error: str) -> None:
    """Missing, malformed, expired, unsigned by us, badly claimed or wrongly signed: 403."""
    auth = Authenticator(Settings(jwt_secret=JWT_SECRET))
    assert refusal(auth.handshake, {}, {} if credential is None else {"token": credential}) == (
        403,
        error,
    )


@pytest.mark.parametrize(("private_key", "algorithm"), [(RSA_KEY, "RS256"), (EC_KEY, "ES256")])
def test_a_public_key_verifies_tokens_of_its_own_algorithm_only(
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, algorithm: str
) -> None:
    """RS256 and ES256 tokens verify against their public key; an HS256 one made with the
    public key as its secret (algorithm confusion) does not."""
    public = pem(private_key.public_key())
    auth = Authenticator(Settings(jwt_public_key=public))
    exp = int(time.time()) + 60
    signed = jwt.encode({"subscribe": ["t"], "exp": exp}, private_key, algorithm=algorithm)
    assert auth.grant(signed).subscribe.matches("t")
    assert refusal(auth.grant, hs256_signed_with(public)) == (403, "invalid_token")


def hs256_signed_with(secret: str) -> str:
    """A token granting everything, HMAC-signed with ``secret`` by hand (PyJWT refuses to
    sign with a public key), as an attacker who knows the public key would make one."""
    header = urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"subscribe": ["*"], "publish": ["*"], "exp": int(time.time()) + 60}
    body = urlsafe_b64encode(json.dumps(claims).encode())
    signing_input = header.rstrip(b"=") + b"." + body.rstrip(b"=")
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + urlsafe_b64encode(signature).rstrip(b"=")).decode()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (pem(ed25519.Ed25519PrivateKey.generate().public_key()), "only RSA"),
        (pem(ec.generate_private_key(ec.SECP384R1()).public_key()), "only RSA"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    ],
)
def test_unsupported_public_keys_are_refused(key: str, message: str) -> None:
    """Only RSA and P-256 keys are taken, so that the algorithm is fixed by the key."""
    with pytest.raises(ValueError, match=message):
        parse_public_key(key)


@pytest.mark.parametrize(
    ("origin", "allowed", "expected"),
    [
        ("https://app.example", (), True),
        (None, ("https://app.example",), True),
        ("https://app.example", ("https://app.example",), True),
        ("HTTPS://App.Example/", ("https://app.example",), True),
        ("https://evil.example", ("https://app.example",), False),
        ("null", ("https://app.example",), False),
    ],
)
def test_origins_are_checked_against_the_allowlist(
    origin: str | None, allowed: tuple[str, ...], expected: bool
) -> None:
    """Without a list any origin may connect; with one, only its origins (and non-browsers)."""
    assert origin_allowed(origin, allowed) is expected


def test_a_server_without_a_jwt_key_does_not_load_pyjwt() -> None:
    """PyJWT and cryptography (about 9 MiB) load only once a JWT key is configured."""
    script = (
        "import sys; from broadcaster.app import create_app; from broadcaster.settings import "
        f"Settings; create_app(Settings(publish_tokens='{PUBLISH_TOKEN}')); "
        "print(sorted(m for m in ('jwt', 'cryptography') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
