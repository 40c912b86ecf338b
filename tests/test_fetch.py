"""Safe downloads of user-given image URLs, against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bot.chat import ImageSource
from bot.errors import ForbiddenURLError, ImageFetchError, ImageTooLargeError
from bot.fetch import FetchPolicy, UrlImage, check_url, fetch_url, is_public_address

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # the bytes only need to round-trip
LOCAL = ("127.0.0.1",)
# Refusals must come from the checks, long before any network timeout could.
QUICK = 0.5
BOMB_DECODED = 64 * 1024 * 1024


def gzipped(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@cache
def gzip_bomb() -> bytes:
    """64 MB of zeros as a ~64 KB gzip body, packed without ever holding the 64 MB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    parts = [packer.compress(zeros) for _ in range(BOMB_DECODED // len(zeros))]
    return b"".join(parts) + packer.flush()


@dataclass
class Server:
    port: int
    hits: list[str] = field(default_factory=list)
    accept_encoding: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


def policy(*hosts: str, max_bytes: int = 1_000_000, timeout: float = 5.0) -> FetchPolicy:
    return FetchPolicy(allowed_hosts=hosts or LOCAL, max_bytes=max_bytes, timeout=timeout)


def build_app(server: Server, release: asyncio.Event) -> web.Application:
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=IMAGE, content_type="image/png")

    async def echo_host(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Host", ""))

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000, content_type="image/png")

    def encoded(body: bytes, encoding: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        # Sent whatever Accept-Encoding said, as misconfigured (or hostile) servers do.
        async def handler(request: web.Request) -> web.Response:
            server.accept_encoding.append(request.headers.get("Accept-Encoding", ""))
            headers = {"Content-Encoding": encoding, "Content-Type": "image/png"}
            return web.Response(body=body, headers=headers)

        return handler

    async def endless(request: web.Request) -> web.StreamResponse:
        # Chunked, no Content-Length, never ends on its own.
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        while not release.is_set():
            await response.write(b"y" * 1000)
            await asyncio.sleep(0.001)
        return response

    async def huge_declared(request: web.Request) -> web.StreamResponse:
        # Declares 50 MB, sends a few bytes, then stalls: only the declared length can tell.
        response = web.StreamResponse(headers={"Content-Length": str(50_000_000)})
        await response.prepare(request)
        await response.write(b"x" * 10)
        await release.wait()
        return response

    async def slow_headers(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=IMAGE)

    async def slow_body(request: web.Request) -> web.StreamResponse:
        # A byte every 50 ms: no single read times out, only a whole-download deadline helps.
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        while not release.is_set():
            await response.write(b"z")
            await asyncio.sleep(0.05)
        return response

    def redirect(location: Callable[[], str]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            raise web.HTTPFound(location())

        return handler

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        server.hits.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.router.add_get("/image.png", image)
    app.router.add_get("/echo-host", echo_host)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/big", big)
    app.router.add_get("/gzip-bomb", encoded(gzip_bomb(), "gzip"))
    app.router.add_get("/gzip-image", encoded(gzipped(IMAGE), "gzip"))
    app.router.add_get("/deflate-image", encoded(zlib.compress(IMAGE), "deflate"))
    app.router.add_get("/two-gzip-members", encoded(gzipped(IMAGE) * 2, "gzip"))
    app.router.add_get("/cut-gzip", encoded(gzipped(IMAGE)[:-40], "gzip"))
    app.router.add_get("/brotli", encoded(b"\x1b\x00\x00" * 10, "br"))
    app.router.add_get("/endless", endless)
    app.router.add_get("/huge-declared", huge_declared)
    app.router.add_get("/slow-headers", slow_headers)
    app.router.add_get("/slow-body", slow_body)
    app.router.add_get("/to-metadata", redirect(lambda: "http://169.254.169.254/latest/meta-data/"))
    app.router.add_get("/to-other-host", redirect(lambda: "http://evil.example/x.png"))
    app.router.add_get("/to-loopback-name", redirect(lambda: server.url("/image.png", "127.1")))
    app.router.add_get("/to-image", redirect(lambda: "/image.png"))
    app.router.add_get("/to-gzip-bomb", redirect(lambda: "/gzip-bomb"))
    app.router.add_get("/to-file", redirect(lambda: "file:///etc/passwd"))
    app.router.add_get("/loop", redirect(lambda: "/loop"))
    return app


async def start(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    release = asyncio.Event()
    srv = Server(port=0)
    runner = await start(build_app(srv, release))
    srv.port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        release.set()
        await runner.cleanup()


async def refused_quickly(url: str, pol: FetchPolicy) -> ForbiddenURLError:
    started = time.monotonic()
    with pytest.raises(ForbiddenURLError) as info:
        await fetch_url(url, pol)
    assert time.monotonic() - started < QUICK
    return info.value


# --- the happy path ---


async def test_downloads_from_an_allowed_local_host(server: Server) -> None:
    assert await fetch_url(server.url("/image.png"), policy()) == IMAGE


async def test_follows_a_redirect_on_the_same_allowed_host(server: Server) -> None:
    assert await fetch_url(server.url("/to-image"), policy()) == IMAGE
    assert server.hits == ["/to-image", "/image.png"]


async def test_localhost_may_reach_loopback_and_sends_the_name_as_host(server: Server) -> None:
    body = await fetch_url(server.url("/echo-host", "localhost"), policy("localhost"))
    assert body == f"localhost:{server.port}".encode()


async def test_host_matching_ignores_case_and_trailing_dot(server: Server) -> None:
    url = server.url("/image.png", "LocalHost.")
    assert await fetch_url(url, policy("LOCALHOST.")) == IMAGE


async def test_a_shared_client_is_used_and_left_open(server: Server) -> None:
    async with httpx.AsyncClient() as client:
        assert await fetch_url(server.url("/image.png"), policy(), client=client) == IMAGE
        assert not client.is_closed


# --- refusals before any connection ---


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/image.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "gopher://127.0.0.1:70/_x",
        "javascript:alert(1)",
        "not a url at all",
        "http:///image.png",
    ],
)
async def test_non_http_urls_are_forbidden(url: str) -> None:
    await refused_quickly(url, policy())


async def test_host_not_listed_is_forbidden(server: Server) -> None:
    error = await refused_quickly(server.url("/image.png"), policy("gchat.qpic.cn"))
    assert error.params["host"] == "127.0.0.1"
    assert server.hits == []


async def test_listing_localhost_does_not_allow_127_0_0_1(server: Server) -> None:
    await refused_quickly(server.url("/image.png"), policy("localhost"))
    assert server.hits == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/image.png",
        "http://[::1]/image.png",
        "http://0.0.0.0/image.png",
        "http://[::ffff:127.0.0.1]/image.png",
    ],
)
async def test_unlisted_ip_literals_are_forbidden(url: str) -> None:
    await refused_quickly(url, policy("127.0.0.1", "localhost", "gchat.qpic.cn"))


