"""`drawbridge run` as a subprocess serving Telegram (the fake Bot API server) and drawing
through the mock upstream, stopped by SIGTERM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.mock_upstream import MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.fake_telegram import ApiCall, FakeTelegram


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


def with_buttons(call: ApiCall) -> bool:
    return "reply_markup" in call.fields


@pytest.mark.parametrize("loop", ["", "asyncio"])
async def test_drawbridge_run_serves_telegram_and_stops_on_sigterm(
    fake: FakeTelegram, mock_upstream: MockUpstream, tmp_path: Path, loop: str
) -> None:
    # Default (auto): uvloop, a dependency; DRAWBRIDGE_EVENT_LOOP=asyncio: asyncio's own.
    env = bot_env(
        **({"DRAWBRIDGE_EVENT_LOOP": loop} if loop else {}),
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY="sk-test-subprocess-0000",
        DRAWBRIDGE_LOG_LEVEL="INFO",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        TELEGRAM_BOT_TOKEN=fake.token,
        TELEGRAM_API_SERVER=fake.base_url,
    )
    bot = BotProcess(env, tmp_path)
    try:
        await bot.start(ready="telegram ready", within=20)
        alice = fake.user(1001)
        chat = fake.private_chat(alice)
        fake.send_message(chat, alice, "/draw a windmill")
        photo = await fake.wait_call("sendPhoto", where=with_buttons, within=20)
        assert "a windmill" in photo.fields["caption"]
    finally:
        code = await bot.stop()
    assert code == 0
    assert f"event loop: {loop or 'uvloop'}" in bot.log
    # Ready, startup's objects leave the collector's scans (bot.heap), and drawing still works.
    assert "startup objects frozen, collector thresholds 50000/20/100" in bot.log
    assert "telegram: stopped" in bot.log
    assert "Traceback" not in bot.log
    assert fake.token not in bot.log
    assert fake.token.split(":", 1)[1] not in bot.log
