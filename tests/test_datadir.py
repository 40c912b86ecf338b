"""The data directory, its jobs folder and the database are private to the bot's account."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.datadir import secure_data_dir
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.bot_process import bot_env
from tests.recording_chat import invocation, run_command


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most systems start processes with: files 0644, folders 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(data: Path) -> dict[str, int]:
    names = ["", "jobs", "drawbridge.sqlite3", "drawbridge.sqlite3-wal", "drawbridge.sqlite3-shm"]
    return {name or ".": mode(data / name) for name in names if (data / name).exists()}


PRIVATE = {
    ".": 0o700,
    "jobs": 0o700,
    "drawbridge.sqlite3": 0o600,
    "drawbridge.sqlite3-wal": 0o600,
    "drawbridge.sqlite3-shm": 0o600,
}


async def test_a_fresh_start_creates_the_data_dir_jobs_and_database_private(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    services = await Services.create(settings_factory())
    try:
        # A job writes the database (so SQLite has its -wal and -shm open) and jobs/<id>/.
        chat = await run_command(services, invocation("draw", "a fox"))
        assert chat.results()
        data = tmp_path / "data"
        assert modes(data) == PRIVATE
        assert mode(data / "secret.key") == 0o600
    finally:
        await services.close()


async def test_a_data_dir_left_readable_by_others_is_tightened_at_start(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    (data / "jobs").chmod(0o755)
    # A database an earlier version made with the umask's modes, WAL files included.
    db = sqlite3.connect(data / "drawbridge.sqlite3")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    assert mode(data / "drawbridge.sqlite3-wal") == 0o644
    assert modes(data)["."] == 0o755
    services = await Services.create(settings_factory())
    try:
        assert modes(data) == PRIVATE
    finally:
        await services.close()
        db.close()


def test_secure_data_dir_keeps_the_database_and_leaves_links_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "drawbridge.sqlite3").write_bytes(b"kept")
    outside = tmp_path / "elsewhere.key"
    outside.write_text("x")
    outside.chmod(0o644)
    (data / "secret.key").symlink_to(outside)
    assert secure_data_dir(data) == data
    assert (data / "drawbridge.sqlite3").read_bytes() == b"kept"
    assert mode(data / "drawbridge.sqlite3") == 0o600
    # Modes are not changed through a link pointing out of the directory.
    assert mode(outside) == 0o644


async def test_drawbridge_draw_creates_a_private_data_dir(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = bot_env(
        DRAWBRIDGE_DATA_DIR=str(data),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY="sk-test-cli-0000000",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "draw",
        "a fox",
        "-o",
        str(tmp_path / "out"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    assert mode(data) == 0o700
    assert mode(data / "jobs") == 0o700
    assert mode(data / "drawbridge.sqlite3") == 0o600
