"""Faults on the way to the upstream: the user is told, credits stay exact, the job row says why."""

from __future__ import annotations

import errno
import io
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from PIL import Image

from bot.chat import BytesImage
from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services
from tests.recording_chat import RecordingChat, invocation, run_command
from tests.test_store import assert_ledger_exact


async def draw(services: Services, text: str) -> RecordingChat:
    return await run_command(services, invocation("draw", text))


async def outcome(services: Services) -> tuple[int, str | None, str | None]:
    user = await services.store.user("test", "u1")
    credits = await services.store.credits(user.id, today(services.settings), 5)
    jobs = await services.store.job(1)
    assert jobs is not None
    return credits.total_left, jobs.status, jobs.error_kind


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused(settings_factory: Callable[..., Settings]) -> None:
    base = f"http://127.0.0.1:{closed_port()}"
    services = await Services.create(settings_factory(api_base=base))
    try:
        chat = await draw(services, "a fox")
        assert "down or overloaded" in chat.last_text()
        assert await outcome(services) == (5, "failed", "upstream_unavailable")
    finally:
        await services.close()


async def test_a_burst_of_5xx_without_body_is_retried_then_succeeds(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await draw(services, "a fox [fail:flaky_2]")
    assert chat.results()
    assert len(mock_upstream.requests) == 3
    assert await outcome(services) == (4, "succeeded", None)


async def test_a_longer_5xx_burst_fails_cleanly(services: Services) -> None:
    chat = await draw(services, "a fox [fail:flaky_9]")
    assert "down or overloaded" in chat.last_text()
    assert await outcome(services) == (5, "failed", "upstream_unavailable")


async def test_stream_cut_mid_image(services: Services) -> None:
    chat = await draw(services, "a fox [fail:stream_cut]")
    assert "broken answer" in chat.last_text()
    assert await outcome(services) == (5, "failed", "malformed_response")


async def test_error_event_inside_a_stream(services: Services) -> None:
    chat = await draw(services, "a fox [fail:stream_error]")
    assert "rephrase" in chat.last_text()
    assert await outcome(services) == (5, "failed", "moderation")


async def test_429_with_retry_after_is_retried_then_explained(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await draw(services, "a fox [fail:rate_limit]")
    assert "rate limiting" in chat.last_text()
    assert len(mock_upstream.requests) == 3
    assert await outcome(services) == (5, "failed", "rate_limited")


async def test_second_provider_takes_over_when_the_first_is_unreachable(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    providers = [
        {"name": "dead", "api_base": dead, "api_key": "sk-a-000000000000"},
        {"name": "alive", "api_base": mock_upstream.base_url, "api_key": "sk-b-000000000000"},
    ]
    services = await Services.create(settings_factory(providers_json=providers))
    try:
        chat = await draw(services, "a fox")
        assert chat.results()
        job = await services.store.job(1)
        assert job is not None and job.provider == "alive"
    finally:
        await services.close()


async def test_sqlite_busy_from_a_second_writer_is_waited_out(services: Services) -> None:
    import asyncio
    import sqlite3
    import threading

    path = services.settings.data_dir / "drawbridge.sqlite3"
    locked = threading.Event()

    def hold_write_lock() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        threading.Event().wait(1.0)
        db.execute("COMMIT")
        db.close()

    thread = threading.Thread(target=hold_write_lock)
    thread.start()
    await asyncio.to_thread(locked.wait)
    chat = await draw(services, "a fox")
    thread.join()
    assert chat.results()
    assert await outcome(services) == (4, "succeeded", None)


async def test_second_provider_takes_over_when_the_first_has_no_channel(
    settings_factory: Callable[..., Settings],
    mock_upstream: MockUpstream,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
) -> None:
    empty_group = await mock_factory(fail="no_channel")
    providers = [
        {"name": "empty", "api_base": empty_group.base_url, "api_key": "sk-a-000000000000"},
        {"name": "alive", "api_base": mock_upstream.base_url, "api_key": "sk-b-000000000000"},
    ]
    services = await Services.create(settings_factory(providers_json=providers))
    try:
        chat = await draw(services, "a fox")
        assert chat.results()
        assert len(empty_group.requests) == 1 and len(mock_upstream.requests) == 1
        job = await services.store.job(1)
        assert job is not None and job.provider == "alive"
        assert await outcome(services) == (4, "succeeded", None)
    finally:
        await services.close()


# --- a full disk: the result was made and paid for, so the user gets it ---


async def test_a_full_disk_still_delivers_the_result_and_charges_once(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    # The OS refusing every file write (SQLite writes through its own calls, unaffected).
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    chat = await draw(services, "a fox")
    [result] = chat.results()
    assert result.files and result.files[0].data.startswith(b"\x89PNG")
    assert not any("charged" in text.lower() for text in chat.texts())
    assert await outcome(services) == (4, "succeeded", None)
    job = await services.store.job(1)
    assert job is not None and (job.ledger_state, job.spent) == ("committed", 1)
    assert not services.jobs.has_results(1)
    assert_ledger_exact(services.settings.data_dir / "drawbridge.sqlite3")


async def test_a_file_where_the_jobs_folder_should_be_still_delivers_an_edit(
    services: Services,
) -> None:
    if services.jobs.files_dir.is_dir():
        services.jobs.files_dir.rmdir()
    services.jobs.files_dir.write_bytes(b"not a folder")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    chat = await run_command(
        services,
        invocation("edit", "make it blue", references=(BytesImage(buf.getvalue(), "a.png"),)),
    )
    assert chat.results()
    assert await outcome(services) == (4, "succeeded", None)
    assert_ledger_exact(services.settings.data_dir / "drawbridge.sqlite3")
