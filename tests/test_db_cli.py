"""`drawbridge db upgrade` and `drawbridge db copy`, run as the real command against SQLite
files and a real PostgreSQL server (tests/databases.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest

from bot.secrets import KeyBox
from bot.store import Store
from tests.databases import Raw, database_url

DAY = date(2026, 3, 1)
KEY = "sk-test-copy-0000-aaaa"


def drawbridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAWBRIDGE_")}
    env["DRAWBRIDGE_DATA_DIR"] = str(cwd / "data")
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def fill(url: str, keybox: KeyBox) -> dict[str, int]:
    """An install with some history: grants, committed, partial and refunded jobs, an open
    reservation, a bound key, a linked account, a result message, group rules, an audit row."""
    store = await Store.connect(url, keybox=keybox)
    try:
        users = [await store.user("qq", str(n), f"user {n}") for n in range(12)]
        for n, user in enumerate(users):
            await store.grant(user.id, 10 + n, note="welcome")
            job = await store.create_job(
                user_id=user.id,
                platform="qq",
                chat_id="g1",
                group_key="qq:g1",
                kind="draw",
                prompt=f"cat {n}",
                options={"size": "1024x1024", "n": 1},
                ref_count=0,
                own_key=False,
            )
            await store.reserve(
                job, user_id=user.id, cost=3, day=DAY, daily_allowance=2, group_key="qq:g1"
            )
            if n % 3 == 0:
                await store.commit(job)
                await store.finish_job(job, status="succeeded", outputs=[{"width": 1024}])
                await store.remember_message("qq", "g1", f"m{n}", job)
            elif n % 3 == 1:
                await store.commit(job, 1)
                await store.finish_job(job, status="succeeded")
            elif n < 10:
                await store.refund(job, "upstream_error")
                await store.finish_job(job, status="failed", error_kind="upstream_error")
        await store.set_api_key(users[0].id, KEY)
        code = await store.create_link_code(users[1].identity_id)
        telegram = await store.user("telegram", "77", "tg user")
        await store.link(code, telegram.identity_id, DAY)
        await store.set_group_rule("qq:g1", "cap", 50)
        await store.audit("console", "grant", "#1", {"credits": 5})
        await store.update_provider_capabilities("relay", {"stream": False})
        return {"users": len(users) + 1}
    finally:
        await store.close()


@pytest.mark.parametrize(("source", "target"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
async def test_copy_moves_everything_and_the_target_works_as_the_source_did(
    tmp_path: Path, source: str, target: str
) -> None:
    keybox = KeyBox.load(tmp_path / "data")
    async with (
        database_url(source, tmp_path / "src") as src,
        database_url(target, tmp_path / "dst") as dst,
    ):
        await fill(src, keybox)
        done = drawbridge("db", "copy", "--from", src, "--to", dst, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "totals match" in done.stdout
        assert "ledger: " in done.stdout and "users.granted" in done.stdout

        before, after = Raw(src), Raw(dst)
        try:
            for table in ("users", "jobs", "ledger", "reservations", "messages", "audit"):
                sql = f"SELECT * FROM {table} ORDER BY 1"
                assert [_plain(row) for row in before.query(sql)] == [
                    _plain(row) for row in after.query(sql)
                ], table
        finally:
            before.close()
            after.close()

        # The copy is a working install: the key decrypts with the same secret, the open
        # reservation settles, new rows get new ids.
        store = await Store.connect(dst, keybox=keybox)
        try:
            first = await store.user("qq", "0")
            assert await store.get_api_key(first.id) == KEY
            linked = await store.user("telegram", "77")
            assert linked.id == (await store.user("qq", "1")).id
            open_job = (await store.active_jobs((await store.user("qq", "11")).id))[0]
            assert await store.refund(open_job.id, "interrupted")
            newcomer = await store.user("discord", "new")
            assert newcomer.id == 14
            assert await store.message_job("qq", "g1", "m3") is not None
        finally:
            await store.close()


def _plain(row: tuple[object, ...]) -> tuple[object, ...]:
    # Both engines' values as Python sees them alike (memoryview/bytes, int/float of REALs).
    return tuple(
        bytes(v) if isinstance(v, memoryview) else float(v) if isinstance(v, float) else v
        for v in row
    )


async def test_copy_refuses_a_target_that_holds_a_wallet_already(tmp_path: Path) -> None:
    keybox = KeyBox.load(tmp_path / "data")
    async with (
        database_url("sqlite", tmp_path / "src") as src,
        database_url("postgresql", tmp_path) as dst,
    ):
        await fill(src, keybox)
        await fill(dst, keybox)
        done = drawbridge("db", "copy", "--from", src, "--to", dst, cwd=tmp_path)
        assert done.returncode == 2
        assert "already holds users rows" in done.stderr
        assert "Traceback" not in done.stderr


async def test_copy_refuses_a_source_a_live_process_is_writing(tmp_path: Path) -> None:
    keybox = KeyBox.load(tmp_path / "data")
    async with (
        database_url("sqlite", tmp_path / "src") as src,
        database_url("postgresql", tmp_path) as dst,
    ):
        store = await Store.connect(src, keybox=keybox)
        try:
            await store.start_process("qq")
            done = drawbridge("db", "copy", "--from", src, "--to", dst, cwd=tmp_path)
        finally:
            await store.stop_process()
            await store.close()
        assert done.returncode == 2
        assert "drawbridge is running on the source database" in done.stderr
        # Stopped cleanly: now it copies.
        done = drawbridge("db", "copy", "--from", src, "--to", dst, cwd=tmp_path)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_upgrade_applies_the_migrations_once_and_says_so(tmp_path: Path, engine: str) -> None:
    async with database_url(engine, tmp_path) as url:
        if engine == "sqlite":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        first = drawbridge("db", "upgrade", "--database-url", url, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert "schema version 0 -> 13" in first.stdout
        again = drawbridge("db", "upgrade", "--database-url", url, cwd=tmp_path)
        assert again.returncode == 0
        assert "schema version 13, up to date" in again.stdout


def test_upgrade_uses_the_settings_database_by_default(tmp_path: Path) -> None:
    done = drawbridge("db", "upgrade", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "drawbridge.sqlite3: schema version 0 -> 13" in done.stdout
    assert (tmp_path / "data" / "drawbridge.sqlite3").is_file()


def test_a_url_that_is_no_database_is_refused_with_exit_2(tmp_path: Path) -> None:
    done = drawbridge(
        "db", "copy", "--from", "mysql://root:hunter2@db/x", "--to", "sqlite:///x", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "is not a database URL" in done.stderr
    assert "hunter2" not in done.stderr  # the password is never echoed


def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    started = time.monotonic()
    done = drawbridge(
        "db",
        "upgrade",
        "--database-url",
        "postgresql://postgres:s3cret@127.0.0.1:1/nothing",
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error:") and "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr
    assert time.monotonic() - started < 60


def test_a_sqlite_source_that_does_not_exist_is_refused_not_copied_as_empty(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "var" / "drawbridge.sqlite3"
    done = drawbridge(
        "db",
        "copy",
        "--from",
        f"sqlite:///{missing}x",
        "--to",
        f"sqlite:///{tmp_path / 'to.db'}",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout
    assert "no such SQLite file" in done.stderr and "four slashes" in done.stderr
    assert not missing.parent.exists() and not (tmp_path / "to.db").exists()
