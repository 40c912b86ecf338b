"""One log format for every line `drawbridge run` writes, nonebot's included.

nonebot logs through loguru with its own format (`11-30 01:30:14 [INFO] nonebot | ...`) and
announces `Current Env: prod` at init; a real `drawbridge run` with QQ enabled shows neither.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

from bot.logs import LOG_FORMAT
from bot.mock_upstream import MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.fake_onebot import FakeOneBot, text

# LOG_FORMAT's shape: "2026-11-30 01:30:14,062 INFO bot.store: message".
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>[\w.]+): ")
ACCESS_TOKEN = "onebot-access-Lf3kR8wQ2mZ7"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_line_pattern_is_the_configured_format() -> None:
    formatter = logging.Formatter(LOG_FORMAT)
    record = logging.LogRecord("bot.store", logging.INFO, __file__, 1, "hello", None, None)
    assert LINE.match(formatter.format(record))
    assert not LINE.match("11-30 01:30:14 [INFO] nonebot | Current Env: prod")


async def test_a_qq_run_at_info_writes_every_line_in_one_format_without_current_env(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    port = _free_port()
    env = bot_env(
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY="sk-log-format-test-0123456789",
        DRAWBRIDGE_LOG_LEVEL="INFO",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        ONEBOT_ACCESS_TOKEN=ACCESS_TOKEN,
    )
    bot = BotProcess(env, tmp_path)
    onebot = FakeOneBot(10001)
    try:
        await bot.start(ready=r"\bqq ready\b", within=30)
        await onebot.connect(f"ws://127.0.0.1:{port}/onebot/v11/ws", ACCESS_TOKEN)
        await bot.wait_output(r"Bot 10001.* connected")
        await onebot.private_message(20001, [text("/help")])
        await onebot.wait_for(lambda calls: any(c.action.startswith("send_") for c in calls))
        # nonebot logs each message it receives: one more of its lines to look at.
        await bot.wait_output(r"Message \d+ from 20001")
    finally:
        await onebot.close()
        code = await bot.stop()
    assert code == 0, bot.log[-3000:]

    lines = [line.rstrip("\n") for line in bot.output if line.strip()]
    odd = [line for line in lines if not LINE.match(line)]
    assert odd == [], odd
    names = {m["name"] for m in map(LINE.match, lines) if m}
    # Ours, nonebot's (forwarded from loguru) and uvicorn's: all in the same shape.
    assert {"drawbridge", "nonebot", "uvicorn.error"} <= names, names
    assert any(re.search(r" SUCCESS nonebot: NoneBot is initializing", line) for line in lines)
    assert not [line for line in lines if "Current Env" in line]
