"""An honest ETA: estimates from the recent similar jobs (median and p90 of their upstream
time, the queue ahead over the concurrency), none without history, "taking longer than usual"
past the p90, and an estimate that follows the relay when its latency changes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable

import pytest

import bot.jobs
from adapters.telegram import FloodPolicy, TelegramPlatform
from bot.chat import MessageRef
from bot.config import Settings
from bot.eta import (
    HISTORY,
    Estimate,
    EtaBook,
    clock,
    estimate_of,
    eta_class,
    queue_factor,
    shifted,
)
from bot.mock_upstream import MockUpstream
from bot.services import Services
from bot.sizes import Size
from plugins.dispatch import dispatch
from tests.fake_onebot import text
from tests.fake_telegram import FakeTelegram
from tests.recording_chat import RecordingChat, invocation, run_command
from tests.test_confirm import qq_bot
from tests.test_qq_e2e import Running, _results_for, _say, _texts_for, _until, _users


@pytest.fixture
async def rich(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    services = await Services.create(
        settings_factory(daily_credits=200, user_max_jobs=5, stream=False)
    )
    try:
        yield services
    finally:
        await services.close()


def rows(services: Services) -> list[sqlite3.Row]:
    with sqlite3.connect(services.settings.data_dir / "drawbridge.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


FAST = FloodPolicy(chat_interval=0.0, group_limit=10_000, global_interval=0.0)
DRAW_CLASS = eta_class("default", Size(1024, 1024), None, "draw")  # a /draw at the default size


# --- the arithmetic ---


def test_no_estimate_without_enough_history() -> None:
    assert estimate_of([]) is None
    assert estimate_of([1.0, 2.0]) is None
    estimate = estimate_of([1.0, 2.0, 3.0])
    assert estimate == Estimate(2.0, 3.0, 3)


def test_median_and_p90_of_the_samples() -> None:
    estimate = estimate_of([float(x) for x in range(1, 11)])
    assert estimate is not None
    assert estimate.median == 5.5 and estimate.p90 == 9.0


def test_queue_adds_the_jobs_ahead_divided_by_the_concurrency() -> None:
    assert queue_factor(0, 1) == 1.0
    assert queue_factor(3, 1) == 4.0
    assert queue_factor(4, 2) == 3.0
    assert Estimate(10.0, 20.0, 5).scaled(queue_factor(4, 2)) == Estimate(30.0, 60.0, 5)


def test_a_change_of_more_than_20_percent_is_a_change() -> None:
    shown = Estimate(10.0, 20.0, 5)
    assert not Estimate(11.9, 20.0, 5).differs(shown)
    assert Estimate(12.1, 20.0, 5).differs(shown)
    assert Estimate(10.0, 15.0, 5).differs(shown)
    assert Estimate(10.0, 20.0, 5).differs(None)


def test_classes_keep_provider_tier_quality_and_kind_apart() -> None:
    assert eta_class("a", Size(1024, 1024), "high", "draw") == "a|1k|high|draw"
    assert eta_class("a", Size(3840, 2160), None, "edit") == "a|4k|auto|edit"


def test_a_run_of_jobs_outside_the_old_range_is_a_new_level() -> None:
    assert not shifted([1.0] * 10 + [1.1] * 5)
    assert shifted([1.0] * 10 + [5.0] * 5)
    assert shifted([5.0] * 10 + [1.0] * 5)
    assert not shifted([1.0] * 10 + [5.0] * 4 + [1.0])


def test_clock_rounds_up() -> None:
    assert clock(0.2) == "0:01" and clock(61.0) == "1:01" and clock(59.5) == "1:00"


class Durations:
    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.asked: list[tuple[str, int]] = []

    async def upstream_durations(self, eta_class: str, limit: int) -> list[float]:
        self.asked.append((eta_class, limit))
        return self.values[-limit:]


async def test_book_loads_the_last_50_once_and_follows_a_step_within_10_jobs() -> None:
    source = Durations([10.0] * 80)
    book = EtaBook(source)
    first = await book.estimate("c")
    assert first is not None and first.median == 10.0 and first.samples == HISTORY
    assert await book.estimate("c") is first  # computed once while the history stands
    await book.record("c", 2.0)
    moved = await book.estimate("c")
    assert moved is not first and moved is not None and moved.p90 == 10.0
    for _ in range(9):
        await book.record("c", 2.0)
    after = await book.estimate("c")
    assert after is not None and after.median == 2.0 and after.p90 == 2.0
    assert source.asked == [("c", HISTORY)]


# --- through the job runner and the mock upstream ---


async def test_each_job_records_queue_wait_and_upstream_time_apart(
    rich: Services, mock_upstream: MockUpstream
) -> None:
    await run_command(rich, invocation("draw", "a fox --quality high"))
    [row] = rows(rich)
    assert row["eta_class"] == "default|1k|high|draw"
    assert row["created_at"] <= row["started_at"] <= row["upstream_done_at"]
    assert row["upstream_done_at"] <= row["finished_at"]


async def test_no_history_means_no_estimate_is_shown(
    rich: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(rich, invocation("draw", "a fox"))
    assert chat.results()
    assert not any("about" in text for text in chat.texts())


async def test_with_history_the_status_shows_the_estimate(
    rich: Services, mock_upstream: MockUpstream
) -> None:
    for index in range(3):
        await run_command(rich, invocation("draw", f"fox {index}"))
    chat = await run_command(rich, invocation("draw", "fox 4"))
    assert "Usually takes about 0:01 (at most 0:01)" in chat.texts()[0]
    # Another size tier has no history of its own: no estimate borrowed from the 1k jobs.
    other = await run_command(rich, invocation("draw", "fox --size 2k"))
    assert not any("about" in text for text in other.texts())


async def test_queued_job_shows_the_wait_for_the_jobs_ahead(
    settings_factory: Callable[..., Settings],
    mock_upstream: MockUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bot.jobs, "QUEUE_TICK", 0.05)
    services = await Services.create(
        settings_factory(daily_credits=50, concurrency=1, stream=False)
    )
    try:
        for index in range(3):
            await run_command(services, invocation("draw", f"fox {index}"))
        mock_upstream.options.latency = 0.5
        chats = [RecordingChat() for _ in range(3)]
        for index, chat in enumerate(chats):
            await dispatch(invocation("draw", f"cat {index}", user_id=f"q{index}"), chat, services)
        await services.jobs.wait_idle()
        third = chats[2].texts()
        assert third[0].startswith("Queued #2")
        # Two jobs ahead of it on one slot (one running, one waiting) plus itself.
        assert "Ready in about" in third[0]
        assert all(c.results() for c in chats)
    finally:
        await services.close()


async def test_a_job_past_its_p90_says_it_is_taking_longer_than_usual(
    rich: Services, mock_upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.jobs, "ETA_TICK", 0.05)
    for index in range(3):
        await run_command(rich, invocation("draw", f"fox {index}"))
    mock_upstream.options.latency = 1.5
    chat = await run_command(rich, invocation("draw", "a slow fox"))
    edits = [s.text for s in chat.log if s.kind == "edit"]
    assert any("Taking longer than usual" in text for text in edits)
    assert chat.results()


async def test_estimate_follows_the_upstream_latency_within_10_jobs(
    rich: Services, mock_upstream: MockUpstream
) -> None:
    """A slow relay for 11 jobs, then a fast one for 10, then slow again for 6: each time
    the estimate follows (a median over all 21 would still say "slow" after 10 fast jobs)."""
    slow = 0.5
    mock_upstream.options.latency = slow
    for index in range(11):
        await run_command(rich, invocation("draw", f"slow {index}"))
    estimate = await rich.jobs.eta.estimate(DRAW_CLASS)
    assert estimate is not None and estimate.median >= slow

    mock_upstream.options.latency = 0.0
    for index in range(10):
        await run_command(rich, invocation("draw", f"fast {index}"))
    estimate = await rich.jobs.eta.estimate(DRAW_CLASS)
    assert estimate is not None and estimate.median < slow and estimate.p90 < slow

    mock_upstream.options.latency = slow
    for index in range(6):
        await run_command(rich, invocation("draw", f"slow again {index}"))
    estimate = await rich.jobs.eta.estimate(DRAW_CLASS)
    assert estimate is not None and estimate.median >= slow


async def test_a_restart_keeps_the_history(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    settings = settings_factory(daily_credits=50)
    services = await Services.create(settings)
    try:
        for index in range(3):
            await run_command(services, invocation("draw", f"fox {index}"))
    finally:
        await services.close()
    services = await Services.create(settings)
    try:
        chat = await run_command(services, invocation("draw", "fox after restart"))
        assert "Usually takes about" in chat.texts()[0]
    finally:
        await services.close()


# --- QQ end to end (fake OneBot): no estimate first, then one from the jobs before ---


@pytest.fixture(scope="module")
async def qq(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with qq_bot(tmp_path_factory.mktemp("qq-eta"), DRAWBRIDGE_DAILY_CREDITS="50") as bot:
        yield bot


async def test_qq_acknowledgement_shows_an_estimate_once_there_is_history(qq: Running) -> None:
    user = next(_users)
    acks = []
    for index in range(4):
        asked = await _say(qq, user, text(f"/draw fox {index}"))
        await _until(qq, _results_for(asked))
        [ack] = _texts_for(asked)(qq.onebot.calls)
        acks.append(ack.text)
        # The next command comes once this job is settled (and so counted), not as soon as
        # its image shows: the runner records a job's time after its commit.
        await _settled(qq, index + 1)
    assert not any("about" in ack for ack in acks[:3])
    assert "Usually takes about" in acks[3]


async def _settled(bot: Running, count: int) -> None:
    async with asyncio.timeout(15):
        while True:
            with bot.db() as db:
                done = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'")
                if done.fetchone()[0] >= count:
                    return
            await asyncio.sleep(0.05)


# --- Telegram (fake Bot API) ---


async def test_telegram_status_shows_the_estimate_once_there_is_history(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    async with FakeTelegram() as fake:
        settings = settings_factory(
            telegram_bot_token=fake.token, telegram_api_server=fake.base_url, daily_credits=50
        )
        services = await Services.create(settings)
        platform = TelegramPlatform(settings, services, flood=FAST, polling_timeout=5)
        await platform.start()
        try:
            alice = fake.user(1001)
            chat = fake.private_chat(alice)
            for index in range(4):
                fake.send_message(chat, alice, f"/draw fox {index}")
                await fake.wait_call(
                    "sendPhoto", where=lambda c: "reply_markup" in c.fields, count=index + 1
                )
                await services.jobs.wait_idle()
            statuses = [
                c.fields["text"]
                for c in fake.ok_calls("sendMessage")
                if c.fields["text"].startswith("Drawing")
            ]
            assert len(statuses) == 4
            assert not any("about" in s for s in statuses[:3])
            assert "Usually takes about" in statuses[3]
        finally:
            await platform.stop()
            await services.close()


class EditSignal(RecordingChat):
    """A recording chat that says when a status edit arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.edited = asyncio.Event()

    async def edit_text(self, ref: MessageRef, text: str) -> None:
        await super().edit_text(ref, text)
        self.edited.set()


