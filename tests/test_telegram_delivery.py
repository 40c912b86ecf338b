"""Results first on Telegram (issue 10, items 9 and 10), over the fake Bot API server.

A result never queues behind a status edit or a partial preview of the same chat: those
wait for spare slots and give way (or are dropped) once the result is in hand. And one
chat's flood wait (a 429's `retry_after`) never holds up another chat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from adapters.telegram import FloodPolicy, TelegramPlatform
from adapters.telegram.chat import TelegramChat
from adapters.telegram.flood import Pacer
from bot.chat import OutFile, ResultMeta
from bot.config import Settings
from bot.errors import DeliveryError
from bot.mock_upstream import MockUpstream
from tests.fake_telegram import ApiCall, FakeTelegram, make_png

FAST = FloodPolicy(chat_interval=0.0, group_limit=10_000, global_interval=0.0)
# A chat that gets 3 messages at once and then one every 30 s: the third is kept for results.
SLOW = FloodPolicy(
    chat_interval=30.0, chat_burst=3, reserve=1, group_limit=10_000, global_interval=0.0
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
async def start_platform(
    fake: FakeTelegram, settings_factory: Callable[..., Settings], services: Any
) -> AsyncIterator[Callable[[FloodPolicy], Awaitable[TelegramPlatform]]]:
    """Start the Telegram platform with a flood policy; stopped before `services` closes."""
    started: list[TelegramPlatform] = []

    async def start(policy: FloodPolicy) -> TelegramPlatform:
        settings = settings_factory(
            telegram_bot_token=fake.token, telegram_api_server=fake.base_url
        )
        tg = TelegramPlatform(settings, services, flood=policy, polling_timeout=5)
        await tg.start()
        started.append(tg)
        return tg

    try:
        yield start
    finally:
        for tg in started:
            await tg.stop()


def in_chat(chat_id: int) -> Callable[[ApiCall], bool]:
    return lambda call: call.fields.get("chat_id") == str(chat_id)


def is_result(call: ApiCall) -> bool:
    return call.method == "sendPhoto" and "reply_markup" in call.fields


def chat_calls(fake: FakeTelegram, chat_id: int) -> list[ApiCall]:
    return [c for c in fake.calls if c.fields.get("chat_id") == str(chat_id)]


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until `predicate()` holds (a hang guard, not a speed check)."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def result_file() -> OutFile:
    return OutFile(make_png(64, 64, (0, 90, 200)), "r.png", "image/png", 64, 64)


# --- item 10: the result goes first ---


async def test_streamed_result_goes_before_the_preview_and_status_edit_still_waiting(
    start_platform: Any, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    # The chat's burst is spent on the status line and one preview; what is left is kept
    # for the result, so the "uploading" edit (and any later preview) must wait 30 s.
    await start_platform(SLOW)
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(chat, alice, "/draw a heron at dawn")

    result = await fake.wait_call("sendPhoto", where=is_result)
    # The status line and the preview are removed once the result is in.
    await fake.wait_for(lambda: len(fake.ok_calls("deleteMessage")) >= 2, what="clean-up")

    calls = chat_calls(fake, chat["id"])
    before = calls[: calls.index(result)]
    after = calls[calls.index(result) + 1 :]
    assert [c.method for c in before if c.method != "sendChatAction"] == [
        "sendMessage",  # the status line
        "sendPhoto",  # the partial preview
    ], "a streamed job with a preview shown before its result"
    # Nothing that was waiting when the result arrived came out after it.
    assert [c.method for c in after if c.method not in ("deleteMessage", "sendChatAction")] == []
    assert not fake.calls_of("editMessageText")
    assert not fake.calls_of("editMessageMedia")


async def test_result_goes_first_and_drops_the_waiting_edit_and_preview(
    start_platform: Any, fake: FakeTelegram
) -> None:
    policy = FloodPolicy(chat_interval=30.0, chat_burst=2, reserve=1, global_interval=0.0)
    tg = await start_platform(policy)
    chat = TelegramChat(tg.link, 1001, user_id="1001", locale="en")

    status = await chat.send_text("job #1: drawing")  # the burst's spare message
    assert status is not None
    await chat.edit_text(status, "job #1: drawing 0:10")  # waits: only the reserve is left
    preview = await chat.send_preview(None, make_png(32, 32, (9, 9, 9)))
    await chat.send_results([result_file()], ResultMeta(1, "a heron"))
    await chat.delete(status)
    await until(lambda: not tg.link.background.tasks, "the waiting edit gave up")

    assert preview is None  # no spare slot: dropped, not queued in front of the result
    methods = [c.method for c in chat_calls(fake, 1001) if c.method != "sendChatAction"]
    assert methods == ["sendMessage", "sendPhoto", "deleteMessage"]
    assert is_result(fake.calls_of("sendPhoto")[0])


async def test_status_edit_waiting_out_a_429_sends_only_the_newest_text(
    start_platform: Any, fake: FakeTelegram
) -> None:
    tg = await start_platform(FAST)
    chat = TelegramChat(tg.link, 1001, user_id="1001", locale="en")
    status = await chat.send_text("queued #3")
    assert status is not None
    fake.fail_next("editMessageText", error_code=429, retry_after=1)

    await chat.edit_text(status, "queued #2")
    await fake.wait_call("editMessageText", ok=False)
    await chat.edit_text(status, "queued #1")
    await chat.edit_text(status, "drawing 0:00")
    await fake.wait_call("editMessageText")
    await until(lambda: not tg.link.background.tasks, "the edit queue is empty")

    texts = [(c.status, c.fields["text"]) for c in fake.calls_of("editMessageText")]
    assert texts == [(429, "queued #2"), (200, "drawing 0:00")]


async def test_edits_are_never_awaited_by_the_caller_while_the_chat_is_busy(
    start_platform: Any, fake: FakeTelegram
) -> None:
    # The job runner awaits its "uploading" edit right before sending the result.
    tg = await start_platform(FloodPolicy(chat_interval=30.0, chat_burst=1, global_interval=0.0))
    chat = TelegramChat(tg.link, 1001, user_id="1001", locale="en")
    status = await chat.send_text("drawing")
    assert status is not None

    await chat.edit_text(status, "uploading")  # returns although no slot is free for 30 s

    assert len(tg.link.background.tasks) == 1
    await chat.delete(status)
    await until(lambda: not tg.link.background.tasks, "the edit of a deleted message gave up")
    assert not fake.calls_of("editMessageText")


# --- item 9: one chat's flood wait is its own ---


async def test_flood_wait_in_one_chat_does_not_hold_up_another_chats_result(
    start_platform: Any, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.stream = False  # no previews: each chat's sendPhoto is its result
    await start_platform(FAST)
    alice, bob = fake.user(1001, "Alice"), fake.user(1002, "Bob")
    busy = fake.group_chat(-100555, "Busy group")
    quiet = fake.private_chat(bob)
    fake.fail_next("sendPhoto", retry_after=60, chat_id=busy["id"])

    fake.send_message(busy, alice, "/draw a crowded market")
    await fake.wait_call("sendPhoto", ok=False, where=in_chat(busy["id"]))
    fake.send_message(quiet, bob, "/draw an empty beach")
    await fake.wait_call("sendPhoto", where=in_chat(quiet["id"]))

    # The busy group's result still sits out its 60 s; the quiet chat did not wait for it.
    assert not [c for c in fake.ok_calls("sendPhoto") if in_chat(busy["id"])(c)]


async def test_preview_refused_with_429_is_dropped_not_waited_for(
    start_platform: Any, fake: FakeTelegram
) -> None:
    # A preview is sent from inside the image's stream: waiting out a 429 there would hold
    # the upstream request (and its slot) for up to minutes.
    tg = await start_platform(FAST)
    chat = TelegramChat(tg.link, -100555, user_id="1001", locale="en")
    other = TelegramChat(tg.link, 1002, user_id="1002", locale="en")
    fake.fail_next("sendPhoto", retry_after=60, chat_id=-100555)

    sending = asyncio.create_task(chat.send_preview(None, make_png(32, 32, (1, 2, 3))))
    await fake.wait_call("sendPhoto", ok=False)
    done, _ = await asyncio.wait({sending}, timeout=5)

    assert done, "send_preview waited out the 429"
    assert sending.result() is None
    # The chat is held now (Telegram said so), other chats are not.
    await other.send_results([result_file()], ResultMeta(2, "elsewhere"))
    assert fake.ok_calls("sendPhoto")[0].fields["chat_id"] == "1002"


async def test_chat_held_by_a_429_leaves_the_global_budget_to_other_chats() -> None:
    pacer = Pacer(FloodPolicy(global_interval=1 / 30, global_burst=1, chat_interval=0.0))
    pacer.defer(-100555, 60)
    held = asyncio.create_task(pacer.wait(-100555))
    await asyncio.sleep(0)

    for chat_id in range(1, 6):
        await pacer.wait(chat_id)

    assert not held.done()
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


async def test_spare_slots_wait_while_a_result_waits_in_the_same_chat() -> None:
    pacer = Pacer(FloodPolicy(chat_interval=0.05, chat_burst=1, reserve=0, global_interval=0.0))
    order: list[str] = []
    await pacer.wait(7)  # the burst is spent: the next slot is 0.05 s away

    async def take(name: str, *, spare: bool) -> None:
        await pacer.wait(7, spare=spare)
        order.append(name)

    preview = asyncio.create_task(take("preview", spare=True))
    await asyncio.sleep(0)
    result = asyncio.create_task(take("result", spare=False))
    await asyncio.gather(preview, result)

    assert order == ["result", "preview"]


# --- results in the chat are delivered ---


async def test_album_in_the_chat_is_delivered_even_when_its_buttons_message_fails(
    start_platform: Any, fake: FakeTelegram
) -> None:
    # A DeliveryError here would refund the job and tell the user it failed, while both
    # images are in the chat.
    tg = await start_platform(FAST)
    chat = TelegramChat(tg.link, 1001, user_id="1001", locale="en")
    fake.fail_next("sendMessage", error_code=400)

    await chat.send_results([result_file(), result_file()], ResultMeta(5, "two herons"))

    album = await fake.wait_call("sendMediaGroup")
    assert len(album.json("media")) == 2
    assert fake.calls_of("sendMessage")[0].status == 400


async def test_results_failing_after_some_are_in_the_chat_report_how_many_were_delivered(
    start_platform: Any, fake: FakeTelegram
) -> None:
    tg = await start_platform(FAST)
    chat = TelegramChat(tg.link, 1001, user_id="1001", locale="en")
    # Eleven results: an album of ten, then the eleventh alone, which Telegram refuses.
    fake.fail_next("sendPhoto", error_code=403, description="Forbidden: bot was blocked")

    with pytest.raises(DeliveryError) as failed:
        await chat.send_results([result_file() for _ in range(11)], ResultMeta(6, "many"))

    assert len(fake.ok_calls("sendMediaGroup")[0].json("media")) == 10
    assert failed.value.params["delivered"] == 10


async def test_results_failing_before_any_is_in_the_chat_report_none_delivered(
    start_platform: Any, fake: FakeTelegram
) -> None:
    tg = await start_platform(FAST)
    chat = TelegramChat(tg.link, 1001, user_id="1001", locale="en")
    fake.fail_next("sendMediaGroup", error_code=403, description="Forbidden: bot was blocked")

    with pytest.raises(DeliveryError) as failed:
        await chat.send_results([result_file(), result_file()], ResultMeta(7, "two"))

    assert "delivered" not in failed.value.params