@pytest.mark.parametrize(
    "url",
    [
        "http://gchat.qpic.cn.evil.example/x.png",
        "http://evilgchat.qpic.cn/x.png",
        "http://gchat.qpic.cn@evil.example/x.png",
        "http://evil.example#@gchat.qpic.cn/x.png",
        "http://evil.example\\@gchat.qpic.cn/x.png",
    ],
)
async def test_suffix_and_userinfo_tricks_are_forbidden(url: str) -> None:
    await refused_quickly(url, policy("gchat.qpic.cn"))


async def test_userinfo_on_an_allowed_host_is_forbidden(server: Server) -> None:
    url = f"http://user:pass@127.0.0.1:{server.port}/image.png"
    error = await refused_quickly(url, policy())
    assert error.params["reason"] == "userinfo"
    assert server.hits == []


@pytest.mark.parametrize(
    "name",
    [
        "2130706433",  # 127.0.0.1 in one number
        "127.1",  # 127.0.0.1, short form
        "10.1",  # 10.0.0.1
        "169.254.43518",  # 169.254.169.254, the cloud metadata address
    ],
)
async def test_listed_names_resolving_to_private_addresses_are_forbidden(
    server: Server, name: str
) -> None:
    # These are host names (not IP literals) that the resolver turns into internal addresses:
    # listing a name does not make whatever it resolves to acceptable.
    error = await refused_quickly(server.url("/image.png", name), policy(name))
    assert error.params["reason"] == "address"
    assert server.hits == []