async def test_a_running_status_is_edited_at_once_when_its_estimate_moves_over_20_percent(
    rich: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Elapsed-time edits every 1000 s: any edit seen here comes from the estimate moving.
    monkeypatch.setattr(bot.jobs, "STATUS_TICK", 1000.0)
    monkeypatch.setattr(bot.jobs, "ETA_TICK", 0.01)
    cls = "p|1k|auto|draw"
    for _ in range(5):
        await rich.jobs.eta.record(cls, 10.0)
    shown = await rich.jobs.eta.estimate(cls)
    chat = EditSignal()
    ticket = bot.jobs._Ticket(1, 1, "p", eta_class=cls)

    async def status() -> MessageRef:  # the job's status line, as sent beside its request
        return MessageRef("status")

    ticking = asyncio.create_task(
        rich.jobs._tick(chat, status, "en", ticket, time.monotonic(), shown)
    )
    try:
        for _ in range(2):  # 10, 10, 10, 10, 10, 11, 11: the median stays 10 (under 20%)
            await rich.jobs.eta.record(cls, 11.0)
        await asyncio.sleep(0.2)  # ticks that see it (fewer only weaken the test)
        for _ in range(6):  # then the median reaches 20 s: over 20%
            await rich.jobs.eta.record(cls, 20.0)
        async with asyncio.timeout(10):
            await chat.edited.wait()
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)
    # The first edit is the moved estimate: the small move made none.
    assert "Usually takes about 0:20" in chat.texts()[0]
