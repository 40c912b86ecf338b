"""Connections to the image API: streamed answers leave their connection reusable, and the
sharded pool (bot/upstream/pool.py) spreads requests and frees its counts on every path.

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
from bot.upstream.pool import SHARD_SIZE, ShardedTransport, direct_transport
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation
from tests.test_upstream import image_bytes, make_provider


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
    concurrency = 2 * SHARD_SIZE + 3  # three shards
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


async def test_a_relay_that_keeps_the_stream_open_after_done_does_not_hold_the_job() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        data = base64.b64encode(image_bytes()).decode()
        event = {"type": "image_generation.completed", "b64_json": data, "size": "64x48"}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
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


# --- ShardedTransport itself ---


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


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    """Answers every request after 0.2 s with a small body."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    async with serving(web.get("/", handler)) as base:
        yield base


async def test_requests_go_to_the_least_busy_shard_and_free_it_when_done(slow_server: str) -> None:
    transport = ShardedTransport(3 * SHARD_SIZE)
    assert transport.shards == 3
    async with httpx.AsyncClient(transport=transport) as http:
        seen: list[list[int]] = []

        async def get() -> None:
            async with http.stream("GET", slow_server) as response:
                seen.append(list(transport._busy))
                await response.aread()

        await asyncio.gather(*(get() for _ in range(6)))
        # Six at once over three shards: two each, never four on one.
        assert max(max(busy) for busy in seen) == 2
        assert transport._busy == [0, 0, 0]


async def test_a_failed_request_frees_its_shard() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = ShardedTransport(2 * SHARD_SIZE)
    async with httpx.AsyncClient(transport=transport) as http:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/")
    assert transport._busy == [0, 0]


async def test_a_response_closed_unread_frees_its_shard(slow_server: str) -> None:
    transport = ShardedTransport(SHARD_SIZE)
    async with httpx.AsyncClient(transport=transport) as http:
        async with http.stream("GET", slow_server) as response:
            assert response.status_code == 200
            assert transport._busy == [1]
        assert transport._busy == [0]


def test_only_direct_connections_are_sharded(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx ignores the environment's proxies when given a transport: a proxied client must
    # keep httpx's own (tests/test_proxies.py runs the proxied cases for real).
    for scheme in ("http", "https", "all"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)
    assert isinstance(direct_transport(50, ""), ShardedTransport)
    assert direct_transport(50, "socks5://127.0.0.1:1080") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert direct_transport(50, "") is None
