"""The Discord adapter end to end: real discord.py against the fake Discord, real plugins and
job runner against the mock upstream. Nothing here talks to discord.com."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from PIL import Image

from adapters.discord import DiscordPlatform
from adapters.discord.chat import TOKEN_TTL, batches
from bot.config import Settings
from bot.mock_upstream import MockUpstream
from bot.services import Services
from bot.startup import StartupError
from plugins.registry import QUALITY_CHOICES, SIZE_CHOICES
from tests.bot_process import BotProcess, bot_env
from tests.fake_discord import (
    CB_DEFERRED_MESSAGE,
    CB_MESSAGE,
    CB_MODAL,
    FakeDiscord,
    FakeInteraction,
    FakeMessage,
)

OWN_KEY = "sk-discord-own-key-0123456789abcdef"


def png(width: int = 96, height: int = 64, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def has_results(message: FakeMessage) -> bool:
    """Whether a message carries result files (not just a partial preview)."""
    return any(name.startswith("drawbridge-") for name in message.filenames)


@dataclass
class Bot:
    fake: FakeDiscord
    services: Services
    platform: DiscordPlatform

    def t(self, key: str, **params: Any) -> str:
        return self.services.t("en", key, **params)

    async def job_of(self, message: FakeMessage) -> int | None:
        """The job the bot remembers for one of its messages."""
        channel = str(self.fake.channel_id)
        return await self.services.job_for_message("discord", channel, str(message.id))

    async def settle(self) -> None:
        await self.platform.intake.idle()
        await self.services.jobs.wait_idle()

    async def answer(
        self, interaction: FakeInteraction, check: Callable[[FakeMessage], bool] = lambda m: True
    ) -> FakeMessage:
        """The interaction's original response once it has content and `check` holds."""

        def find() -> FakeMessage | None:
            message = self.fake.messages.get(interaction.original_id or 0)
            if message is None or message.loading or not check(message):
                return None
            return message

        return await self.fake.wait_for(find)

    async def result(self, interaction: FakeInteraction) -> FakeMessage:
        """The message with the interaction's result files (wherever it was delivered)."""
        return await self.fake.wait_message(
            lambda m: m.interaction_id == interaction.id and has_results(m)
        )


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    try:
        yield fake
    finally:
        await fake.stop()
    assert fake.unhandled == [], "the bot called routes the fake does not know"


@pytest.fixture
async def start_bot(
    settings_factory: Callable[..., Settings], fake_discord: FakeDiscord
) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    started: list[tuple[DiscordPlatform, Services]] = []

    async def start(*, token_ttl: float = TOKEN_TTL, **overrides: Any) -> Bot:
        assert discord.http.Route.BASE.startswith("http://127.0.0.1:")
        settings = settings_factory(discord_bot_token=fake_discord.token, **overrides)
        services = await Services.create(settings)
        platform = DiscordPlatform(
            settings,
            services,
            cdn_hosts=("127.0.0.1",),
            token_ttl=token_ttl,
            ready_timeout=10.0,
            guild_ready_timeout=0.05,
        )
        started.append((platform, services))
        await platform.start()
        return Bot(fake_discord, services, platform)

    yield start
    for platform, services in reversed(started):
        await platform.stop()
        await services.close(grace=0)


@pytest.fixture
async def bot(start_bot: Callable[..., Awaitable[Bot]]) -> Bot:
    return await start_bot()


# --- connecting and the command declarations ----------------------------------------------


