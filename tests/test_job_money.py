"""What a job costs the user: the size actually drawn, the images actually delivered, once.

Real services on the mock upstream (or, where the mock cannot misbehave that way, a tiny
fake relay in this file), a recording chat, and a real SQLite file; the ledger is checked
straight from the file after each test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from bot import errors
from bot.chat import MessageRef, OutFile, ResultMeta
from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services
from bot.store import sqlite as store_module
from tests.recording_chat import RecordingChat, invocation, run_command
from tests.test_store import assert_ledger_exact

PRICES = {"1k": {"default": 1}, "2k": {"default": 2}, "4k": {"default": 4}}


def db_path(services: Services) -> Path:
    return services.settings.data_dir / "drawbridge.sqlite3"


async def credits_left(services: Services, user_id: str = "u1") -> int:
    user = await services.store.user("test", user_id)
    credits = await services.store.credits(
        user.id, today(services.settings), services.settings.daily_credits
    )
    return credits.total_left


def no_refund_talk(chat: RecordingChat) -> None:
    """After a delivery, nothing may say the job failed or was not charged."""
    shown = "\n".join(chat.texts()).lower()
    assert "nothing was charged" not in shown and "went wrong" not in shown, shown


# --- 12: a 4K job redrawn at 2K pays the 2K price ---


async def test_a_4k_job_redrawn_at_2k_pays_the_2k_price_and_says_so(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.reject_4k = True
    mock_upstream.options.fast_images = True
    services = await Services.create(settings_factory(prices=PRICES))
    try:
        chat = await run_command(services, invocation("draw", "a skyline --size 3840x2160"))
        [result] = chat.results()
        assert "drew 2048x1152" in result.text
        assert "Charged 2 credits, the 2048x1152 price; 2 came back" in result.text
        # Reserved 4 (the 4K price) of the 5 daily credits; spent 2.
        assert await credits_left(services) == 3
        job = await services.store.job(1)
        assert job is not None
        assert (job.status, job.ledger_state, job.cost, job.spent) == (
            "succeeded",
            "committed",
            4,
            2,
        )
        no_refund_talk(chat)
    finally:
        await services.close()
    assert assert_ledger_exact(db_path(services)) == {"reservations": 1, "committed": 1}


async def test_a_4k_job_drawn_at_4k_pays_the_4k_price(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.fast_images = True
    services = await Services.create(settings_factory(prices=PRICES))
    try:
        chat = await run_command(services, invocation("draw", "a skyline --size 3840x2160"))
        [result] = chat.results()
        assert "Charged" not in result.text
        assert await credits_left(services) == 1
    finally:
        await services.close()


# --- 13: fewer images than --n pay for what came and what arrived ---


def png_b64(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
async def short_relay() -> AsyncIterator[str]:
    """A relay that answers any generation with two images, whatever `n` asked for."""
    images = [png_b64("red"), png_b64("blue")]

    async def generations(request: web.Request) -> web.Response:
        await request.read()
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": [{"b64_json": image} for image in images],
            "size": "1024x1024",
            "output_format": "png",
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_fewer_images_than_asked_pay_only_for_those_that_came(
    settings_factory: Callable[..., Settings], short_relay: str
) -> None:
    services = await Services.create(settings_factory(api_base=short_relay, stream=False))
    try:
        chat = await run_command(services, invocation("draw", "four foxes --n 4"))
        [result] = chat.results()
        assert len(result.files) == 2
        assert "returned 2 of the 4 images" in result.text
        assert "Charged 2 credits for the images you got; 2 came back" in result.text
        assert await credits_left(services) == 3
        job = await services.store.job(1)
        assert job is not None and (job.cost, job.spent, len(job.outputs)) == (4, 2, 2)
        no_refund_talk(chat)
    finally:
        await services.close()
    assert_ledger_exact(db_path(services))


class HalfDeliveredChat(RecordingChat):
    """A platform that sends the first image, then fails on the second (and says so)."""

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        await super().send_results(files[:1], meta)
        raise errors.DeliveryError("second upload refused", delivered=1)


async def test_an_upload_failing_half_way_pays_only_for_what_arrived(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.fast_images = True
    chat = await run_command(services, invocation("draw", "two foxes --n 2"), HalfDeliveredChat())
    [result] = chat.results()
    assert len(result.files) == 1
    assert "Only 1 of the 2 images could be sent here" in chat.last_text()
    no_refund_talk(chat)
    assert await credits_left(services) == 4
    job = await services.store.job(1)
    assert job is not None
    assert (job.status, job.ledger_state, job.spent, len(job.outputs)) == (
        "succeeded",
        "committed",
        1,
        1,
    )
    assert_ledger_exact(db_path(services))


# --- 14: a locked database after delivery neither gives the image away nor lies ---


class LockAfterDeliveryChat(RecordingChat):
    """Delivers, then has another connection take the SQLite write lock (a backup, a shell)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.locked = threading.Event()
        self.release = threading.Event()
        self.holder: threading.Thread | None = None

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        await super().send_results(files, meta)
        self.holder = threading.Thread(target=self._hold)
        self.holder.start()
        await asyncio.to_thread(self.locked.wait)

    def _hold(self) -> None:
        con = sqlite3.connect(self.path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        self.locked.set()
        self.release.wait(30)
        con.execute("COMMIT")
        con.close()

    def unlock(self) -> None:
        self.release.set()
        if self.holder is not None:
            self.holder.join()


class ReleaseOnRetry(logging.Handler):
    """Releases the lock once the runner has found the ledger locked and is retrying."""

    def __init__(self, chat: LockAfterDeliveryChat) -> None:
        super().__init__(logging.WARNING)
        self.chat = chat
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1
            self.chat.release.set()


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite waits 50 ms (not 5 s) for another writer, so a held lock fails writes quickly."""
    pragmas = tuple(
        "PRAGMA busy_timeout = 50" if p.startswith("PRAGMA busy_timeout") else p
        for p in store_module.PRAGMAS
    )
    monkeypatch.setattr(store_module, "PRAGMAS", pragmas)


async def test_a_commit_blocked_by_a_lock_is_retried_and_the_user_sees_only_the_result(
    settings_factory: Callable[..., Settings], short_busy_timeout: None
) -> None:
    services = await Services.create(settings_factory())
    chat = LockAfterDeliveryChat(db_path(services))
    watcher = ReleaseOnRetry(chat)
    logging.getLogger("bot.jobs").addHandler(watcher)
    try:
        await run_command(services, invocation("draw", "a fox"), chat)
        chat.unlock()
        assert watcher.retries >= 1
        assert len(chat.results()) == 1
        no_refund_talk(chat)
        assert await credits_left(services) == 4
        job = await services.store.job(1)
        assert job is not None and (job.status, job.ledger_state) == ("succeeded", "committed")
    finally:
        logging.getLogger("bot.jobs").removeHandler(watcher)
        chat.unlock()
        await services.close()
    assert assert_ledger_exact(db_path(services)) == {"reservations": 1, "committed": 1}


async def test_a_commit_locked_out_for_longer_than_the_retries_is_committed_by_recovery(
    settings_factory: Callable[..., Settings],
    short_busy_timeout: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_factory()
    services = await Services.create(settings)
    services.jobs.ledger_retry = 0.3
    chat = LockAfterDeliveryChat(db_path(services))
    try:
        await run_command(services, invocation("draw", "a fox"), chat)
        assert len(chat.results()) == 1
        no_refund_talk(chat)
        assert any(
            r.levelno == logging.ERROR and "could not write its commit" in r.getMessage()
            for r in caplog.records
        )
        # The process stops while the lock is still held.
        await services.close()
    finally:
        chat.unlock()

    again = await Services.create(settings)
    try:
        # Not announced as interrupted (that message says credits were refunded).
        assert again.recovered == []
        job = await again.store.job(1)
        assert job is not None
        assert (job.status, job.ledger_state, job.spent) == ("succeeded", "committed", 1)
        assert await credits_left(again) == 4
    finally:
        await again.close()
    assert assert_ledger_exact(db_path(again)) == {"reservations": 1, "committed": 1}


class LockOnPreviewChat(LockAfterDeliveryChat):
    """Takes the write lock when the first partial preview arrives, before the job fails."""

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        new = await super().send_preview(ref, image)
        if self.holder is None:
            self.holder = threading.Thread(target=self._hold)
            self.holder.start()
            await asyncio.to_thread(self.locked.wait)
        return new


async def test_a_refund_blocked_by_a_lock_is_retried_not_left_open(
    settings_factory: Callable[..., Settings], short_busy_timeout: None
) -> None:
    services = await Services.create(settings_factory())
    chat = LockOnPreviewChat(db_path(services))
    watcher = ReleaseOnRetry(chat)
    logging.getLogger("bot.jobs").addHandler(watcher)
    try:
        # A partial image, then the stream breaks: the job fails while the file is locked.
        await run_command(services, invocation("draw", "a fox [fail:stream_cut]"), chat)
        chat.unlock()
        assert watcher.retries >= 1
        assert "broken answer" in chat.last_text()
        assert await credits_left(services) == 5
        job = await services.store.job(1)
        assert job is not None
        assert (job.status, job.error_kind, job.ledger_state) == (
            "failed",
            "malformed_response",
            "refunded",
        )
    finally:
        logging.getLogger("bot.jobs").removeHandler(watcher)
        chat.unlock()
        await services.close()
    assert assert_ledger_exact(db_path(services)) == {"reservations": 1, "refunded": 1}