async def test_check_url_is_a_sync_scheme_and_host_check() -> None:
    pol = policy("gchat.qpic.cn", "[::1]")
    check_url("https://gchat.qpic.cn/download?appid=1&sig=abc", pol)
    check_url("http://[0:0:0:0:0:0:0:1]:8080/x", pol)
    with pytest.raises(ForbiddenURLError):
        check_url("https://multimedia.nt.qq.com.cn/download", pol)
    with pytest.raises(ForbiddenURLError):
        check_url("file:///etc/passwd", pol)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("2002:808:808::1", True),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("239.1.2.3", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("not-an-ip", False),
    ],
)
def test_public_address_classification(address: str, public: bool) -> None:
    assert is_public_address(address) is public


# --- redirects ---


async def test_redirect_to_the_metadata_address_is_forbidden(server: Server) -> None:
    await refused_quickly(server.url("/to-metadata"), policy())
    assert server.hits == ["/to-metadata"]


async def test_redirect_to_another_host_is_forbidden(server: Server) -> None:
    error = await refused_quickly(server.url("/to-other-host"), policy())
    assert error.params["host"] == "evil.example"


async def test_redirect_to_a_name_for_loopback_is_forbidden(server: Server) -> None:
    await refused_quickly(server.url("/to-loopback-name"), policy("127.0.0.1", "127.1"))
    assert server.hits == ["/to-loopback-name"]


async def test_redirect_to_file_is_forbidden(server: Server) -> None:
    await refused_quickly(server.url("/to-file"), policy())


async def test_redirect_loop_stops_after_max_redirects(server: Server) -> None:
    with pytest.raises(ImageFetchError) as info:
        await fetch_url(server.url("/loop"), policy())
    assert info.value.params["reason"] == "redirects"
    assert len(server.hits) == 4  # the first request and three redirects


# --- caps, deadlines, failures ---


async def test_oversize_by_content_length_is_refused(server: Server) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        await fetch_url(server.url("/big"), policy(max_bytes=1000))
    assert info.value.params["limit_mb"] == 0.0
    assert info.value.params["reason"] == "bytes"


async def test_oversize_by_declared_length_is_refused_before_reading(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLargeError) as info:
        await fetch_url(server.url("/huge-declared"), policy(max_bytes=1000, timeout=3))
    assert time.monotonic() - started < 1.0
    assert info.value.params["size_mb"] == 47.7


async def test_oversize_while_streaming_is_cut_short(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLargeError):
        async with asyncio.timeout(3):
            await fetch_url(server.url("/endless"), policy(max_bytes=20_000))
    assert time.monotonic() - started < 2.0


async def bomb_fetch_peak(url: str, cap: int) -> tuple[ImageTooLargeError, int]:
    """Fetch a gzip bomb under `cap`: the error, and the most Python memory held meanwhile."""
    gzip_bomb()  # packed before tracing starts
    # Made outside the trace: a client's TLS context alone is a few MB, and not the body's.
    async with httpx.AsyncClient(trust_env=False) as client:
        tracemalloc.start()
        try:
            with pytest.raises(ImageTooLargeError) as info:
                await fetch_url(url, policy(max_bytes=cap), client=client)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return info.value, peak


async def test_gzip_bomb_is_cut_at_the_cap_on_decoded_bytes(server: Server) -> None:
    cap = 2 * 1024 * 1024
    error, peak = await bomb_fetch_peak(server.url("/gzip-bomb"), cap)
    assert server.accept_encoding == ["identity"]  # asked for, and ignored by the server
    assert error.params["limit_mb"] == 2.0 and error.params["reason"] == "bytes"
    # The cap, plus the bytearray's slack and one inflate step; httpx's own decoding held
    # all 64 MB of a single network chunk's output before the old cap check could run.
    assert peak < cap + 1024 * 1024, peak


