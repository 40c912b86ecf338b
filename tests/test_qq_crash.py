"""QQ end to end: `drawbridge run` killed (SIGKILL) mid-job; after a restart, once the dead
process's heartbeat is older than DRAWBRIDGE_PROCESS_TIMEOUT, the group is told the job was
refunded, and the ledger shows the refund."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

from bot.mock_upstream import MockOptions, MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.fake_onebot import FakeOneBot, ImageHost, text
from tests.test_qq_e2e import _free_port

SELF_ID = 10001
GROUP = 40002


async def test_killed_mid_job_then_restarted_tells_the_group_and_refunds(tmp_path: Path) -> None:
    upstream = MockUpstream(MockOptions(latency=120))
    api_base = await upstream.start()
    images = ImageHost()
    await images.start()
    port = _free_port()
    env = bot_env(
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=api_base,
        DRAWBRIDGE_API_KEY="sk-crash-test-shared",
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_DAILY_CREDITS="5",
        DRAWBRIDGE_PROCESS_TIMEOUT="3",
    )
    url = f"ws://127.0.0.1:{port}/onebot/v11/ws"
    first = BotProcess(env, tmp_path)
    second = BotProcess(env, tmp_path)
    try:
        await first.start(ready="qq ready")
        onebot = FakeOneBot(SELF_ID, images=images)
        await onebot.connect(url)
        await onebot.group_message(GROUP, 777, [text("/画 a fox that never arrives")])
        async with asyncio.timeout(20):
            while not upstream.requests:  # noqa: ASYNC110 - the mock has no event to wait on
                await asyncio.sleep(0.05)
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        await onebot.close()

        upstream.options.latency = 0
        await second.start(ready="qq ready")
        onebot = FakeOneBot(SELF_ID, images=images)
        await onebot.connect(url)
        told = await onebot.wait_for(
            lambda calls: [
                c
                for c in calls
                if c.action in ("send_group_msg", "send_msg") and "interrupted" in c.text
            ],
            within=30,
        )
        assert told
        await onebot.close()
        with sqlite3.connect(tmp_path / "data" / "drawbridge.sqlite3") as db:
            status, kind = db.execute("SELECT status, error_kind FROM jobs").fetchone()
            kinds = [k for (k,) in db.execute("SELECT kind FROM ledger ORDER BY id")]
        assert (status, kind) == ("failed", "interrupted")
        assert kinds == ["reserve", "refund"]
    finally:
        for bot in (first, second):
            if bot.process is not None:
                await bot.stop()
        await images.stop()
        await upstream.stop()
