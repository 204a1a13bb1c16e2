"""The nginx configuration of docs/deployment.md, run by Debian's nginx in front of a real
``broadcaster serve``.

The page's ``nginx`` block is used as it is written, after the substitutions the page names:
the upstream address, the listening address, the certificate paths and, for the idle tests,
the read timeout. The test wraps it in an ``http`` block of its own, with every path nginx
writes under a temporary directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.frames import CloseCode

from tests.support import STOP_SECONDS, receive_json, serving, subscribe, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

NGINX = shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin") or ""
needs_nginx = pytest.mark.skipif(
    not NGINX, reason="nginx is not installed: apt-get install -y nginx"
)

PAGE = Path(__file__).parent.parent / "docs" / "deployment.md"
# The values of the page's block that name the production host, as the page writes them.
UPSTREAM = "server 127.0.0.1:8000;"
LISTEN = "listen 443 "
CERTIFICATE = "/etc/letsencrypt/live/live.example/fullchain.pem"
KEY = "/etc/letsencrypt/live/live.example/privkey.pem"
READ_TIMEOUT = "proxy_read_timeout 60s;"
# The idle tests' proxy read timeout, and the ping interval that must keep a connection open
# across several of them.
SHORT_READ_TIMEOUT = 2.0
SHORT_PING_INTERVAL = 0.5


def documented_block() -> str:
    """The page's fenced ``nginx`` block; there is exactly one."""
    blocks = re.findall(r"^```nginx\n(.*?)^```$", PAGE.read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1
    block: str = blocks[0]
    return block


def substitute(block: str, replacements: dict[str, str]) -> str:
    """Replace each documented value; fail if the page no longer has one of them."""
    for old, new in replacements.items():
        assert old in block, f"docs/deployment.md's nginx block no longer has {old!r}"
        block = block.replace(old, new)
    return block


def self_signed(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """Write a certificate for 127.0.0.1 and its key; return their paths and a client
    context that trusts the certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return cert_path, key_path, ssl.create_default_context(cafile=cert_path)


def free_port() -> int:
    """A port free on 127.0.0.1 now (nginx binds its own sockets, so it cannot be pre-bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@asynccontextmanager
async def nginx(directory: Path, block: str, port: int) -> AsyncIterator[None]:
    """Run nginx in the foreground with ``block`` inside its ``http`` block and every file it
    writes under ``directory``, until it listens on ``port``; stop it on exit."""
    temp_paths = "\n".join(
        f"{kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = directory / "nginx.conf"
    config.write_text(
        f"daemon off;\nmaster_process off;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\naccess_log {directory}/access.log;\n{temp_paths}\n{block}\n}}\n"
    )
    error_log = directory / "error.log"
    process = await anyio.open_process(
        [NGINX, "-p", str(directory), "-c", str(config), "-e", str(error_log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: process.returncode is not None or accepts(port))
        assert process.returncode is None, f"nginx exited:\n{error_log.read_text()}"
        yield
    finally:
        process.terminate()
        with anyio.move_on_after(STOP_SECONDS, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class Proxied:
    """A ``broadcaster serve`` process behind nginx."""

    server: subprocess.Popen[str]
    port: int
    tls: ssl.SSLContext

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def server_logs(self) -> list[dict[str, Any]]:
        """Stop the server and return every line it logged."""
        self.server.terminate()
        _, logs = self.server.communicate(timeout=STOP_SECONDS)
        return [json.loads(line) for line in logs.splitlines()]


@asynccontextmanager
async def proxied(
    tmp_path: Path, env: dict[str, str], read_timeout: str | None = None
) -> AsyncIterator[Proxied]:
    """``broadcaster serve`` with ``env``, behind nginx configured by the page."""
    cert, key, tls = self_signed(tmp_path)
    port = free_port()
    with serving(env) as (server, server_port):
        replacements = {
            UPSTREAM: f"server 127.0.0.1:{server_port};",
            LISTEN: f"listen 127.0.0.1:{port} ",
            CERTIFICATE: str(cert),
            KEY: str(key),
        }
        if read_timeout is not None:
            replacements[READ_TIMEOUT] = f"proxy_read_timeout {read_timeout};"
        async with nginx(tmp_path, substitute(documented_block(), replacements), port):
            yield Proxied(server, port, tls)


@asynccontextmanager
async def through(
    proxy: Proxied, path: str, source: str = "127.0.0.1", **options: Any
) -> AsyncIterator[ClientConnection]:
    """Connect a WebSocket client to nginx over TLS from the loopback address ``source``.

    Linux routes all of 127.0.0.0/8 to loopback, so each source address is another client
    address as far as nginx can tell. The client sends no pings of its own.
    """
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", proxy.port))
    url = f"wss://127.0.0.1:{proxy.port}{path}"
    async with connect(
        url, sock=sock, ssl=proxy.tls, proxy=None, compression=None, ping_interval=None, **options
    ) as connection:
        yield connection


async def publish(proxy: Proxied, topic: str, data: object) -> dict[str, Any]:
    """Publish ``data`` as JSON with ``POST /publish/{topic}`` through nginx; return the
    receipt."""
    async with httpx.AsyncClient(
        base_url=proxy.https_url, verify=proxy.tls, trust_env=False
    ) as http:
        response = await http.post(f"/publish/{topic}", json=data)
    assert response.status_code == 200, response.text
    receipt: dict[str, Any] = response.json()
    return receipt


@needs_nginx
async def test_subscribe_and_publish_through_nginx(tmp_path: Path) -> None:
    """A WebSocket subscribes over wss:// and gets what is published over https://."""
    async with proxied(tmp_path, {}) as proxy, through(proxy, "/ws") as connection:
        await subscribe(connection, "news")
        receipt = await publish(proxy, "news", {"headline": "proxied"})
        assert receipt == {"topic": "news", "epoch": ANY, "seq": 1, "subscribers": 1}
        assert await receive_json(connection) == {
            "topic": "news",
            "seq": 1,
            "data": {"headline": "proxied"},
        }


@needs_nginx
async def test_raw_mode_publish_through_nginx(tmp_path: Path) -> None:
    """A frame sent on a raw-mode socket (``/ws/{topic}``) through nginx reaches a
    multiplexed subscriber of that topic."""
    async with (
        proxied(tmp_path, {}) as proxy,
        through(proxy, "/ws") as receiver,
        through(proxy, "/ws/chat") as sender,
    ):
        await subscribe(receiver, "chat")
        await sender.send("hello")
        assert await receive_json(receiver) == {"topic": "chat", "seq": 1, "data": "hello"}


@needs_nginx
async def test_client_address_reaches_limits_and_logs(tmp_path: Path) -> None:
    """Each client's own address, forwarded by nginx, is what the handshake limit counts and
    the logs show; an X-Forwarded-For header the client sends does not change it."""
    env = {
        # One handshake per address, and the next one 100 s later.
        "BROADCASTER_MAX_HANDSHAKES_PER_SECOND": "0.01",
        "BROADCASTER_LOG_LEVEL": "debug",
    }
    async with proxied(tmp_path, env) as proxy:
        async with through(proxy, "/ws", source="127.0.0.2"):
            pass
        with pytest.raises(InvalidStatus) as refused:
            async with through(
                proxy, "/ws", source="127.0.0.2", additional_headers={"X-Forwarded-For": "1.2.3.4"}
            ):
                pass
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body or b"{}")["error"] == "rate_limited"
        # nginx connects from one address for everyone; another client is not refused.
        async with through(proxy, "/ws", source="127.0.0.3"):
            pass
        logs = proxy.server_logs()
    opened = [line["peer"] for line in logs if line["event"] == "connection_opened"]
    refusals = [line for line in logs if line["event"] == "request_refused"]
    assert [peer.rsplit(":", 1)[0] for peer in opened] == ["127.0.0.2", "127.0.0.3"]
    assert [(line["peer"].rsplit(":", 1)[0], line["status"]) for line in refusals] == [
        ("127.0.0.2", 429)
    ]


async def idle(seconds: float) -> None:
    """Let a connection sit idle for ``seconds``.

    Idling is what these tests are about: nothing is waited for, the time passing is the
    condition under test, so this sleep does not synchronise with anything.
    """
    await anyio.sleep(seconds)


@needs_nginx
async def test_idle_connection_outlives_the_proxy_timeout(tmp_path: Path) -> None:
    """A subscriber that sends nothing for three of nginx's read timeouts is still connected,
    since the server's pings keep the proxied connection busy, and gets the next message."""
    env = {"BROADCASTER_PING_INTERVAL": str(SHORT_PING_INTERVAL)}
    async with (
        proxied(tmp_path, env, read_timeout=f"{SHORT_READ_TIMEOUT:g}s") as proxy,
        through(proxy, "/ws") as connection,
    ):
        await subscribe(connection, "quiet")
        await idle(3 * SHORT_READ_TIMEOUT)
        await publish(proxy, "quiet", "still here")
        assert await receive_json(connection) == {"topic": "quiet", "seq": 1, "data": "still here"}


async def next_data(lines: AsyncIterator[str]) -> Any:
    """Read an event stream up to its next ``data:`` line and decode it."""
    with anyio.fail_after(10):
        async for line in lines:
            if line.startswith("data: "):
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the event stream ended")


@needs_nginx
async def test_idle_event_stream_outlives_the_proxy_timeout(tmp_path: Path) -> None:
    """A Server-Sent Events stream through nginx stays open across three of its read timeouts,
    kept busy by the server's keepalive comments, and delivers the next message."""
    env = {"BROADCASTER_PING_INTERVAL": str(SHORT_PING_INTERVAL)}
    async with (
        proxied(tmp_path, env, read_timeout=f"{SHORT_READ_TIMEOUT:g}s") as proxy,
        httpx.AsyncClient(base_url=proxy.https_url, verify=proxy.tls, trust_env=False) as http,
        http.stream("GET", "/sse/quiet") as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await next_data(lines))["op"] == "subscribed"
        await idle(3 * SHORT_READ_TIMEOUT)
        await publish(proxy, "quiet", "still here")
        assert await next_data(lines) == {"topic": "quiet", "seq": 1, "data": "still here"}


@needs_nginx
async def test_without_pings_the_proxy_closes_an_idle_connection(tmp_path: Path) -> None:
    """With the server's pings further apart than nginx's read timeout, nginx drops an idle
    subscriber after that timeout: the timeout the test above outlives is real."""
    env = {"BROADCASTER_PING_INTERVAL": "60"}
    async with (
        proxied(tmp_path, env, read_timeout=f"{SHORT_READ_TIMEOUT:g}s") as proxy,
        through(proxy, "/ws") as connection,
    ):
        await subscribe(connection, "quiet")
        started = anyio.current_time()
        with anyio.fail_after(10 * SHORT_READ_TIMEOUT):
            await connection.wait_closed()
        assert anyio.current_time() - started >= SHORT_READ_TIMEOUT - 0.5
        # nginx closed the TCP connection without a close frame (1006 on the client side).
        assert connection.close_code == CloseCode.ABNORMAL_CLOSURE


SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or ""


@pytest.mark.skipif(
    not SYSTEMD_ANALYZE, reason="systemd-analyze is not installed: apt-get install -y systemd"
)
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The page's systemd unit passes ``systemd-analyze verify``, with its ``ExecStart``
    pointed at this virtualenv's ``broadcaster``."""
    units = re.findall(r"^```ini\n(.*?)^```$", PAGE.read_text(), re.MULTILINE | re.DOTALL)
    assert len(units) == 1
    executable = Path(sys.executable).parent / "broadcaster"
    unit = tmp_path / "broadcaster.service"
    unit.write_text(
        substitute(units[0], {"/opt/broadcaster/.venv/bin/broadcaster": str(executable)})
    )
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
