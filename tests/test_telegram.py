"""The Telegram adapter end to end: real aiogram long-polling the fake Bot API server,
real services and jobs, the mock upstream drawing real PNGs."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from adapters.telegram import FloodPolicy, TelegramPlatform, create_platform
from adapters.telegram.chat import TelegramChat
from bot.chat import OutFile, ResultMeta
from bot.config import Settings
from bot.i18n import t
from bot.mock_upstream import MockUpstream
from bot.startup import StartupError
from tests.fake_telegram import ApiCall, FakeTelegram, make_noisy_png, make_png

# No pacing in tests, except where a test is about pacing.
FAST = FloodPolicy(chat_interval=0.0, group_limit=10_000, global_interval=0.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
def tg_settings(fake: FakeTelegram, settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(
        telegram_bot_token=fake.token, telegram_api_server=fake.base_url, shutdown_grace=2.0
    )


@pytest.fixture
async def platform(tg_settings: Settings, services: Any) -> AsyncIterator[TelegramPlatform]:
    tg = TelegramPlatform(tg_settings, services, flood=FAST, album_wait=0.3, polling_timeout=5)
    await tg.start()
    try:
        yield tg
    finally:
        await tg.stop()


def with_buttons(chat_id: int) -> Callable[[ApiCall], bool]:
    def check(call: ApiCall) -> bool:
        return call.fields.get("chat_id") == str(chat_id) and "reply_markup" in call.fields

    return check


def buttons(call: ApiCall) -> dict[str, str]:
    """callback_data by action ("reroll", "edit", "orig") of a result's inline keyboard."""
    rows = call.json("reply_markup")["inline_keyboard"]
    return {b["callback_data"].split(":")[1]: b["callback_data"] for row in rows for b in row}


def job_of(call: ApiCall) -> int:
    return int(buttons(call)["reroll"].rsplit(":", 1)[1])


def result_message(fake: FakeTelegram, chat_id: int) -> dict[str, Any]:
    return [m for m in fake.bot_messages(chat_id) if "reply_markup" in m][-1]


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def texts_sent(fake: FakeTelegram, chat_id: int) -> list[str]:
    found = []
    for call in fake.calls:
        if call.status == 200 and call.fields.get("chat_id") == str(chat_id):
            if call.method in ("sendMessage", "editMessageText"):
                found.append(call.fields["text"])
    return found


# --- commands ---


async def test_draw_in_private_chat_sends_status_preview_and_photo_with_buttons(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream, services: Any
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    command = fake.send_message(chat, alice, "/draw a red fox in the snow --size 1536x1024")

    photo = await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))

    assert "a red fox" in photo.fields["caption"]
    image = photo.attachment(photo.fields["photo"])
    assert size_of(image.data) == (1536, 1024)
    assert photo.json("reply_parameters")["message_id"] == command["message_id"]
    assert set(buttons(photo)) == {"reroll", "edit", "orig"}
    assert [r.path for r in mock_upstream.requests] == ["/v1/images/generations"]
    # One status message, edited while the job ran, then removed.
    status = fake.ok_calls("sendMessage")[0]
    assert "job" in status.fields["text"].lower()
    await fake.wait_call("deleteMessage")
    # A partial preview went out as a photo first, and is gone once the result is there.
    previews = [c for c in fake.ok_calls("sendPhoto") if "reply_markup" not in c.fields]
    assert previews, "the streamed partial image should be shown"
    assert fake.ok_calls("sendChatAction")[0].fields["action"] == "upload_photo"
    await fake.wait_for(lambda: len(fake.ok_calls("deleteMessage")) >= 2, what="preview deleted")
    remaining = fake.bot_messages(chat["id"])
    assert [m for m in remaining if "photo" in m] == [result_message(fake, chat["id"])]
    # The result message maps back to its job, for replies and buttons.
    message_id = result_message(fake, chat["id"])["message_id"]
    job = await services.job_for_message("telegram", str(chat["id"]), str(message_id))
    assert job == job_of(photo)


