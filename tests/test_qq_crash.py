"""QQ end to end: `drawbridge run` killed (SIGKILL) mid-job; after a restart the group is told
the job was refunded, and the ledger shows the refund."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

from bot.mock_upstream import MockOptions, MockUpstream
from tests.fake_onebot import FakeOneBot, ImageHost, text
from tests.test_qq_e2e import _FOREIGN_ENV, REPO, _collect, _free_port

SELF_ID = 10001
GROUP = 40002


async def _start(
    env: dict[str, str], workdir: Path, output: list[str]
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    asyncio.get_running_loop().create_task(_collect(process.stdout, output))
    async with asyncio.timeout(30):
        while not any("qq ready" in line for line in output):
            assert process.returncode is None, "".join(output[-30:])
            await asyncio.sleep(0.05)
    return process


async def test_killed_mid_job_then_restarted_tells_the_group_and_refunds(tmp_path: Path) -> None:
    upstream = MockUpstream(MockOptions(latency=120))
    api_base = await upstream.start()
    images = ImageHost()
    await images.start()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=api_base,
        DRAWBRIDGE_API_KEY="sk-crash-test-shared",
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_DAILY_CREDITS="5",
    )
    url = f"ws://127.0.0.1:{port}/onebot/v11/ws"
    first: asyncio.subprocess.Process | None = None
    second: asyncio.subprocess.Process | None = None
    try:
        output: list[str] = []
        first = await _start(env, tmp_path, output)
        onebot = FakeOneBot(SELF_ID, images=images)
        await onebot.connect(url)
        await onebot.group_message(GROUP, 777, [text("/画 a fox that never arrives")])
        async with asyncio.timeout(20):
            while not upstream.requests:  # noqa: ASYNC110 - the mock has no event to wait on
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        await onebot.close()

        upstream.options.latency = 0
        output = []
        second = await _start(env, tmp_path, output)
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
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
        await images.stop()
        await upstream.stop()
