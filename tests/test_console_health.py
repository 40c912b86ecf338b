"""`/healthz` as Docker and Kubernetes probe it: 200 with each configured chat platform's
connection, 503 while one is disconnected. Over the real platforms and their fakes: a
OneBot client over WebSocket to the QQ endpoint, the fake Telegram Bot API, the fake Discord.
"""

# Fixtures imported from the platforms' test modules are named again as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.console.app import Console
from adapters.console.logbuffer import LogBuffer
from adapters.telegram import TelegramPlatform
from bot.config import Settings
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.bot_process import BotProcess, bot_env
from tests.fake_onebot import FakeOneBot
from tests.fake_telegram import FakeTelegram
from tests.test_console import PASSWORD, client
from tests.test_discord import Bot, fake_discord, start_bot  # noqa: F401 (fixtures)
from tests.test_telegram import FAST

SELF_ID = 10001
ACCESS_TOKEN = "onebot-health-token-5c2e"


async def health(console: Console) -> httpx.Response:
    async with client(console) as http:
        return await http.get("/healthz")


async def health_becomes(console: Console, status: int, within: float = 10.0) -> httpx.Response:
    """Poll /healthz like a probe until it answers `status`."""
    async with client(console) as http:
        return await status_becomes(http, status, within)


async def status_becomes(
    http: httpx.AsyncClient, status: int, within: float = 10.0
) -> httpx.Response:
    async with asyncio.timeout(within):
        while True:
            response = await http.get("/healthz")
            if response.status_code == status:
                return response
            await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def console_for(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[tuple[Console, Services]]]]:
    made: list[tuple[Services, LogBuffer]] = []

    async def make(**overrides: Any) -> tuple[Console, Services]:
        settings = settings_factory(console_password=PASSWORD, **overrides)
        services = await Services.create(settings)
        logs = LogBuffer()
        made.append((services, logs))
        return Console(settings, services, logs), services

    yield make
    for services, _ in made:
        await services.close(grace=0)


async def test_healthz_is_200_with_no_chat_platform_configured(
    console_for: Callable[..., Awaitable[tuple[Console, Services]]],
) -> None:
    console, _ = await console_for()
    response = await health(console)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "platforms": {}}


async def test_healthz_is_503_for_a_configured_platform_that_has_not_started(
    console_for: Callable[..., Awaitable[tuple[Console, Services]]],
) -> None:
    console, _ = await console_for(qq_enabled=True)
    response = await health(console)
    assert response.status_code == 503
    assert response.json()["platforms"] == {"qq": {"connected": False, "detail": "not started"}}


async def test_healthz_follows_the_onebot_client_disconnecting_and_reconnecting(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    # `drawbridge run` itself (nonebot's lifespan runs once per process): the runner
    # registers the platforms it started, the console asks them.
    port = _free_port()
    env = bot_env(
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        ONEBOT_ACCESS_TOKEN=ACCESS_TOKEN,
        DRAWBRIDGE_CONSOLE_PASSWORD=PASSWORD,
        DRAWBRIDGE_CONSOLE_PORT="0",
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_SHUTDOWN_GRACE="1",
    )
    bot = await BotProcess(env, tmp_path).start(r"drawbridge ready: qq, console", within=60)
    url = f"ws://127.0.0.1:{port}/onebot/v11/ws"
    onebot = FakeOneBot(SELF_ID)
    try:
        found = re.search(r"console: http://127\.0\.0\.1:(\d+)/", bot.log)
        assert found, bot.log
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{found.group(1)}") as http:
            # Serving, but no NapCat yet: QQ users reach nothing.
            waiting = await http.get("/healthz")
            assert waiting.status_code == 503
            assert waiting.json() == {
                "status": "disconnected",
                "platforms": {"qq": {"connected": False, "detail": "no OneBot client connected"}},
            }

            await onebot.connect(url, ACCESS_TOKEN)
            up = await status_becomes(http, 200)
            assert up.json() == {
                "status": "ok",
                "platforms": {"qq": {"connected": True, "detail": f"OneBot {SELF_ID} connected"}},
            }

            await onebot.close()
            down = await status_becomes(http, 503)
            assert down.json()["platforms"]["qq"]["connected"] is False

            onebot = FakeOneBot(SELF_ID)
            await onebot.connect(url, ACCESS_TOKEN)
            await status_becomes(http, 200)
    finally:
        await onebot.close()
        code = await bot.stop()
    assert code == 0, bot.log[-3000:]


async def test_healthz_follows_telegram_polling(
    console_for: Callable[..., Awaitable[tuple[Console, Services]]],
) -> None:
    async with FakeTelegram() as fake:
        console, services = await console_for(
            telegram_bot_token=fake.token, telegram_api_server=fake.base_url
        )
        telegram = TelegramPlatform(services.settings, services, flood=FAST, polling_timeout=1)
        await telegram.start()
        services.platforms["telegram"] = telegram
        try:
            up = await health(console)
            assert up.status_code == 200, up.text
            assert up.json()["platforms"]["telegram"]["connected"] is True

            # The Bot API answers getUpdates with errors: aiogram retries for ever, the
            # probe sees it.
            fake.fail_next("getUpdates", error_code=502, description="Bad Gateway", times=10_000)
            down = await health_becomes(console, 503)
            assert "getUpdates failing" in down.json()["platforms"]["telegram"]["detail"]

            fake._failures.clear()
            await health_becomes(console, 200, within=15)
        finally:
            services.platforms.pop("telegram", None)
            await telegram.stop()


async def test_healthz_is_200_while_discord_is_connected(
    start_bot: Callable[..., Awaitable[Bot]],
) -> None:
    bot = await start_bot(console_password=PASSWORD)
    bot.services.platforms["discord"] = bot.platform
    console = Console(bot.services.settings, bot.services, LogBuffer())
    response = await health(console)
    assert response.status_code == 200
    state = response.json()["platforms"]["discord"]
    assert state["connected"] is True and state["detail"].startswith("gateway ready")

    await bot.platform.stop()
    closed = await health(console)
    assert closed.status_code == 503
    assert closed.json()["platforms"]["discord"] == {"connected": False, "detail": "client closed"}
