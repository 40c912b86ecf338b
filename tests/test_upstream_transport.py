"""Connections to the image API: streamed answers leave their connection reusable, and the
aiohttp transport under httpx (bot/upstream/transport.py) fails the way httpx's own does.

All over real HTTP on 127.0.0.1: the mock upstream records each request's client address and
port, so requests that share one came over one kept-alive connection.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from bot.config import Settings
from bot.mock_upstream import MockUpstream
from bot.services import Services
from bot.upstream import ImageRequest, UpstreamClient
from bot.upstream.client import DRAIN_SECONDS
from bot.upstream.transport import AiohttpTransport, direct_transport
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation
from tests.test_upstream import image_bytes, make_provider


@asynccontextmanager
async def serving(*routes: web.RouteDef) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 with these routes; yields its base URL."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def draw(services: Services, user: str) -> RecordingChat:
    chat = RecordingChat()
    await dispatch(invocation("draw", "a fox", user_id=user, chat_id=f"dm-{user}"), chat, services)
    await services.jobs.wait_idle()
    return chat


async def test_streamed_jobs_one_after_another_share_one_connection(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    # Before: the reader stopped at `[DONE]`, the body's end was never read, and httpx closed
    # the connection: every job paid a new connection (with a real relay, a TLS handshake).
    services = await Services.create(settings_factory(stream=True))
    try:
        for user in ("a", "b", "c"):
            assert (await draw(services, user)).results()
    finally:
        await services.close()
    sent = [r for r in mock_upstream.requests if r.path.endswith("/generations")]
    assert len(sent) == 3 and all(r.stream for r in sent)
    assert len({r.peer for r in sent}) == 1, [r.peer for r in sent]


async def test_concurrent_jobs_reuse_their_connections_in_the_next_round(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    concurrency = 12
    mock_upstream.options.latency = 0.3
    services = await Services.create(
        settings_factory(stream=True, concurrency=concurrency, daily_credits=10)
    )
    try:
        for _ in range(2):
            chats = [RecordingChat() for _ in range(concurrency)]
            await asyncio.gather(
                *(
                    dispatch(
                        invocation("draw", "a fox", user_id=f"u{i}", chat_id=f"dm-u{i}"),
                        chat,
                        services,
                    )
                    for i, chat in enumerate(chats)
                )
            )
            await services.jobs.wait_idle()
            assert all(chat.results() for chat in chats)
    finally:
        await services.close()
    sent = [r for r in mock_upstream.requests if r.path.endswith("/generations")]
    assert len(sent) == 2 * concurrency
    assert mock_upstream.max_in_flight == concurrency
    # The second round went over the first round's connections, none new.
    assert len({r.peer for r in sent}) == concurrency


async def stream_to_done(request: web.Request) -> web.StreamResponse:
    """A streamed answer up to its `[DONE]`: one completed image; how it ends is the caller's."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    data = base64.b64encode(image_bytes()).decode()
    event = {"type": "image_generation.completed", "b64_json": data, "size": "64x48"}
    await response.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
    return response


async def test_a_relay_that_keeps_the_stream_open_after_done_does_not_hold_the_job() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await stream_to_done(request)
        await asyncio.sleep(10)  # the body's end never comes in time
        return response

    async with serving(web.post("/v1/images/generations", handler)) as base:
        client = UpstreamClient(make_provider(base.removesuffix("/"), stream=True))
        try:
            started = time.monotonic()
            result = await client.generate(ImageRequest("a comet"), None)
            elapsed = time.monotonic() - started
        finally:
            await client.aclose()
    assert len(result.images) == 1
    assert elapsed < DRAIN_SECONDS + 1.0


async def test_a_relay_that_drops_the_connection_after_done_still_gives_the_image() -> None:
    # The body's end never comes: the connection is cut right after [DONE]. The image is in
    # hand; reading the end is only for reusing the connection.
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await stream_to_done(request)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    async with serving(web.post("/v1/images/generations", handler)) as base:
        client = UpstreamClient(make_provider(base.removesuffix("/"), stream=True))
        try:
            result = await client.generate(ImageRequest("a comet"), None)
        finally:
            await client.aclose()
    assert len(result.images) == 1


# --- the transport's failures, as httpx's own ---


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    """Answers every request after 0.2 s with a small body."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    async with serving(web.get("/", handler)) as base:
        yield base


async def test_nothing_listening_is_a_connect_error() -> None:
    # The client retries ConnectError as never having reached the upstream (nothing billed).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with httpx.AsyncClient(transport=AiohttpTransport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_silent_server_is_a_read_timeout_not_a_connect_error(slow_server: str) -> None:
    async with httpx.AsyncClient(transport=AiohttpTransport()) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(slow_server, timeout=httpx.Timeout(0.05, connect=5.0))


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()
        return response

    async with (
        serving(web.get("/", handler)) as base,
        httpx.AsyncClient(transport=AiohttpTransport()) as http,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(base)


async def test_bodies_go_as_built_and_answers_come_back_raw_for_httpx_to_decode() -> None:
    import gzip

    seen: dict[str, object] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["length"] = request.headers.get("Content-Length")
        seen["chunked"] = request.headers.get("Transfer-Encoding")
        seen["body"] = await request.read()
        seen["agent"] = request.headers.get("User-Agent")
        body = gzip.compress(b'{"ok": true}')
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async with (
        serving(web.post("/", handler)) as base,
        httpx.AsyncClient(transport=AiohttpTransport(), headers={"User-Agent": "ua/1"}) as http,
    ):
        response = await http.post(base, files={"image[]": ("a.png", b"\x89PNG" + b"0" * 5000)})
    assert response.json() == {"ok": True}
    assert seen["chunked"] is None and seen["length"] == str(len(seen["body"]))  # type: ignore[arg-type]
    assert b"a.png" in seen["body"]  # type: ignore[operator]
    assert seen["agent"] == "ua/1"


def test_only_direct_connections_use_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx ignores the environment's proxies when given a transport: a proxied client must
    # keep httpx's own (tests/test_proxies.py runs the proxied cases for real).
    for scheme in ("http", "https", "all"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)
    assert isinstance(direct_transport(""), AiohttpTransport)
    assert direct_transport("socks5://127.0.0.1:1080") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert direct_transport("") is None
