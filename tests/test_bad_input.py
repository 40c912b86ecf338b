"""Bad input of every kind: a clear, translated message, nothing charged, nothing crashes.

The table in docs/bad-input.md lists the same cases with what the user sees.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from PIL import Image

from bot.chat import BytesImage, ImageSource, Invocation
from bot.fetch import FetchPolicy, UrlImage
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat

MB = 1024 * 1024


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    raw = png(1, 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return raw[:8] + patched + raw[8 + 25 :]


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 40), i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


async def edit(services: Services, *sources: ImageSource, lang: str = "en") -> RecordingChat:
    chat = RecordingChat()
    inv = Invocation(
        platform="test",
        user_id="u1",
        chat_id="c1",
        command="edit",
        text="make it night",
        is_private=True,
        locale=lang,
        references=sources,
    )
    await dispatch(inv, chat, services)
    await services.jobs.wait_idle()
    return chat


async def credits_left(services: Services) -> int:
    user = await services.store.user("test", "u1")
    settings = services.settings
    return (
        await services.store.credits(user.id, today(settings), settings.daily_credits)
    ).total_left


@pytest.fixture
async def image_server() -> AsyncIterator[str]:
    """A local HTTP server with a good image, a redirect to the metadata address, and more."""
    app = web.Application()

    async def good(_: web.Request) -> web.Response:
        return web.Response(body=png(), content_type="image/png")

    async def to_metadata(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def to_loopback_name(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://localhost:1/x.png")

    async def gone(_: web.Request) -> web.Response:
        return web.Response(status=404, text="expired")

    app.router.add_get("/good.png", good)
    app.router.add_get("/redirect-metadata", to_metadata)
    app.router.add_get("/redirect-localhost", to_loopback_name)
    app.router.add_get("/expired.png", gone)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


BYTES_CASES = [
    ("text_file", b"hello, this is not an image\n", "not a supported image"),
    ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not a supported image"),
    ("corrupt_png", png()[:80] + b"\x00" * 40, "damaged"),
    ("bomb_30000", bomb_png(), "900 megapixels"),
    ("sixty_mb", b"\x89PNG\r\n\x1a\n" + b"\x00" * (60 * MB), "too large"),
]


@pytest.mark.parametrize(("name", "data", "needle"), BYTES_CASES, ids=[c[0] for c in BYTES_CASES])
async def test_bad_reference_bytes_are_refused_for_free(
    services: Services, mock_upstream: MockUpstream, name: str, data: bytes, needle: str
) -> None:
    chat = await edit(services, BytesImage(data, name))
    assert needle in chat.last_text().lower() or needle in chat.last_text()
    assert mock_upstream.requests == []
    assert await credits_left(services) == 5


async def test_bad_reference_message_is_translated(services: Services) -> None:
    chat = await edit(services, BytesImage(b"not an image"), lang="zh-CN")
    assert "图片" in chat.last_text()


async def test_animated_gif_uses_its_first_frame(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await edit(services, BytesImage(animated_gif(), "anim.gif"))
    assert chat.results(), chat.texts()
    [ref] = mock_upstream.requests[-1].files
    assert ref.filename.endswith((".png", ".jpg")) and ref.content_type != "image/gif"


URL_CASES = [
    ("http://127.0.0.1:9/x.png", ("example.com",)),
    ("http://169.254.169.254/latest/meta-data/", ("169.254.169.254.nip.io",)),
    ("http://[::1]/x.png", ("localhost",)),
    ("http://10.0.0.7/x.png", ("qq.example",)),
    ("http://192.168.1.1/x.png", ("qq.example",)),
    ("file:///etc/passwd", ("127.0.0.1",)),
    ("ftp://127.0.0.1/x.png", ("127.0.0.1",)),
]


@pytest.mark.parametrize(("url", "hosts"), URL_CASES)
async def test_forbidden_image_urls_are_refused(
    services: Services, mock_upstream: MockUpstream, url: str, hosts: tuple[str, ...]
) -> None:
    source = UrlImage(url, FetchPolicy(allowed_hosts=hosts, max_bytes=MB, timeout=2))
    chat = await edit(services, source)
    assert "can't download images from that address" in chat.last_text()
    assert mock_upstream.requests == []
    assert await credits_left(services) == 5


@pytest.mark.parametrize("path", ["/redirect-metadata", "/redirect-localhost"])
async def test_redirects_to_internal_addresses_are_refused(
    services: Services, mock_upstream: MockUpstream, image_server: str, path: str
) -> None:
    policy = FetchPolicy(allowed_hosts=("127.0.0.1",), max_bytes=MB, timeout=2)
    chat = await edit(services, UrlImage(image_server + path, policy))
    assert "can't download images from that address" in chat.last_text()
    assert mock_upstream.requests == []


async def test_expired_image_url_says_send_again(services: Services, image_server: str) -> None:
    policy = FetchPolicy(allowed_hosts=("127.0.0.1",), max_bytes=MB, timeout=2)
    chat = await edit(services, UrlImage(image_server + "/expired.png", policy))
    assert "send it again" in chat.last_text()
    assert await credits_left(services) == 5


async def test_allowed_local_url_works(
    services: Services, mock_upstream: MockUpstream, image_server: str
) -> None:
    policy = FetchPolicy(allowed_hosts=("127.0.0.1",), max_bytes=MB, timeout=2)
    chat = await edit(services, UrlImage(image_server + "/good.png", policy))
    assert chat.results()
    assert len(mock_upstream.requests[-1].files) == 1
