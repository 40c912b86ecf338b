"""The platform-neutral commands, driven through a recording Chat and the mock upstream."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import Callable
from datetime import date, timedelta

import pytest
from PIL import Image

from bot.chat import BytesImage, Invocation
from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation, run_command

OWN_KEY = "sk-own-key-1234567890abcdef"


inv = invocation


def png(width: int = 64, height: int = 48, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


run = run_command


async def job_rows(services: Services) -> list[sqlite3.Row]:
    path = services.settings.data_dir / "drawbridge.sqlite3"
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


async def left(services: Services, user_id: str = "u1") -> int:
    user = await services.store.user("test", user_id)
    credits = await services.store.credits(
        user.id, today(services.settings), services.settings.daily_credits
    )
    return credits.total_left


async def test_draw_delivers_a_png_of_the_asked_size_and_charges_one_credit(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run(services, inv("draw", "a red fox --size 3:2"))
    [result] = chat.results()
    [image] = result.files
    assert Image.open(io.BytesIO(image.data)).size == (1536, 1024)
    assert image.mime == "image/png"
    assert mock_upstream.requests[-1].fields["size"] == "1536x1024"
    assert await left(services) == 4
    [row] = await job_rows(services)
    assert row["status"] == "succeeded"
    assert "usage" in row.keys() and row["usage"]


async def test_draw_n2_charges_two_and_sends_two_files(services: Services) -> None:
    chat = await run(services, inv("draw", "two cats --n 2"))
    assert len(chat.results()[0].files) == 2
    assert await left(services) == 3


async def test_alias_text_and_chinese_prompt_work(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run(services, inv("draw", "一只猫 🐱 שלום --size 16:9", locale="zh-CN"))
    assert chat.results()
    assert mock_upstream.requests[-1].fields["prompt"] == "一只猫 🐱 שלום"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a fox --size 1919x1079", "1919x1079"),
        ("a fox --size 99999x1", "99999x1"),
        ("a fox --n 0", "--n"),
        ("a fox --n 50", "--n"),
        ("a fox --quality ultra", "--quality"),
        ("a fox --style vivid", "--style"),
        ("", "Tell me what to draw"),
        ("x" * 40000, "40000"),
    ],
)
async def test_bad_input_is_refused_clearly_and_costs_nothing(
    services: Services, mock_upstream: MockUpstream, text: str, needle: str
) -> None:
    chat = await run(services, inv("draw", text))
    assert needle in chat.last_text()
    assert not chat.results()
    assert mock_upstream.requests == []
    assert await left(services) == 5
    rows = await job_rows(services)
    assert rows and rows[-1]["status"] == "failed" and rows[-1]["error_kind"]


UPSTREAM_FAILURES = [
    ("invalid_key", "invalid_key", "/token"),
    ("quota", "upstream_quota", "balance"),
    ("no_channel", "no_channel", "group"),
    ("group_denied", "group_denied", "group"),
    ("moderation", "moderation", "rephrase"),
    ("content_policy", "moderation", "rephrase"),
    ("sensitive_words", "moderation", "rephrase"),
    ("unknown_parameter", "unknown_parameter", "parameter"),
    ("too_large", "request_too_large", "smaller"),
    ("upstream_banned", "upstream_unavailable", "later"),
    ("server_error", "upstream_unavailable", "later"),
    ("not_implemented", "not_supported", "from a prompt"),  # a draw: not "editing"
    ("malformed", "malformed_response", "broken"),
    ("truncated_b64", "malformed_response", "broken"),
    ("no_data", "malformed_response", "broken"),
]


@pytest.mark.parametrize(("fail", "kind", "needle"), UPSTREAM_FAILURES)
async def test_each_upstream_error_is_explained_and_refunded(
    services: Services, fail: str, kind: str, needle: str
) -> None:
    chat = await run(services, inv("draw", f"a fox [fail:{fail}]"))
    assert needle.lower() in chat.last_text().lower()
    assert not chat.results()
    assert await left(services) == 5
    row = (await job_rows(services))[-1]
    assert (row["status"], row["error_kind"]) == ("failed", kind)


async def test_timeout_is_refunded_and_not_retried(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    settings = settings_factory(timeout=0.5)
    services = await Services.create(settings)
    try:
        chat = await run(services, inv("draw", "slow fox [fail:timeout]"))
        assert "too long" in chat.last_text()
        assert len(mock_upstream.requests) == 1
        assert await left(services) == 5
        assert (await job_rows(services))[-1]["error_kind"] == "timeout"
    finally:
        await services.close()


async def test_expired_result_url_is_refunded(
    services: Services, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.mode = "url"
    chat = await run(services, inv("draw", "a fox [fail:expired_url]"))
    assert "download" in chat.last_text()
    assert await left(services) == 5
    assert (await job_rows(services))[-1]["error_kind"] == "result_download_failed"


async def test_delivery_failure_is_refunded(services: Services) -> None:
    chat = await run(services, inv("draw", "a fox"), RecordingChat(fail_delivery=True))
    assert "couldn't send" in chat.last_text()
    assert await left(services) == 5
    assert (await job_rows(services))[-1]["error_kind"] == "delivery_failed"


async def test_edit_uploads_every_reference(
    services: Services, mock_upstream: MockUpstream
) -> None:
    refs = (BytesImage(png(color="red"), "a"), BytesImage(png(color="blue"), "b"))
    chat = await run(services, inv("edit", "make it night", references=refs))
    assert chat.results()
    request = mock_upstream.requests[-1]
    assert request.path.endswith("/images/edits")
    assert [f.filename for f in request.files] == ["ref1.png", "ref2.png"]


async def test_edit_without_image_says_so_and_never_draws(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run(services, inv("edit", "make it night"))
    assert "needs an image" in chat.last_text()
    assert mock_upstream.requests == []
    assert await left(services) == 5


async def test_edit_with_a_broken_image_costs_nothing(
    services: Services, mock_upstream: MockUpstream
) -> None:
    broken = png()[:60]
    chat = await run(services, inv("edit", "fix", references=(BytesImage(broken),)))
    assert "damaged" in chat.last_text() or "not a supported image" in chat.last_text()
    assert mock_upstream.requests == []
    assert await left(services) == 5


async def test_edit_of_a_result_uses_it_as_reference(
    services: Services, mock_upstream: MockUpstream
) -> None:
    first = await run(services, inv("draw", "a fox"))
    job_id = first.results()[0].meta.job_id  # type: ignore[union-attr]
    chat = await run(services, inv("edit", "add a hat", reply_to_job=job_id))
    assert chat.results()
    assert len(mock_upstream.requests[-1].files) == 1


async def test_reroll_repeats_the_job_with_its_options(
    services: Services, mock_upstream: MockUpstream
) -> None:
    first = await run(services, inv("draw", "a fox --size 2:3"))
    job_id = first.results()[0].meta.job_id  # type: ignore[union-attr]
    await run(services, inv("reroll", reply_to_job=job_id))
    assert [r.fields["size"] for r in mock_upstream.requests] == ["1024x1536", "1024x1536"]
    assert await left(services) == 3


async def test_reroll_of_a_job_from_another_chat_is_refused(services: Services) -> None:
    first = await run(services, inv("draw", "a fox", chat_id="elsewhere"))
    job_id = first.results()[0].meta.job_id  # type: ignore[union-attr]
    chat = await run(services, inv("reroll", reply_to_job=job_id))
    assert "can't find" in chat.last_text()
    assert await left(services) == 4


async def test_insufficient_credits_charges_nothing(
    services: Services, mock_upstream: MockUpstream
) -> None:
    for _ in range(5):
        await run(services, inv("draw", "a fox"))
    chat = await run(services, inv("draw", "one more"))
    assert "Not enough credits" in chat.last_text()
    assert len(mock_upstream.requests) == 5


async def test_granted_balance_is_spent_after_the_daily_allowance(services: Services) -> None:
    admin = await services.store.user("test", "boss")
    await services.store.set_role(admin.id, "admin")
    await run(services, inv("quota"))  # creates u1
    chat = await run(services, inv("grant", "u1 3", user_id="boss"))
    assert "balance is 3" in chat.last_text()
    assert await left(services) == 8


async def test_daily_allowance_resets_on_a_new_day(services: Services) -> None:
    user = await services.store.user("test", "u1")
    day = today(services.settings)
    job = await services.store.create_job(
        user_id=user.id,
        platform="test",
        chat_id="c1",
        group_key=None,
        kind="draw",
        prompt="p",
        options={},
        ref_count=0,
        own_key=False,
    )
    await services.store.reserve(job, user_id=user.id, cost=5, day=day, daily_allowance=5)
    await services.store.commit(job)
    assert (await services.store.credits(user.id, day, 5)).daily_left == 0
    assert (await services.store.credits(user.id, day + timedelta(days=1), 5)).daily_left == 5


async def test_own_key_spends_no_credits_and_is_sent_upstream(
    services: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run(services, inv("token", OWN_KEY))
    assert "sk-...cdef" in chat.last_text()
    assert OWN_KEY not in chat.everything()
    await run(services, inv("draw", "a fox"))
    assert mock_upstream.requests[-1].authorization == f"Bearer {OWN_KEY}"
    assert await left(services) == 5
    chat = await run(services, inv("token", "clear"))
    await run(services, inv("draw", "a fox"))
    assert mock_upstream.requests[-1].authorization != f"Bearer {OWN_KEY}"
    assert await left(services) == 4


async def test_own_invalid_key_says_rebind(services: Services) -> None:
    await run(services, inv("token", OWN_KEY))
    chat = await run(services, inv("draw", "a fox [fail:invalid_key]"))
    assert "/token" in chat.last_text()


async def test_token_in_a_group_is_deleted_and_not_bound(services: Services) -> None:
    chat = await run(services, inv("token", OWN_KEY, is_private=False, user_name="Ann"))
    assert chat.log[0].kind == "delete_invocation"
    assert "deleted your message" in chat.last_text()
    assert OWN_KEY not in chat.everything()
    user = await services.store.user("test", "u1")
    assert await services.store.get_api_key(user.id) is None


async def test_token_in_a_group_without_delete_rights_warns(services: Services) -> None:
    chat = await run(
        services, inv("token", OWN_KEY, is_private=False), RecordingChat(can_delete=False)
    )
    assert "could not delete" in chat.last_text()


async def test_key_is_encrypted_at_rest(services: Services) -> None:
    await run(services, inv("token", OWN_KEY))
    raw = (services.settings.data_dir / "drawbridge.sqlite3").read_bytes()
    wal = services.settings.data_dir / "drawbridge.sqlite3-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert OWN_KEY.encode() not in raw


async def test_banned_user_is_refused_everything(
    services: Services, mock_upstream: MockUpstream
) -> None:
    user = await services.store.user("test", "u1")
    await services.store.set_role(user.id, "banned")
    for command, text in (("draw", "a fox"), ("quota", ""), ("token", OWN_KEY), ("help", "")):
        chat = await run(services, inv(command, text))
        assert "banned" in chat.last_text()
    assert mock_upstream.requests == []


async def test_admin_commands_refuse_non_admins(services: Services) -> None:
    for command, text in (("grant", "u1 100"), ("ban", "u2"), ("unban", "u1"), ("stats", "")):
        chat = await run(services, inv(command, text))
        assert "Only admins" in chat.last_text()
    assert await left(services) == 5


async def test_admin_from_settings_can_ban_and_unban(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(admins="test:boss"))
    try:
        await run(services, inv("quota", user_id="u2"))
        chat = await run(services, inv("ban", "u2", user_id="boss"))
        assert "banned" in chat.last_text()
        chat = await run(services, inv("draw", "a fox", user_id="u2"))
        assert "banned" in chat.last_text()
        await run(services, inv("unban", "u2", user_id="boss"))
        chat = await run(services, inv("draw", "a fox", user_id="u2"))
        assert chat.results()
        chat = await run(services, inv("stats", user_id="boss"))
        assert "1 images" in chat.last_text() or "1 jobs" in chat.last_text()
    finally:
        await services.close()


async def test_per_user_limit_and_queue_position(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.latency = 0.5
    services = await Services.create(settings_factory(concurrency=1, user_max_jobs=1))
    try:
        a, b, c = RecordingChat(), RecordingChat(), RecordingChat()
        await dispatch(inv("draw", "first"), a, services)
        await dispatch(inv("draw", "second"), b, services)  # same user: over the limit
        await dispatch(inv("draw", "third", user_id="u2"), c, services)  # waits behind the first
        assert "already have 1" in b.last_text()
        await asyncio.sleep(0.1)  # the job's own task posts its status line
        assert "Queued #1" in c.texts()[0]
        await services.jobs.wait_idle()
        assert a.results() and c.results() and not b.results()
    finally:
        await services.close()


async def test_busy_when_the_queue_is_full(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.latency = 0.5
    services = await Services.create(settings_factory(concurrency=1, queue_size=1))
    try:
        chats = [RecordingChat() for _ in range(3)]
        for index, chat in enumerate(chats):
            await dispatch(inv("draw", f"fox {index}", user_id=f"u{index}"), chat, services)
        assert "busy" in chats[2].last_text()
        await services.jobs.wait_idle()
        assert chats[0].results() and chats[1].results() and not chats[2].results()
        assert await left(services, "u2") == 5
    finally:
        await services.close()


async def test_cancel_a_queued_job_refunds_it(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.latency = 0.5
    services = await Services.create(settings_factory(concurrency=1))
    try:
        await dispatch(inv("draw", "first", user_id="u2"), RecordingChat(), services)
        queued = RecordingChat()
        await dispatch(inv("draw", "second"), queued, services)
        other = await run_nowait(services, inv("cancel", user_id="u3"))
        assert "no queued job" in other.last_text()
        await dispatch(inv("cancel"), RecordingChat(), services)
        await services.jobs.wait_idle()
        assert "cancelled" in queued.last_text()
        assert not queued.results()
        assert await left(services) == 5
        assert [r["status"] for r in await job_rows(services)] == ["succeeded", "cancelled"]
    finally:
        await services.close()


async def queued_behind_a_running_job(services: Services) -> tuple[int, RecordingChat]:
    """u2's /draw holding the only slot, then u1's queued behind it: u1's store id, and the
    queued job's chat. dispatch returns once the job is queued, before its task has taken a
    step, so what the caller does next (without awaiting) comes before it."""
    await dispatch(inv("draw", "first", user_id="u2"), RecordingChat(), services)
    user = await services.jobs.reads.user("test", "u1")
    queued = RecordingChat()
    await dispatch(inv("draw", "second"), queued, services)
    return user.id, queued


async def assert_stopped_once(
    services: Services, queued: RecordingChat, *, shutdown: bool = False
) -> None:
    """The queued job refunded, recorded and its user told, once; the running one done."""
    await services.jobs.wait_idle()
    said = "restarting" if shutdown else "cancelled"
    assert [text for text in queued.texts() if said in text] == [queued.last_text()]
    assert not queued.results()
    assert await left(services) == 5
    rows = [(r["status"], r["error_kind"]) for r in await job_rows(services)]
    stopped = ("failed", "shutdown") if shutdown else ("cancelled", "cancelled")
    assert rows == [("succeeded", None), stopped]


@pytest.mark.parametrize("shutting_down", [False, True])
async def test_a_job_cancelled_before_its_task_first_runs_is_refunded_and_told(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream, shutting_down: bool
) -> None:
    # A task cancelled before its first step runs none of its coroutine, `finally` included:
    # the job's own code can neither refund it nor wake whoever waits for it.
    mock_upstream.options.latency = 0.5
    services = await Services.create(settings_factory(concurrency=1))
    try:
        user_id, queued = await queued_behind_a_running_job(services)
        if shutting_down:
            services.jobs.stop_intake()
        async with asyncio.timeout(5):
            assert await services.jobs.cancel(user_id) is not None
        await assert_stopped_once(services, queued, shutdown=shutting_down)
    finally:
        await services.close()


async def test_a_second_cancel_before_the_settling_task_runs_still_settles_the_job_once(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    # The task that settles a job cancelled before its first step can itself be cancelled
    # before its own (another /cancel in between): the job must still be settled, once.
    mock_upstream.options.latency = 0.5
    services = await Services.create(settings_factory(concurrency=1))
    try:
        user_id, queued = await queued_behind_a_running_job(services)
        ticket = next(t for t in services.jobs._tickets.values() if t.user_id == user_id)
        job_task = ticket.task
        assert job_task is not None and not ticket.started
        job_task.cancel()
        async with asyncio.timeout(5):
            # Step the loop until the settling task is made, before it has run.
            while ticket.task is job_task:  # noqa: ASYNC110
                await asyncio.sleep(0)
        assert not ticket.started
        async with asyncio.timeout(5):
            assert await services.jobs.cancel(user_id) == ticket.job_id
        await assert_stopped_once(services, queued)
    finally:
        await services.close()


async def run_nowait(services: Services, invocation: Invocation) -> RecordingChat:
    chat = RecordingChat()
    await dispatch(invocation, chat, services)
    return chat


async def test_shutdown_refunds_running_jobs_and_tells_the_user(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.latency = 30
    services = await Services.create(settings_factory())
    chat = RecordingChat()
    await dispatch(inv("draw", "slow"), chat, services)
    await asyncio.sleep(0.2)
    await services.close(grace=0.2)
    assert "restarting" in chat.last_text()
    with sqlite3.connect(services.settings.data_dir / "drawbridge.sqlite3") as db:
        status, kind = db.execute("SELECT status, error_kind FROM jobs").fetchone()
        assert (status, kind) == ("failed", "shutdown")
    services = await Services.create(settings_factory())
    try:
        assert await left(services) == 5
    finally:
        await services.close()


async def test_quota_and_help_and_lang(services: Services) -> None:
    chat = await run(services, inv("quota"))
    assert "5/5" in chat.last_text()
    chat = await run(services, inv("help"))
    assert "/draw" in chat.last_text() and "/画" in chat.last_text()
    assert "/grant" not in chat.last_text()
    await run(services, inv("lang", "zh"))
    chat = await run(services, inv("quota"))
    assert "今日额度" in chat.last_text()
    await run(services, inv("lang", "auto"))
    chat = await run(services, inv("quota", locale="zh-CN"))
    assert "今日额度" in chat.last_text()
    chat = await run(services, inv("quota", locale="en-US"))
    assert "Credits today" in chat.last_text()


async def test_original_sends_the_stored_files(services: Services) -> None:
    first = await run(services, inv("draw", "a fox"))
    meta = first.results()[0].meta
    assert meta is not None
    chat = await run(services, inv("original", reply_to_job=meta.job_id))
    [sent] = chat.results()
    assert sent.meta is not None and sent.meta.originals
    assert sent.files[0].data == first.results()[0].files[0].data


def test_day_boundary_follows_the_configured_timezone() -> None:
    assert isinstance(today(Settings(_env_file=None, timezone="Asia/Shanghai")), date)


async def test_a_key_that_can_no_longer_be_decrypted_is_not_silently_replaced(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory())
    await run(services, inv("token", OWN_KEY))
    await services.close()
    (services.settings.data_dir / "secret.key").unlink()
    services = await Services.create(settings_factory())
    try:
        chat = await run(services, inv("draw", "a fox"))
        assert "/token" in chat.last_text() and "can no longer be read" in chat.last_text()
        assert mock_upstream.requests == []
        assert await left(services) == 5
    finally:
        await services.close()


async def test_prices_follow_size_tier_and_quality(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    prices = {"1k": {"default": 1, "high": 2}, "2k": {"default": 3}}
    services = await Services.create(settings_factory(prices=prices, daily_credits=10))
    try:
        await run(services, inv("draw", "a fox --quality high"))
        assert await left(services) == 8
        await run(services, inv("draw", "a fox --size 2k"))
        assert await left(services) == 5
        chat = await run(services, inv("draw", "a fox --size 2k --n 2"))
        assert "needs 6" in chat.last_text()
        assert await left(services) == 5
    finally:
        await services.close()


async def test_group_daily_cap_stops_a_group_but_not_private_chats(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(group_daily_cap=2))
    try:
        for user in ("a", "b"):
            chat = await run(services, inv("draw", "a fox", user_id=user, is_private=False))
            assert chat.results()
        chat = await run(services, inv("draw", "a fox", user_id="c", is_private=False))
        assert "group has used its 2 credits" in chat.last_text()
        assert await left(services, "c") == 5
        chat = await run(services, inv("draw", "a fox", user_id="c", chat_id="dm-c"))
        assert chat.results()
    finally:
        await services.close()


async def test_partial_previews_are_shown_while_streaming(services: Services) -> None:
    chat = await run(services, inv("draw", "a fox"))
    previews = [s for s in chat.log if s.kind == "preview"]
    assert previews and Image.open(io.BytesIO(previews[0].files[0].data)).format == "JPEG"
    assert chat.results()


async def test_a_failed_jobs_preview_is_removed(services: Services) -> None:
    chat = await run(services, inv("draw", "a fox [fail:stream_cut]"))
    previews = [s for s in chat.log if s.kind == "preview"]
    assert previews
    deleted = [s.ref for s in chat.log if s.kind == "delete"]
    assert previews[-1].ref in deleted
    assert not chat.results()


class SlowImage:
    """A reference that takes a while to download, like a big QQ image."""

    name = "slow"

    async def fetch(self, max_bytes: int) -> bytes:
        await asyncio.sleep(0.3)
        return png()


async def test_two_commands_at_once_cannot_both_slip_under_the_per_user_limit(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(user_max_jobs=1))
    try:
        chats = [RecordingChat(), RecordingChat()]
        await asyncio.gather(
            *(
                dispatch(inv("edit", "night", references=(SlowImage(),)), chat, services)
                for chat in chats
            )
        )
        await services.jobs.wait_idle()
        assert sorted(bool(c.results()) for c in chats) == [False, True]
        assert await left(services) == 4
    finally:
        await services.close()


async def test_queue_position_is_kept_up_to_date(
    settings_factory: Callable[..., Settings],
    mock_upstream: MockUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bot.jobs

    monkeypatch.setattr(bot.jobs, "QUEUE_TICK", 0.1)
    mock_upstream.options.latency = 0.6
    services = await Services.create(settings_factory(concurrency=1))
    try:
        third = RecordingChat()
        for index, chat in enumerate((RecordingChat(), RecordingChat(), third)):
            await dispatch(inv("draw", f"fox {index}", user_id=f"u{index}"), chat, services)
        await services.jobs.wait_idle()
        queued = [text for text in third.texts() if text.startswith("Queued")]
        assert queued[0].startswith("Queued #2") and any(q.startswith("Queued #1") for q in queued)
        assert third.results()
    finally:
        await services.close()


async def test_background_reaches_the_upstream_and_rerolls_keep_it(
    services: Services, mock_upstream: MockUpstream
) -> None:
    first = await run(services, inv("draw", "a sticker --background transparent"))
    assert mock_upstream.requests[-1].fields["background"] == "transparent"
    meta = first.results()[0].meta
    assert meta is not None
    await run(services, inv("reroll", reply_to_job=meta.job_id))
    assert mock_upstream.requests[-1].fields["background"] == "transparent"


async def test_a_command_still_being_checked_at_shutdown_is_refunded_and_told(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory())
    chat = RecordingChat()
    dispatching = asyncio.create_task(
        dispatch(inv("edit", "night", references=(SlowImage(),)), chat, services)
    )
    await asyncio.sleep(0.1)  # the reference is still downloading
    await services.close(grace=5)
    await dispatching
    assert "restarting" in chat.last_text()
    assert mock_upstream.requests == []
    services = await Services.create(settings_factory())
    try:
        job = await services.store.job(1)
        assert job is not None and (job.status, job.error_kind) == ("failed", "shutdown")
        assert job.ledger_state in (None, "refunded")
        assert await left(services) == 5
    finally:
        await services.close()


async def test_own_key_users_are_warned_their_key_may_be_billed_after_a_timeout(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(timeout=0.5))
    try:
        await run(services, inv("token", OWN_KEY))
        chat = await run(services, inv("draw", "slow fox [fail:timeout]"))
        assert "may still have been billed" in chat.last_text()
        chat = await run(services, inv("draw", "a fox [fail:moderation]"))
        assert "billed" not in chat.last_text()  # an error answer is never billed
    finally:
        await services.close()


async def test_grant_refuses_absurd_amounts_with_its_usage(services: Services) -> None:
    admin = await services.store.user("test", "boss")
    await services.store.set_role(admin.id, "admin")
    await run(services, inv("quota"))
    for amount in ("99999999999999999999999", "ten"):
        chat = await run(services, inv("grant", f"u1 {amount}", user_id="boss"))
        assert "Usage: /grant" in chat.last_text()
    assert await left(services) == 5


async def test_without_a_shared_key_users_are_told_to_bind_their_own(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(api_key=""))
    try:
        chat = await run(services, inv("draw", "a fox"))
        assert "No API key is configured" in chat.last_text()
        assert mock_upstream.requests == []
        await run(services, inv("token", OWN_KEY))
        chat = await run(services, inv("draw", "a fox"))
        assert chat.results()
        assert mock_upstream.requests[-1].authorization == f"Bearer {OWN_KEY}"
    finally:
        await services.close()


async def test_more_references_than_the_provider_takes_cost_nothing(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    providers = [{"name": "b64-group", "max_references": 2}]
    services = await Services.create(settings_factory(providers_json=providers))
    try:
        refs = tuple(BytesImage(png(color=c), c) for c in ("red", "green", "blue"))
        chat = await run(services, inv("edit", "merge them", references=refs))
        assert "You sent 3 images; this provider takes at most 2" in chat.last_text()
        assert mock_upstream.requests == []
        assert await left(services) == 5
    finally:
        await services.close()