async def test_start_identifies_without_privileged_intents_and_syncs_every_menu_command(
    bot: Bot,
) -> None:
    fake = bot.fake
    identify = await fake.wait_identified()
    intents = discord.Intents._from_value(identify["intents"])
    assert intents.guilds
    assert not intents.message_content and not intents.members and not intents.presences
    assert ("GET", "/api/v10/users/@me") in fake.requests

    names = {c["name"] for c in fake.commands[None]}
    assert names == {
        "draw",
        "edit",
        "token",
        "quota",
        "help",
        "cancel",
        "lang",
        "whoami",
        "console",
        "confirm",
        "grant",
        "ban",
        "unban",
        "stats",
        "group",
        "link",
        "unlink",
        "Edit image",
    }
    draw = {o["name"]: o for o in fake.command("draw")["options"]}
    assert draw["prompt"]["type"] == 3 and draw["prompt"]["required"] is True
    assert [c["value"] for c in draw["size"]["choices"]] == list(SIZE_CHOICES)
    assert [c["value"] for c in draw["quality"]["choices"]] == list(QUALITY_CHOICES)
    assert draw["n"]["type"] == 4 and (draw["n"]["min_value"], draw["n"]["max_value"]) == (1, 10)
    assert draw["dry_run"]["type"] == 5 and not draw["dry_run"].get("required")  # a boolean
    assert fake.command("draw")["description_localizations"]["zh-CN"] == bot.services.t(
        "zh", "help.draw"
    )

    edit = {o["name"]: o for o in fake.command("edit")["options"]}
    images = ["image", "image2", "image3", "image4", "image5"]
    assert [edit[n]["type"] for n in images] == [11] * 5
    assert edit["image"]["required"] is True and edit["image5"]["required"] is False

    # The key is asked for in a modal, never as an option shown in the channel.
    assert fake.command("token").get("options", []) == []
    assert int(fake.command("grant")["default_member_permissions"]) == 8  # Administrator
    assert fake.command("Edit image", kind=3)["type"] == 3


