"""`drawbridge run` as a subprocess serving Telegram (the fake Bot API server) and drawing
through the mock upstream, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.mock_upstream import MockUpstream
from tests.fake_telegram import ApiCall, FakeTelegram

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


def with_buttons(call: ApiCall) -> bool:
    return "reply_markup" in call.fields


async def test_drawbridge_run_serves_telegram_and_stops_on_sigterm(
    fake: FakeTelegram, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DRAWBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "DRAWBRIDGE_API_BASE": mock_upstream.base_url,
        "DRAWBRIDGE_API_KEY": "sk-test-subprocess-0000",
        "DRAWBRIDGE_LOG_LEVEL": "INFO",
        "DRAWBRIDGE_SHUTDOWN_GRACE": "2",
        "TELEGRAM_BOT_TOKEN": fake.token,
        "TELEGRAM_API_SERVER": fake.base_url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log_lines: list[str] = []

    async def read_until(marker: str) -> None:
        assert proc.stderr is not None
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("drawbridge run exited early:\n" + "".join(log_lines))
            log_lines.append(line)
            if marker in line:
                return

    try:
        await asyncio.wait_for(read_until("telegram ready"), 20)
        alice = fake.user(1001)
        chat = fake.private_chat(alice)
        fake.send_message(chat, alice, "/draw a windmill")
        photo = await fake.wait_call("sendPhoto", where=with_buttons, within=20)
        assert "a windmill" in photo.fields["caption"]
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 20)
        log_lines.append(rest.decode())
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(log_lines)
    assert "telegram: stopped" in output
    assert "Traceback" not in output
    assert fake.token not in output
    assert fake.token.split(":", 1)[1] not in output