async def test_commands_for_another_bot_are_ignored_and_own_mention_works_in_groups(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    group = fake.group_chat()
    fake.send_message(group, alice, "/draw@some_other_bot a cat")
    fake.send_message(group, alice, f"/draw@{fake.username} a dog")

    photo = await fake.wait_call("sendPhoto", where=with_buttons(group["id"]))

    assert "a dog" in photo.fields["caption"]
    assert len(mock_upstream.requests) == 1
    assert "a dog" in mock_upstream.requests[0].fields["prompt"]


async def test_edit_replying_to_a_photo_sends_its_largest_size(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    original = fake.send_message(chat, alice, photo=make_png(800, 600))
    fake.send_message(chat, alice, "/edit make it blue", reply_to=original)

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))

    (request,) = mock_upstream.requests
    assert request.path == "/v1/images/edits"
    assert request.fields["prompt"].startswith("make it blue")
    assert [(f.width, f.height) for f in request.files] == [(800, 600)]


async def test_edit_on_an_album_uses_every_photo_once(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    group = fake.group_chat()
    sizes = [(640, 480), (512, 512), (480, 640)]
    fake.send_message(group, alice, photo=make_png(*sizes[0]), media_group_id="ALB1")
    fake.send_message(
        group,
        alice,
        caption="/edit put them together",
        photo=make_png(*sizes[1]),
        media_group_id="ALB1",
    )
    fake.send_message(group, alice, photo=make_png(*sizes[2]), media_group_id="ALB1")

    await fake.wait_call("sendPhoto", where=with_buttons(group["id"]))
    await asyncio.sleep(0.4)  # longer than album_wait: a second job would have started

    assert len(mock_upstream.requests) == 1
    (request,) = mock_upstream.requests
    assert request.path == "/v1/images/edits"
    assert sorted((f.width, f.height) for f in request.files) == sorted(sizes)


async def test_two_results_arrive_as_an_album_with_buttons_underneath(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream, services: Any
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(chat, alice, "/draw two cats --n 2")

    album = await fake.wait_call("sendMediaGroup")
    under = await fake.wait_call("sendMessage", where=with_buttons(chat["id"]))
    await fake.wait_call("deleteMessage")  # the status line: the job is finished

    media = album.json("media")
    assert [m["type"] for m in media] == ["photo", "photo"]
    assert "two cats" in media[0]["caption"]
    first = min(m["message_id"] for m in fake.bot_messages(chat["id"]) if "media_group_id" in m)
    assert under.json("reply_parameters")["message_id"] == first
    job = job_of(under)
    for message in fake.bot_messages(chat["id"]):
        if "media_group_id" in message:
            found = await services.job_for_message(
                "telegram", str(chat["id"]), str(message["message_id"])
            )
            assert found == job


async def test_upstream_error_becomes_the_translated_message(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(chat, alice, "/draw a fox [fail:moderation]")
    expected = t("en", "error.moderation")

    await fake.wait_for(lambda: expected in texts_sent(fake, chat["id"]), what="error message")

    assert not fake.calls_of("sendPhoto") or all(
        "reply_markup" not in c.fields for c in fake.calls_of("sendPhoto")
    )


async def test_file_over_20_mb_gets_a_clear_message_without_download(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(
        chat,
        alice,
        caption="/edit sharpen",
        document=make_png(64, 64),
        document_name="huge.png",
        document_size=25 * 1024 * 1024,
    )
    expected = t("en", "error.image_too_large", size_mb=25.0, limit_mb=20)

    await fake.wait_for(lambda: expected in texts_sent(fake, chat["id"]), what="too large")

    assert mock_upstream.requests == []
    assert fake.calls_of("getFile") == []


async def test_image_document_in_the_message_is_a_reference(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(
        chat, alice, caption="/edit add a hat", document=make_png(700, 500), document_name="me.png"
    )

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))

    assert [(f.width, f.height) for f in mock_upstream.requests[0].files] == [(700, 500)]
    assert fake.ok_calls("getFile")


async def test_local_bot_api_server_files_are_read_from_its_disk(
    settings_factory: Callable[..., Settings],
    services: Any,
    mock_upstream: MockUpstream,
    tmp_path: Path,
) -> None:
    async with FakeTelegram(local_dir=tmp_path / "tg-server") as local:
        settings = settings_factory(
            telegram_bot_token=local.token,
            telegram_api_server=local.base_url,
            telegram_api_local=True,
        )
        tg = TelegramPlatform(settings, services, flood=FAST, polling_timeout=5)
        await tg.start()
        try:
            alice = local.user(1001)
            chat = local.private_chat(alice)
            local.send_message(chat, alice, caption="/edit add stars", photo=make_png(600, 400))
            await local.wait_call("sendPhoto", where=with_buttons(chat["id"]))
        finally:
            await tg.stop()
        assert local.ok_calls("getFile")
        assert local.downloads == []
        assert [(f.width, f.height) for f in mock_upstream.requests[0].files] == [(600, 400)]


async def test_help_and_start_are_answered(platform: TelegramPlatform, fake: FakeTelegram) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(chat, alice, "/start")

    answer = await fake.wait_call("sendMessage")

    assert "/draw" in answer.fields["text"]


# --- flood control ---


async def test_429_on_sending_the_photo_is_retried_after_retry_after(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options.stream = False  # no preview photo: the first sendPhoto is the result
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.fail_next("sendPhoto", error_code=429, retry_after=1)
    fake.send_message(chat, alice, "/draw a lighthouse")

    photo = await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))

    refused, delivered = fake.calls_of("sendPhoto")
    assert refused.status == 429
    assert delivered is photo
    assert delivered.at - refused.at >= 1.0
    await fake.wait_call("deleteMessage")  # the status line
    assert len(fake.bot_messages(chat["id"])) == 1  # one photo, not two


async def test_429_on_a_status_message_is_retried(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.fail_next("sendMessage", error_code=429, retry_after=1)
    fake.send_message(chat, alice, "/quota")

    answer = await fake.wait_call("sendMessage")

    refused = fake.calls_of("sendMessage")[0]
    assert refused.status == 429
    assert answer.at - refused.at >= 1.0


async def test_pacer_spaces_messages_in_one_chat(
    fake: FakeTelegram, settings_factory: Callable[..., Settings], services: Any
) -> None:
    settings = settings_factory(telegram_bot_token=fake.token, telegram_api_server=fake.base_url)
    paced = FloodPolicy(
        chat_interval=0.2, chat_burst=1, group_limit=3, group_window=0.8, global_interval=0.0
    )
    tg = TelegramPlatform(settings, services, flood=paced, polling_timeout=5)
    await tg.start()
    try:
        private = TelegramChat(tg.link, 1001, user_id="1001", locale="en")
        group = TelegramChat(tg.link, -100777, user_id="1001", locale="en")
        await asyncio.gather(*(private.send_text(f"p{i}") for i in range(3)))
        await asyncio.gather(*(group.send_text(f"g{i}") for i in range(4)))
    finally:
        await tg.stop()
    sent = fake.ok_calls("sendMessage")
    private_times = [c.at for c in sent if c.fields["chat_id"] == "1001"]
    group_times = [c.at for c in sent if c.fields["chat_id"] == "-100777"]
    assert len(private_times) == 3 and len(group_times) == 4
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(private_times))
    # The 4th group message waits for the 0.8 s window, not just the 0.2 s interval.
    assert group_times[3] - group_times[0] >= 0.79


# --- /token ---


async def test_token_in_a_group_is_deleted_not_bound_and_never_logged(
    platform: TelegramPlatform,
    fake: FakeTelegram,
    services: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = "sk-live-groupleak-0123456789abcdef"
    alice = fake.user(1001, first_name="Alice")
    group = fake.group_chat()
    posted = fake.send_message(group, alice, f"/token {key}")

    answer = await fake.wait_call("sendMessage")

    deleted = fake.ok_calls("deleteMessage")
    assert [int(c.fields["message_id"]) for c in deleted] == [posted["message_id"]]
    assert answer.fields["text"] == t("en", "token.group_deleted", user="Alice")
    assert key not in answer.fields["text"]
    user = await services.store.user("telegram", "1001")
    assert await services.store.get_api_key(user.id) is None
    assert key not in caplog.text


async def test_token_in_a_group_without_delete_rights_says_so(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    alice = fake.user(1001, first_name="Alice")
    group = fake.group_chat()
    fake.can_delete[group["id"]] = False
    fake.send_message(group, alice, "/token sk-live-groupleak-0123456789abcdef")

    answer = await fake.wait_call("sendMessage")

    assert answer.fields["text"] == t("en", "token.group_not_deleted", user="Alice")


async def test_token_in_private_binds_the_key_and_never_logs_it(
    platform: TelegramPlatform,
    fake: FakeTelegram,
    services: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = "sk-private-0123456789abcdefgh"
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(chat, alice, f"/token {key}")

    answer = await fake.wait_call("sendMessage")

    assert key not in answer.fields["text"]
    user = await services.store.user("telegram", "1001")
    assert await services.store.get_api_key(user.id) == key
    assert key not in caplog.text


# --- buttons ---


async def _draw(
    platform: TelegramPlatform, fake: FakeTelegram, chat: dict[str, Any], user: dict[str, Any]
) -> ApiCall:
    fake.send_message(chat, user, "/draw a tiny robot")
    photo = await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))
    # The runner keeps the result files after delivering them: wait for the whole job, or a
    # reply to the result can come before the originals are kept.
    await platform.services.jobs.wait_idle()
    return photo


async def test_reroll_button_draws_the_prompt_again(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    first = await _draw(platform, fake, chat, alice)

    query = fake.press_button(
        chat, alice, result_message(fake, chat["id"]), buttons(first)["reroll"]
    )

    second = await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]), count=2)
    assert fake.ok_calls("answerCallbackQuery")[0].fields["callback_query_id"] == query
    assert job_of(second) != job_of(first)
    prompts = [r.fields["prompt"] for r in mock_upstream.requests]
    assert len(prompts) == 2 and prompts[0] == prompts[1]


async def test_edit_button_asks_for_a_reply_that_becomes_an_edit(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    first = await _draw(platform, fake, chat, alice)
    fake.press_button(chat, alice, result_message(fake, chat["id"]), buttons(first)["edit"])

    prompt_call = await fake.wait_call(
        "sendMessage", where=lambda c: "force_reply" in c.fields.get("reply_markup", "")
    )
    assert prompt_call.fields["text"] == t("en", "edit.hint")
    prompt = [m for m in fake.bot_messages(chat["id"]) if m.get("text") == t("en", "edit.hint")][-1]
    fake.send_message(chat, alice, "make it night time", reply_to=prompt)

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]), count=2)
    edit = mock_upstream.requests[-1]
    assert edit.path == "/v1/images/edits"
    assert edit.fields["prompt"].startswith("make it night time")
    assert [(f.width, f.height) for f in edit.files] == [(1024, 1024)]