async def test_wrong_token_fails_start_without_showing_the_token(
    settings_factory: Callable[..., Settings],
    services: Services,
    fake_discord: FakeDiscord,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-0123456789"
    platform = DiscordPlatform(settings_factory(discord_bot_token=wrong), services)
    with pytest.raises(StartupError, match="DISCORD_BOT_TOKEN") as failure:
        await platform.start()
    await platform.stop()

    assert failure.value.exit_code == 2
    assert wrong not in str(failure.value) and wrong not in caplog.text
    assert fake_discord.identifies == [] and fake_discord.commands == {}


async def test_guild_ids_get_the_commands_instead_of_a_global_sync(
    start_bot: Callable[..., Awaitable[Bot]], fake_discord: FakeDiscord
) -> None:
    await start_bot(discord_guild_ids=f"{fake_discord.guild_id}")
    assert None not in fake_discord.commands
    names = {c["name"] for c in fake_discord.commands[fake_discord.guild_id]}
    assert {"draw", "edit", "Edit image"} <= names


# --- /draw and /edit -------------------------------------------------------------------------


async def test_draw_defers_then_shows_progress_and_the_result_with_buttons_in_one_message(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    interaction = await bot.fake.slash("draw", prompt="a red fox in the snow", size="16:9")
    message = await bot.result(interaction)
    await bot.settle()

    assert interaction.callback_type == CB_DEFERRED_MESSAGE
    assert message.via == "original" and not message.ephemeral
    # Thinking first, then status text, then the result replacing it, in the same message.
    assert message.history[0] == ("", ())
    assert any("job" in content and not files for content, files in message.history[1:-1])
    assert message.content.startswith("a red fox in the snow")
    assert message.filenames == ["drawbridge-1-1.png"]
    width, height = image_size(message.attachments[0].data)
    assert width > height

    buttons = [b["custom_id"] for b in message.buttons()]
    assert buttons == ["db:reroll:1", "db:edit:1", "db:ref:1"]
    assert [r.fields.get("prompt") for r in mock_upstream.requests] == ["a red fox in the snow"]
    assert (
        await bot.services.job_for_message("discord", str(bot.fake.channel_id), str(message.id))
        == 1
    )


async def test_edit_sends_both_attachments_upstream(bot: Bot, mock_upstream: MockUpstream) -> None:
    first = bot.fake.add_file(png(80, 60, "red"), "cat.png")
    second = bot.fake.add_file(png(60, 80, "blue"), "hat.png")
    interaction = await bot.fake.slash(
        "edit", prompt="put the hat on the cat", image=first, image2=second
    )
    message = await bot.result(interaction)
    await bot.settle()

    request = mock_upstream.requests[-1]
    assert request.path.endswith("/images/edits")
    assert request.fields["prompt"] == "put the hat on the cat"
    assert sorted((f.width, f.height) for f in request.files) == [(60, 80), (80, 60)]
    assert message.filenames == ["drawbridge-1-1.png"]


async def test_edit_with_a_non_image_attachment_gets_a_clear_message(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    notes = bot.fake.add_file(b"just some text", "notes.txt", "text/plain")
    interaction = await bot.fake.slash("edit", prompt="make it pretty", image=notes)
    message = await bot.answer(interaction)
    await bot.settle()

    assert message.content == bot.t("error.unsupported_image")
    assert not message.attachments
    assert mock_upstream.requests == []
    assert not any(path.startswith("/cdn/") for _, path in bot.fake.requests)


async def test_attachment_over_the_byte_cap_is_refused_before_downloading(
    start_bot: Callable[..., Awaitable[Bot]], mock_upstream: MockUpstream
) -> None:
    bot = await start_bot(max_input_bytes=1024 * 1024)
    huge = bot.fake.add_file(png(), "huge.png", size=30 * 1024 * 1024)
    interaction = await bot.fake.slash("edit", prompt="sharpen", image=huge)
    message = await bot.answer(interaction)
    await bot.settle()

    assert message.content == bot.t("error.image_too_large", size_mb=30.0, limit_mb=1.0)
    assert mock_upstream.requests == []
    assert not any(path.startswith("/cdn/") for _, path in bot.fake.requests)


async def test_upstream_error_is_reported_in_the_original_response(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    interaction = await bot.fake.slash("draw", prompt="something [fail:moderation]")
    message = await bot.answer(interaction, lambda m: m.content == bot.t("error.moderation"))
    await bot.settle()

    assert not message.attachments and not message.buttons()
    assert len(mock_upstream.requests) == 1


async def test_result_over_the_upload_limit_goes_as_a_preview_with_a_note(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    limit = 40_000
    interaction = await bot.fake.slash(
        "draw", prompt="a detailed city at night", attachment_size_limit=limit
    )
    message = await bot.result(interaction)
    await bot.settle()

    # The real result is larger than the limit (else this test proves nothing).
    original = (await bot.services.jobs.stored_results(1))[0]
    assert len(original.data) > limit
    [attachment] = message.attachments
    assert attachment.filename == "drawbridge-1-1-preview.jpg"
    assert len(attachment.data) <= limit
    assert image_size(attachment.data)[0] > 0
    assert bot.t("result.preview_note", limit_mb=round(limit / 1024 / 1024, 1)) in message.content
    assert message.buttons()[0]["custom_id"] == "db:reroll:1"


# --- the context menu, buttons and modals ----------------------------------------------------


async def test_edit_image_menu_asks_for_a_prompt_and_edits_that_messages_images(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    photo = bot.fake.add_file(png(120, 90, "green"), "garden.png")
    post = bot.fake.post_user_message("look at this", [photo], user=bot.fake.other_user)
    menu = await bot.fake.message_command("Edit image", post)
    await bot.fake.wait_for(lambda: menu.modal)
    assert menu.callback_type == CB_MODAL

    submit = await bot.fake.submit_modal(menu, "make it autumn")
    message = await bot.result(submit)
    await bot.settle()

    request = mock_upstream.requests[-1]
    assert request.path.endswith("/images/edits")
    assert request.fields["prompt"] == "make it autumn"
    assert [(f.width, f.height) for f in request.files] == [(120, 90)]
    assert message.buttons()


async def test_edit_image_menu_on_a_shrunk_result_edits_the_kept_original(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    limit = 40_000
    first = await bot.fake.slash("draw", prompt="a tall tower", attachment_size_limit=limit)
    result = await bot.result(first)
    await bot.settle()
    assert result.filenames == ["drawbridge-1-1-preview.jpg"]

    menu = await bot.fake.message_command("Edit image", result)
    await bot.fake.wait_for(lambda: menu.modal)
    submit = await bot.fake.submit_modal(menu, "add a flag on top")
    await bot.result(submit)
    await bot.settle()

    original = (await bot.services.jobs.stored_results(1))[0]
    [reference] = mock_upstream.requests[-1].files
    assert (reference.width, reference.height) == image_size(original.data)
    assert (reference.width, reference.height) != image_size(result.attachments[0].data)


async def test_edit_image_menu_on_a_message_without_images_answers_only_the_user(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    post = bot.fake.post_user_message("no pictures here")
    menu = await bot.fake.message_command("Edit image", post)
    message = await bot.answer(menu)

    assert menu.callback_type == CB_MESSAGE
    assert message.ephemeral
    assert message.content == bot.t("error.no_reference")
    assert mock_upstream.requests == []


async def test_reroll_button_draws_the_same_prompt_again(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    first = await bot.fake.slash("draw", prompt="a paper boat", quality="low")
    result = await bot.result(first)
    await bot.settle()

    reroll = await bot.fake.click(result, "db:reroll:1", user=bot.fake.other_user)
    again = await bot.result(reroll)
    await bot.settle()

    assert reroll.callback_type == CB_DEFERRED_MESSAGE
    assert again.id != result.id and again.filenames == ["drawbridge-2-1.png"]
    assert [r.fields.get("prompt") for r in mock_upstream.requests] == ["a paper boat"] * 2
    assert mock_upstream.requests[1].fields.get("quality") == "low"
    assert again.buttons()[0]["custom_id"] == "db:reroll:2"


@pytest.mark.parametrize("action", ["edit", "ref"])
async def test_edit_and_reference_buttons_edit_the_result_with_the_modal_prompt(
    bot: Bot, mock_upstream: MockUpstream, action: str
) -> None:
    first = await bot.fake.slash("draw", prompt="a castle", size="1:1")
    result = await bot.result(first)
    await bot.settle()

    click = await bot.fake.click(result, f"db:{action}:1")
    await bot.fake.wait_for(lambda: click.modal)
    title_key = "modal.edit_title" if action == "edit" else "modal.reference_title"
    assert click.modal is not None and click.modal["title"] == bot.t(title_key)[:45]
    # "Use as reference" starts from the result's prompt; "Edit" asks for the change alone.
    [field] = click.modal_inputs()
    assert field.get("value") == ("a castle" if action == "ref" else None)
    submit = await bot.fake.submit_modal(click, "add a dragon")
    edited = await bot.result(submit)
    await bot.settle()

    request = mock_upstream.requests[-1]
    assert request.path.endswith("/images/edits")
    assert request.fields["prompt"] == "add a dragon"
    # The reference is the first job's result image itself.
    assert [(f.width, f.height) for f in request.files] == [image_size(result.attachments[0].data)]
    assert edited.filenames == ["drawbridge-2-1.png"]


async def test_buttons_keep_working_after_a_restart(
    start_bot: Callable[..., Awaitable[Bot]], mock_upstream: MockUpstream
) -> None:
    bot = await start_bot()
    result = await bot.result(await bot.fake.slash("draw", prompt="a lantern"))
    await bot.settle()
    await bot.platform.stop()
    await bot.services.close(grace=0)

    restarted = await start_bot()
    reroll = await restarted.fake.click(result, "db:reroll:1")
    again = await restarted.result(reroll)
    await restarted.settle()
    assert again.filenames == ["drawbridge-2-1.png"]


# --- private answers -------------------------------------------------------------------------


async def test_token_modal_binds_the_key_ephemerally_and_no_log_shows_it(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    opened = await bot.fake.slash("token")
    await bot.fake.wait_for(lambda: opened.modal)
    assert len(opened.modal_inputs()) == 1

    submit = await bot.fake.submit_modal(opened, OWN_KEY)
    message = await bot.answer(submit)
    await bot.settle()

    assert message.ephemeral
    assert OWN_KEY not in message.content and "cdef" in message.content
    user = await bot.services.store.user("discord", str(bot.fake.user.id))
    assert await bot.services.store.get_api_key(user.id) == OWN_KEY
    # discord.py logged the modal submit event at DEBUG: with the key masked.
    assert "INTERACTION_CREATE" in caplog.text
    assert OWN_KEY not in caplog.text
    assert OWN_KEY[3:20] not in caplog.text


async def test_quota_is_answered_only_to_the_user_in_their_language(bot: Bot) -> None:
    interaction = await bot.fake.slash("quota", locale="zh-CN")
    message = await bot.answer(interaction)

    assert interaction.callback_data.get("flags") == 64
    assert message.ephemeral
    assert message.content.startswith(bot.services.t("zh", "quota.text").split("{")[0])


async def test_refusal_of_a_public_command_is_shown_only_to_that_user(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    user = await bot.services.store.user("discord", str(bot.fake.user.id))
    await bot.services.store.set_role(user.id, "banned")

    interaction = await bot.fake.slash("draw", prompt="anything")
    refusal = await bot.fake.wait_message(
        lambda m: m.interaction_id == interaction.id and m.ephemeral
    )
    await bot.settle()

    assert refusal.content == bot.t("error.banned")
    public = bot.fake.messages[interaction.original_id or 0]
    assert public.deleted, "the public 'thinking...' message must go"
    assert mock_upstream.requests == []


async def test_interactions_after_shutdown_began_are_refused_only_to_the_user(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    await bot.platform.intake.close()
    interaction = await bot.fake.slash("draw", prompt="too late")
    message = await bot.answer(interaction)

    assert interaction.callback_type == CB_MESSAGE
    assert message.ephemeral and message.content == bot.t("error.shutdown")
    assert mock_upstream.requests == []


def test_result_files_are_split_into_messages_of_ten_files_and_25_mib() -> None:
    small = [(f"f{i}.png", b"x" * 10) for i in range(12)]
    assert [len(group) for group in batches(small)] == [10, 2]
    big = [(f"b{i}.png", b"x" * (9 * 1024 * 1024)) for i in range(4)]
    assert [len(group) for group in batches(big)] == [2, 2]


# --- the 15-minute interaction token ---------------------------------------------------------


async def test_job_outliving_the_interaction_token_is_delivered_to_the_channel(
    start_bot: Callable[..., Awaitable[Bot]],
) -> None:
    bot = await start_bot(token_ttl=0.0)
    interaction = await bot.fake.slash("draw", prompt="a slow sunrise")
    message = await bot.fake.wait_message(lambda m: m.via == "channel" and has_results(m))
    await bot.settle()

    assert message.content.startswith("a slow sunrise")
    assert message.buttons()
    # No webhook call was attempted with the old token after the deferral.
    webhook_calls = [p for _, p in bot.fake.requests if p.startswith("/api/v10/webhooks/")]
    assert webhook_calls == []
    assert interaction.callback_type == CB_DEFERRED_MESSAGE


async def test_token_refused_by_discord_falls_back_to_the_channel(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    mock_upstream.options = replace(mock_upstream.options, latency=0.6)
    interaction = await bot.fake.slash("draw", prompt="a ship in a bottle")
    await bot.answer(interaction)  # the status line is up
    interaction.expired = True

    message = await bot.fake.wait_message(lambda m: m.via == "channel" and has_results(m))
    await bot.settle()
    assert message.content.startswith("a ship in a bottle")
    assert (
        await bot.services.job_for_message("discord", str(bot.fake.channel_id), str(message.id))
        == 1
    )


# --- a peer that answers or sends a little differently ---------------------------------------


async def test_interaction_without_channel_object_or_size_limit_is_still_served(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    # Only the documented `channel_id` (no partial `channel`), and no `attachment_size_limit`.
    interaction = await bot.fake.slash(
        "draw", prompt="a quiet harbour", omit=("channel", "attachment_size_limit")
    )
    message = await bot.result(interaction)
    await bot.settle()

    assert message.via == "original" and message.filenames == ["drawbridge-1-1.png"]
    # The result is remembered under the real channel, so "Edit image" on it finds the job.
    assert await bot.job_of(message) == 1


async def test_unreadable_interaction_does_not_end_the_gateway_session(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    await bot.fake.wait_identified()
    # No token, no id: nothing discord.py can build an Interaction from.
    await bot.fake.dispatch("INTERACTION_CREATE", {"type": 2, "data": {"name": "draw"}})
    interaction = await bot.fake.slash("draw", prompt="still here")
    message = await bot.result(interaction)
    await bot.settle()

    assert message.content.startswith("still here")
    assert len(bot.fake.identifies) == 1


async def test_callbacks_answered_without_a_body_still_deliver_results_and_modals(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    bot.fake.callback_with_body = False
    interaction = await bot.fake.slash("draw", prompt="a kite over the dunes")
    message = await bot.result(interaction)
    await bot.settle()
    assert message.via == "original" and message.buttons()
    assert await bot.job_of(message) == 1

    opened = await bot.fake.slash("token")
    await bot.fake.wait_for(lambda: opened.modal)
    submit = await bot.fake.submit_modal(opened, OWN_KEY)
    answer = await bot.answer(submit)
    await bot.settle()
    assert answer.ephemeral and "cdef" in answer.content


async def test_status_line_is_removed_through_the_channel_when_the_callback_named_no_message(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    bot.fake.callback_with_body = False
    mock_upstream.options = replace(mock_upstream.options, latency=0.6)
    interaction = await bot.fake.slash("draw", prompt="a comet")
    status = await bot.answer(interaction)  # the status line is up
    interaction.expired = True

    await bot.fake.wait_message(lambda m: m.via == "channel" and has_results(m))
    await bot.settle()
    # The old status line ("uploading...") does not stay behind next to the result.
    assert bot.fake.messages[status.id].deleted


async def test_followup_answered_without_a_body_counts_as_sent(
    bot: Bot, mock_upstream: MockUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    bot.fake.callback_with_body = False
    bot.fake.followup_with_body = False
    user = await bot.services.store.user("discord", str(bot.fake.user.id))
    await bot.services.store.set_role(user.id, "banned")

    interaction = await bot.fake.slash("draw", prompt="anything")
    refusal = await bot.fake.wait_message(
        lambda m: m.interaction_id == interaction.id and m.ephemeral
    )
    await bot.settle()
    await asyncio.sleep(0.05)

    assert refusal.content == bot.t("error.banned")
    answers = [m for m in bot.fake.channel_messages() if m.interaction_id == interaction.id]
    assert answers == [refusal]
    # The refusal went out: nothing may treat it as a failed send.
    assert "could not send" not in caplog.text


# --- `drawbridge run` --------------------------------------------------------------------


async def test_drawbridge_run_serves_discord_and_stops_on_sigterm(
    fake_discord: FakeDiscord, mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    env = bot_env(
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY="sk-test-run-000000",
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        DISCORD_BOT_TOKEN=fake_discord.token,
        DISCORD_API_BASE=fake_discord.api_base,
        DISCORD_GATEWAY_URL=fake_discord.gateway_url,
    )
    bot = BotProcess(env, tmp_path)
    try:
        await bot.start(ready="discord ready", within=20)
        interaction = await fake_discord.slash("draw", prompt="a lighthouse at dusk")
        message = await fake_discord.wait_message(
            lambda m: m.interaction_id == interaction.id and has_results(m), within=20
        )
        assert message.content.startswith("a lighthouse at dusk")
    finally:
        code = await bot.stop(within=30)
    assert code == 0, bot.log
    assert fake_discord.token not in bot.log
    assert "stopped" in bot.log


async def test_notify_posts_in_the_channel(start_bot: Callable[..., Awaitable[Bot]]) -> None:
    bot = await start_bot()
    await bot.platform.notify(str(bot.fake.channel_id), "job 7 was interrupted and refunded")
    message = await bot.fake.wait_message(lambda m: m.via == "channel")
    assert message.content == "job 7 was interrupted and refunded"