async def test_gzip_bomb_behind_a_redirect_is_cut_at_the_cap_too(server: Server) -> None:
    cap = 1024 * 1024
    error, peak = await bomb_fetch_peak(server.url("/to-gzip-bomb"), cap)
    assert server.hits == ["/to-gzip-bomb", "/gzip-bomb"]
    assert error.params["limit_mb"] == 1.0
    assert peak < cap + 1024 * 1024, peak


@pytest.mark.parametrize("path", ["/gzip-image", "/deflate-image"])
async def test_gzip_or_deflate_sent_anyway_is_inflated(server: Server, path: str) -> None:
    assert await fetch_url(server.url(path), policy()) == IMAGE


@pytest.mark.parametrize("path", ["/brotli", "/two-gzip-members", "/cut-gzip"])
async def test_other_or_broken_content_encodings_are_refused(server: Server, path: str) -> None:
    with pytest.raises(ImageFetchError) as info:
        await fetch_url(server.url(path), policy())
    assert info.value.params["reason"] == "encoding"


async def test_server_that_never_answers_hits_the_deadline(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        async with asyncio.timeout(3):  # a missing deadline fails here instead of hanging
            await fetch_url(server.url("/slow-headers"), policy(timeout=0.3))
    assert time.monotonic() - started < 2.0
    assert info.value.params["reason"] == "timeout"


async def test_trickling_body_hits_the_whole_download_deadline(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        async with asyncio.timeout(3):  # a missing deadline fails here instead of hanging
            await fetch_url(server.url("/slow-body"), policy(timeout=0.4))
    assert time.monotonic() - started < 2.0
    assert info.value.params["reason"] == "timeout"


@pytest.mark.parametrize("code", [403, 404, 410, 500])
async def test_http_errors_become_fetch_errors_with_status(server: Server, code: int) -> None:
    with pytest.raises(ImageFetchError) as info:
        await fetch_url(server.url(f"/status/{code}"), policy())
    assert info.value.params["status"] == code


async def test_errors_never_carry_the_signed_url(server: Server) -> None:
    url = server.url("/status/410") + "?fileid=ABC&rkey=SECRET-SIGNATURE"
    with pytest.raises(ImageFetchError) as info:
        await fetch_url(url, policy())
    assert "SECRET" not in repr(info.value.params) and "SECRET" not in str(info.value)
    assert info.value.params["host"] == "127.0.0.1"


async def test_connection_refused_is_a_fetch_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageFetchError) as info:
        await fetch_url(f"http://127.0.0.1:{port}/image.png", policy())
    assert info.value.params["reason"] == "connect"


# --- UrlImage ---


async def test_url_image_is_an_image_source_capped_by_the_smaller_limit(server: Server) -> None:
    source = UrlImage(server.url("/image.png") + "?sig=SECRET", policy(), label="photo.png")
    assert isinstance(source, ImageSource)
    assert source.name == "photo.png"
    assert "SECRET" not in repr(source)
    assert await source.fetch(max_bytes=10_000) == IMAGE
    with pytest.raises(ImageTooLargeError):
        await source.fetch(max_bytes=100)


# --- https: we dial the checked address, the certificate is checked against the name ---


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[Server, ssl.SSLContext]]:
    cert_path, key_path = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    release = asyncio.Event()
    srv = Server(port=0)
    runner = await start(build_app(srv, release), server_ctx)
    srv.port = runner.addresses[0][1]
    try:
        yield srv, client_ctx
    finally:
        release.set()
        await runner.cleanup()


async def test_https_by_name_verifies_the_certificate_for_that_name(
    tls_server: tuple[Server, ssl.SSLContext],
) -> None:
    srv, client_ctx = tls_server
    async with httpx.AsyncClient(verify=client_ctx) as client:
        url = srv.url("/echo-host", "localhost", "https")
        body = await fetch_url(url, policy("localhost"), client=client)
    assert body == f"localhost:{srv.port}".encode()


async def test_https_certificate_for_another_name_is_rejected(
    tls_server: tuple[Server, ssl.SSLContext],
) -> None:
    srv, client_ctx = tls_server
    async with httpx.AsyncClient(verify=client_ctx) as client:
        with pytest.raises(ImageFetchError):
            await fetch_url(srv.url("/image.png", scheme="https"), policy(), client=client)
    assert srv.hits == []
