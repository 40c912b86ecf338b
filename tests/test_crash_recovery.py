"""A bot killed (SIGKILL) mid-job: the next start refunds the job once the dead process's
heartbeat is older than DRAWBRIDGE_PROCESS_TIMEOUT."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services

ROOT = Path(__file__).resolve().parent.parent


async def test_job_killed_mid_flight_is_refunded_on_restart(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    mock_upstream.options.latency = 60
    settings = settings_factory(process_timeout=1.0)
    env = {
        **os.environ,
        "DRAWBRIDGE_API_BASE": mock_upstream.base_url,
        "DRAWBRIDGE_API_KEY": "sk-test-shared-0000",
        "DRAWBRIDGE_DATA_DIR": str(settings.data_dir),
        "DRAWBRIDGE_DAILY_CREDITS": "5",
        "DRAWBRIDGE_PROCESS_TIMEOUT": "1",
        "PYTHONPATH": str(ROOT),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.crash_child",
        "a fox that never arrives",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line.strip() == b"SUBMITTED"
        async with asyncio.timeout(30):
            while not mock_upstream.requests:  # noqa: ASYNC110 - the mock has no event to wait on
                await asyncio.sleep(0.05)
        db = settings.data_dir / "drawbridge.sqlite3"
        async with asyncio.timeout(10):
            while True:  # the job is marked running beside the upstream call, not before it
                with sqlite3.connect(db) as conn:
                    if conn.execute("SELECT status FROM jobs").fetchone()[0] == "running":
                        break
                await asyncio.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    # Its last heartbeat was at its start: older than the timeout by now, or in a moment.
    await asyncio.sleep(1.1)

    services = await Services.create(settings)
    try:
        job = await services.store.job(1)
        assert job is not None
        assert (job.status, job.error_kind, job.ledger_state) == (
            "failed",
            "interrupted",
            "refunded",
        )
        user = await services.store.user("test", "u1")
        credits = await services.store.credits(user.id, today(settings), 5)
        assert credits.total_left == 5
    finally:
        await services.close()