async def test_original_button_sends_the_untouched_file(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    first = await _draw(platform, fake, chat, alice)
    fake.press_button(chat, alice, result_message(fake, chat["id"]), buttons(first)["orig"])

    document = await fake.wait_call("sendDocument")

    sent = document.attachment(document.fields["document"]).data
    assert sent == first.attachment(first.fields["photo"]).data
    assert document.fields["disable_content_type_detection"] == "true"


async def test_reply_with_edit_to_a_result_edits_that_result(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    await _draw(platform, fake, chat, alice)
    fake.send_message(chat, alice, "/edit add a hat", reply_to=result_message(fake, chat["id"]))

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]), count=2)

    edit = mock_upstream.requests[-1]
    assert edit.path == "/v1/images/edits"
    assert [(f.width, f.height) for f in edit.files] == [(1024, 1024)]


# --- delivery through the Chat port ---


async def test_result_too_big_for_a_photo_goes_as_preview_and_original_document(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    heavy = make_noisy_png(2000, 1800)  # about 10.8 MB: over the 10 MB photo limit
    assert len(heavy) > 10 * 1024 * 1024

    await chat.send_results(
        [OutFile(heavy, "big.png", "image/png", 2000, 1800)], ResultMeta(7, "cap")
    )

    (photo,) = fake.ok_calls("sendPhoto")
    (document,) = fake.ok_calls("sendDocument")
    preview = photo.attachment(photo.fields["photo"]).data
    assert preview[:2] == b"\xff\xd8" and len(preview) <= 5 * 1024 * 1024
    assert photo.fields["caption"] == "cap" and "reply_markup" in photo.fields
    assert document.attachment(document.fields["document"]).data == heavy
    assert fake.calls_of("sendPhoto")[0].status == 200  # decided before uploading


async def test_result_too_wide_for_a_photo_goes_as_preview_and_original_document(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    wide = make_png(9000, 1200)  # small in bytes, but width + height > 10000

    await chat.send_results([OutFile(wide, "wide.png", "image/png")], ResultMeta(8, "cap"))

    (photo,) = fake.ok_calls("sendPhoto")
    width, height = size_of(photo.attachment(photo.fields["photo"]).data)
    assert width + height <= 10000
    (document,) = fake.ok_calls("sendDocument")
    assert document.attachment(document.fields["document"]).data == wide


async def test_photo_refused_by_telegram_falls_back_to_a_document(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    fake.fail_next("sendPhoto", error_code=400, description="Bad Request: IMAGE_PROCESS_FAILED")
    image = make_png(1024, 1024)

    await chat.send_results([OutFile(image, "r.png", "image/png")], ResultMeta(9, "cap"))

    assert len(fake.ok_calls("sendPhoto")) == 1  # the preview
    assert (
        fake.ok_calls("sendDocument")[0]
        .attachment(fake.ok_calls("sendDocument")[0].fields["document"])
        .data
        == image
    )


async def test_originals_of_several_results_go_as_one_document_album(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    files = [OutFile(make_png(300 + i, 200), f"r{i}.png", "image/png") for i in range(3)]

    await chat.send_results(files, ResultMeta(5, originals=True, actions=False))

    (album,) = fake.ok_calls("sendMediaGroup")
    media = album.json("media")
    assert [m["type"] for m in media] == ["document"] * 3
    assert [album.attachment(m["media"]).data for m in media] == [f.data for f in files]
    assert fake.ok_calls("sendPhoto") == [] and fake.ok_calls("sendMessage") == []


async def test_partial_previews_edit_one_photo_then_make_way_for_the_result(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    first = make_png(64, 64, (10, 10, 10))
    second = make_png(64, 64, (200, 10, 10))

    ref = await chat.send_preview(None, first)
    again = await chat.send_preview(ref, second)
    await chat.send_results([OutFile(make_png(), "r.png", "image/png")], ResultMeta(3, "c"))

    assert ref is not None and again == ref
    (edit,) = fake.ok_calls("editMessageMedia")
    assert edit.fields["message_id"] == ref.id
    assert edit.attachment(edit.json("media")["media"]).data == second
    deleted = [c.fields["message_id"] for c in fake.ok_calls("deleteMessage")]
    assert deleted == [ref.id]


async def test_delivery_failure_raises_delivery_error(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    from bot.errors import DeliveryError

    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    fake.fail_next(
        "sendPhoto", error_code=403, description="Forbidden: bot was blocked by the user"
    )

    with pytest.raises(DeliveryError):
        await chat.send_results([OutFile(make_png(), "r.png", "image/png")], ResultMeta(4, "c"))


# --- start-up ---


async def test_start_registers_the_command_menu_in_both_languages(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    assert set(fake.commands) == {"en", "zh", ""}
    for code, lang in (("en", "en"), ("zh", "zh"), ("", "en")):
        menu = {c["command"]: c["description"] for c in fake.commands[code]}
        assert menu["draw"] == t(lang, "help.draw")
        assert "edit" in menu and "grant" not in menu and "reroll" not in menu


async def test_start_fails_clearly_on_a_rejected_token(
    fake: FakeTelegram, settings_factory: Callable[..., Settings], services: Any
) -> None:
    wrong = "987654321:AAWrongTokenWrongTokenWrongToken12345"
    settings = settings_factory(telegram_bot_token=wrong, telegram_api_server=fake.base_url)
    tg = create_platform(settings, services)

    with pytest.raises(StartupError, match="TELEGRAM_BOT_TOKEN") as info:
        await tg.start()

    assert info.value.exit_code == 2
    assert wrong not in str(info.value)
    await tg.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_webhook_mode_sets_the_hook_checks_the_secret_and_removes_it_on_stop(
    fake: FakeTelegram,
    settings_factory: Callable[..., Settings],
    services: Any,
    mock_upstream: MockUpstream,
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/tg/hook"
    settings = settings_factory(
        telegram_bot_token=fake.token,
        telegram_api_server=fake.base_url,
        telegram_webhook_url=url,
        telegram_webhook_host="127.0.0.1",
        telegram_webhook_port=port,
        telegram_webhook_secret="s3cret-Hook_value",
    )
    tg = TelegramPlatform(settings, services, flood=FAST)
    await tg.start()
    try:
        assert fake.webhook == {"url": url, "secret_token": "s3cret-Hook_value"}
        async with aiohttp.ClientSession() as session:
            forged = {"update_id": 999, "message": {}}
            headers = {"X-Telegram-Bot-Api-Secret-Token": "wrong"}
            async with session.post(url, json=forged, headers=headers) as resp:
                assert resp.status == 401
        alice = fake.user(1001)
        chat = fake.private_chat(alice)
        fake.send_message(chat, alice, "/draw a castle")
        photo = await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))
        assert "a castle" in photo.fields["caption"]
        assert fake.webhook_deliveries[0] == 200
        assert fake.calls_of("getUpdates") == []
    finally:
        await tg.stop()
    assert fake.ok_calls("deleteWebhook")
    assert fake.webhook is None


async def test_admin_grant_in_reply_to_someone_names_them(
    platform: TelegramPlatform, fake: FakeTelegram, services: Any
) -> None:
    boss = fake.user(1001, first_name="Boss")
    bob = fake.user(2002, first_name="Bob")
    group = fake.group_chat()
    admin = await services.store.user("telegram", "1001")
    await services.store.set_role(admin.id, "admin")
    await services.store.user("telegram", "2002", "Bob")
    hello = fake.send_message(group, bob, "hi all")
    fake.send_message(group, boss, "/grant 7", reply_to=hello)

    answer = await fake.wait_call("sendMessage")

    assert "telegram:2002" in answer.fields["text"] and "balance is 7" in answer.fields["text"]


# --- a server that answers a little differently ---


async def test_429_with_retry_after_only_in_the_description_is_retried(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    # No `parameters` object: aiogram raises a plain TelegramAPIError for this 429.
    fake.fail_next("sendMessage", error_code=429, description="Too Many Requests: retry after 1")
    fake.send_message(chat, alice, "/quota")

    answer = await fake.wait_call("sendMessage")

    refused = fake.calls_of("sendMessage")[0]
    assert refused.status == 429
    assert answer.at - refused.at >= 1.0


async def test_reply_to_the_edit_prompt_works_when_the_server_leaves_out_from(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    first = await _draw(platform, fake, chat, alice)
    fake.press_button(chat, alice, result_message(fake, chat["id"]), buttons(first)["edit"])
    await fake.wait_call(
        "sendMessage", where=lambda c: "force_reply" in c.fields.get("reply_markup", "")
    )
    prompt = [m for m in fake.bot_messages(chat["id"]) if m.get("text") == t("en", "edit.hint")][-1]
    # `from` is optional in the Bot API's Message: a reply may quote the prompt without it.
    quoted = {k: v for k, v in prompt.items() if k != "from"}
    fake.send_message(chat, alice, "make it night time", reply_to=quoted)

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]), count=2)
    edit = mock_upstream.requests[-1]
    assert edit.path == "/v1/images/edits"
    assert edit.fields["prompt"].startswith("make it night time")


async def test_edit_replying_to_one_photo_of_an_album_uses_the_whole_album(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    sizes = [(640, 480), (512, 512), (480, 640)]
    parts = [fake.send_message(chat, alice, photo=make_png(*s), media_group_id="A7") for s in sizes]
    await asyncio.sleep(0.5)  # the album has arrived (album_wait is 0.3 s)
    fake.send_message(chat, alice, "/edit one picture of all three", reply_to=parts[1])

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]))

    (request,) = mock_upstream.requests
    assert sorted((f.width, f.height) for f in request.files) == sorted(sizes)


async def test_edit_replying_to_a_result_uses_the_kept_original_not_getfile(
    platform: TelegramPlatform, fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    await _draw(platform, fake, chat, alice)
    fake.send_message(chat, alice, "/edit add a hat", reply_to=result_message(fake, chat["id"]))

    await fake.wait_call("sendPhoto", where=with_buttons(chat["id"]), count=2)

    # The chat holds Telegram's recompressed copy; the original is kept by the bot.
    assert fake.calls_of("getFile") == []
    edit = mock_upstream.requests[-1]
    assert edit.path == "/v1/images/edits"
    assert [(f.width, f.height) for f in edit.files] == [(1024, 1024)]


async def test_album_refused_by_the_server_is_sent_photo_by_photo(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    chat = TelegramChat(platform.link, 1001, user_id="1001", locale="en")
    fake.fail_next("sendMediaGroup", error_code=404, description="Not Found: method not found")
    files = [OutFile(make_png(300 + i, 200), f"r{i}.png", "image/png") for i in range(2)]

    await chat.send_results(files, ResultMeta(11, "two results"))

    photos = fake.ok_calls("sendPhoto")
    assert [p.attachment(p.fields["photo"]).data for p in photos] == [f.data for f in files]
    assert photos[0].fields["caption"] == "two results"
    (under,) = [c for c in fake.ok_calls("sendMessage") if "reply_markup" in c.fields]
    assert job_of(under) == 11


async def test_bot_id_comes_from_getme_not_the_token(
    settings_factory: Callable[..., Settings], services: Any
) -> None:
    async with FakeTelegram(bot_user_id=555000111) as other:
        settings = settings_factory(
            telegram_bot_token=other.token, telegram_api_server=other.base_url
        )
        tg = TelegramPlatform(settings, services, flood=FAST, polling_timeout=5)
        await tg.start()
        try:
            boss = other.user(1001, first_name="Boss")
            group = other.group_chat()
            admin = await services.store.user("telegram", "1001")
            await services.store.set_role(admin.id, "admin")
            other.send_message(group, boss, "/quota")
            await other.wait_call("sendMessage")
            from_bot = other.bot_messages(group["id"])[-1]
            # "/grant 7" replying to the bot itself must not name the bot as the target.
            other.send_message(group, boss, "/grant 7", reply_to=from_bot)
            answer = await other.wait_call("sendMessage", count=2)
        finally:
            await tg.stop()
        assert tg.bot_id == 555000111
        assert "telegram:555000111" not in answer.fields["text"]


async def test_button_under_an_old_inaccessible_result_still_works(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    first = await _draw(platform, fake, chat, alice)
    shown = result_message(fake, chat["id"])
    # Telegram sends only chat, id and date 0 for a message older than 48 hours.
    old = {"chat": shown["chat"], "message_id": shown["message_id"], "date": 0}
    fake.press_button(chat, alice, old, buttons(first)["orig"])

    document = await fake.wait_call("sendDocument")

    sent = document.attachment(document.fields["document"]).data
    assert sent == first.attachment(first.fields["photo"]).data


async def test_notify_posts_a_message_in_the_chat(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    group = fake.group_chat()
    await platform.notify(str(group["id"]), "job 7 was interrupted and refunded")
    call = await fake.wait_call("sendMessage")
    assert call.fields["chat_id"] == str(group["id"])
    assert call.fields["text"] == "job 7 was interrupted and refunded"
