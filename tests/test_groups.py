"""Where the bot answers (DRAWBRIDGE_GROUPS, DRAWBRIDGE_PRIVATE) and each group's own rules
(/group, /群设置): through the platform-neutral harness, then the Telegram, QQ and Discord
fakes (their fixtures come from those platforms' own test modules)."""

# Fixtures imported from the platforms' test modules are named again as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nonebot.adapters.onebot.v11 import Bot as OneBot
from nonebot.adapters.onebot.v11.event import Sender
from nonebot.matcher import Matcher
from nonebug import App
from pydantic import ValidationError

from adapters.telegram import TelegramPlatform
from bot.config import Settings, settings_error_lines
from bot.mock_upstream import MockUpstream
from bot.services import Services
from bot.sizes import parse_size
from plugins.registry import find_command, split_command
from tests.fake_telegram import FakeTelegram
from tests.recording_chat import RecordingChat, invocation, run_command
from tests.test_discord import Bot, fake_discord, start_bot  # noqa: F401 (fixtures)
from tests.test_qq_matcher import (  # noqa: F401 (fixtures)
    GROUP,
    SELF_ID,
    USER,
    Matching,
    group_event,
    matcher,
    plain,
    qq_services,
)
from tests.test_settings_errors import drawbridge
from tests.test_telegram import FAST, fake, texts_sent  # noqa: F401 (fixtures)

GROUP_CHAT = -1001234567890


def in_group(command: str, text: str = "", **fields: Any) -> Any:
    """A command from u1 in group chat g1 of the test platform."""
    values: dict[str, Any] = {"is_private": False, "chat_id": "g1"}
    values.update(fields)
    return invocation(command, text, **values)


async def run(services: Services, inv: Any) -> RecordingChat:
    return await run_command(services, inv)


def group_row(services: Services, key: str) -> sqlite3.Row | None:
    with sqlite3.connect(services.settings.data_dir / "drawbridge.sqlite3") as db:
        db.row_factory = sqlite3.Row
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM group_rules WHERE group_key = ?", (key,)
        ).fetchone()
        return row


# --- declarations and settings ------------------------------------------------------------


def test_group_is_declared_once_with_its_chinese_alias_and_slash_options() -> None:
    spec = find_command("group")
    assert spec is not None and spec.in_menu and not spec.admin
    assert find_command("群设置") is spec
    assert split_command("/群设置 size 16:9") == (spec, "size 16:9")
    assert [o.name for o in spec.options] == ["setting", "value"]
    assert "cooldown" in spec.options[0].choices


def test_groups_setting_parses_and_names_bad_entries_without_their_values(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(groups="qq:123, Telegram:-1001234567890,discord:99", private=False)
    assert settings.group_allow_list() == {"qq:123", "telegram:-1001234567890", "discord:99"}
    assert settings.private is False
    with pytest.raises(ValidationError) as caught:
        settings_factory(groups="qq:123,telegram,discord:abc")
    [line] = settings_error_lines(caught.value)
    assert line.startswith("DRAWBRIDGE_GROUPS: entries 2, 3 is not platform:id")
    assert "abc" not in line


async def test_a_bad_groups_setting_stops_run_with_exit_2_and_one_line(tmp_path: Path) -> None:
    code, stderr = await drawbridge(tmp_path, "run", DRAWBRIDGE_GROUPS="qq123")
    assert code == 2
    lines = [line for line in stderr.splitlines() if "DRAWBRIDGE_GROUPS" in line]
    assert len(lines) == 1 and "not platform:id" in lines[0]


# --- where the bot answers -----------------------------------------------------------------


@pytest.fixture
async def listed(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    """Services answering only in test group 41, with private chats off."""
    services = await Services.create(settings_factory(groups="test:41", private=False))
    try:
        yield services
    finally:
        await services.close()


async def test_outside_drawbridge_groups_and_in_private_chats_the_bot_stays_silent(
    listed: Services, mock_upstream: MockUpstream
) -> None:
    elsewhere = await run(listed, in_group("draw", "a fox", chat_id="42"))
    private = await run(listed, invocation("help"))
    whoami = await run(listed, invocation("whoami"))
    assert elsewhere.log == [] and private.log == [] and whoami.log == []
    assert mock_upstream.requests == []
    # Not even a user row: silence costs nothing.
    with sqlite3.connect(listed.settings.data_dir / "drawbridge.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0

    listed_group = await run(listed, in_group("draw", "a fox", chat_id="41"))
    assert listed_group.results()


# --- /group ----------------------------------------------------------------------------------


async def test_group_alone_shows_the_rules_to_anyone_and_only_admins_change_them(
    services: Services,
) -> None:
    shown = await run(services, in_group("group"))
    assert "This group's settings" in shown.last_text()
    assert "Bot: on" in shown.last_text()

    refused = await run(services, in_group("group", "cap 3"))
    assert refused.last_text() == services.t("en", "group.not_admin")
    assert group_row(services, "test:g1") is None

    saved = await run(services, in_group("group", "cap 3", group_admin=True))
    assert "Daily cap: 3 credits, 0 used today" in saved.last_text()
    row = group_row(services, "test:g1")
    assert row is not None and row["cap"] == 3


async def test_group_in_a_private_chat_says_to_use_it_in_the_group(services: Services) -> None:
    chat = await run(services, invocation("group", "off", group_admin=True))
    assert chat.last_text() == services.t("en", "group.private_only")


async def test_a_bot_admin_sets_the_rules_of_any_group(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(admins="test:boss"))
    try:
        chat = await run(services, in_group("group", "cooldown 30", user_id="boss"))
        assert "30 s" in chat.last_text()
        row = group_row(services, "test:g1")
        assert row is not None and row["cooldown"] == 30
    finally:
        await services.close()


async def test_group_off_silences_every_command_but_group_and_on_brings_it_back(
    services: Services, mock_upstream: MockUpstream
) -> None:
    await run(services, in_group("group", "off", group_admin=True))
    silent = [await run(services, in_group(c, "a fox")) for c in ("draw", "help", "quota")]
    assert all(chat.log == [] for chat in silent)
    assert mock_upstream.requests == []
    # Other groups are not affected.
    assert (await run(services, in_group("help", chat_id="g2"))).log

    shown = await run(services, in_group("group"))
    assert "Bot: off" in shown.last_text()
    await run(services, in_group("group", "on", group_admin=True))
    assert (await run(services, in_group("draw", "a fox"))).results()


async def test_group_size_and_quality_are_the_defaults_a_user_can_still_override(
    services: Services, mock_upstream: MockUpstream
) -> None:
    await run(services, in_group("group", "size 16:9", group_admin=True))
    await run(services, in_group("group", "quality low", group_admin=True))

    await run(services, in_group("draw", "a fox"))
    wide = parse_size("16:9", services.settings.model)
    assert mock_upstream.requests[-1].fields["size"] == str(wide)
    assert mock_upstream.requests[-1].fields["quality"] == "low"

    await run(services, in_group("draw", "a fox --size 1:1 --quality high"))
    assert mock_upstream.requests[-1].fields["size"] == "1024x1024"
    assert mock_upstream.requests[-1].fields["quality"] == "high"

    # Elsewhere (another group, a private chat) the bot's own defaults hold.
    await run(services, invocation("draw", "a fox"))
    assert mock_upstream.requests[-1].fields.get("quality") != "low"


async def test_bad_group_values_are_refused_and_nothing_is_stored(services: Services) -> None:
    for text, key in (
        ("quality ultra", "group.bad_quality"),
        ("cap lots", "group.bad_cap"),
        ("cooldown 999999", "group.bad_cooldown"),
        ("size", "group.bad_size"),
    ):
        chat = await run(services, in_group("group", text, group_admin=True))
        assert chat.last_text() == services.t("en", key, value=text.split()[-1], max=86400)
    bad_size = await run(services, in_group("group", "size 1919x1079", group_admin=True))
    assert "1919x1079" in bad_size.last_text()
    unknown = await run(services, in_group("group", "colour red", group_admin=True))
    assert unknown.last_text() == services.t("en", "group.usage")
    assert group_row(services, "test:g1") is None


async def test_group_cap_is_the_groups_own_and_never_above_the_global_cap(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(group_daily_cap=10, daily_credits=20))
    try:
        above = await run(services, in_group("group", "cap 11", group_admin=True))
        assert above.last_text() == services.t("en", "group.cap_above", cap=11, limit=10)
        await run(services, in_group("group", "cap 2", group_admin=True))

        first = await run(services, in_group("draw", "a fox --n 2"))
        assert first.results()
        # The group has spent its own cap: refused before anything runs, for any member.
        refused = await run(services, in_group("draw", "a fox", user_id="u2"))
        assert refused.last_text() == services.t("en", "error.group_cap", cap=2)
        assert len(mock_upstream.requests) == 1

        # Lifting the group's own cap leaves the global one.
        await run(services, in_group("group", "cap off", group_admin=True))
        assert (await run(services, in_group("draw", "a fox", user_id="u2"))).results()
    finally:
        await services.close()


async def test_group_cap_is_enforced_by_the_reservation_itself(services: Services) -> None:
    """A job priced over what is left of the group's cap is refused in the ledger, exactly."""
    store = services.store
    await store.set_group_rule("test:g1", "cap", 3)
    user = await store.user("test", "u1")
    from datetime import date

    from bot.errors import GroupCapReachedError

    day = date(2025, 3, 1)
    job = await store.create_job(
        user_id=user.id,
        platform="test",
        chat_id="g1",
        group_key="test:g1",
        kind="draw",
        prompt="p",
        options={},
        ref_count=0,
        own_key=False,
    )
    with pytest.raises(GroupCapReachedError) as caught:
        await store.reserve(
            job, user_id=user.id, cost=4, day=day, daily_allowance=10, group_key="test:g1"
        )
    assert caught.value.params["cap"] == 3
    await store.reserve(
        job, user_id=user.id, cost=3, day=day, daily_allowance=10, group_key="test:g1"
    )
    assert await store.group_used("test:g1", day) == 3


async def test_group_cooldown_is_between_one_members_jobs(
    services: Services, mock_upstream: MockUpstream
) -> None:
    await run(services, in_group("group", "cooldown 3600", group_admin=True))
    assert (await run(services, in_group("draw", "a fox"))).results()

    again = await run(services, in_group("draw", "a fox"))
    assert not again.results()
    assert "this group has a cooldown" in again.last_text()
    # Another member, or the same member elsewhere, is not held back.
    assert (await run(services, in_group("draw", "a fox", user_id="u2"))).results()
    assert (await run(services, in_group("draw", "a fox", chat_id="g2"))).results()
    assert len(mock_upstream.requests) == 3


async def test_a_refunded_job_starts_no_cooldown(
    services: Services, mock_upstream: MockUpstream
) -> None:
    await run(services, in_group("group", "cooldown 3600", group_admin=True))
    failed = await run(services, in_group("draw", "a fox [fail:server_error]"))
    assert not failed.results()
    assert (await run(services, in_group("draw", "a fox"))).results()


# --- Telegram ----------------------------------------------------------------------------


@pytest.fixture
async def tg(
    fake: FakeTelegram, settings_factory: Callable[..., Settings]
) -> AsyncIterator[tuple[TelegramPlatform, Services]]:
    settings = settings_factory(
        telegram_bot_token=fake.token,
        telegram_api_server=fake.base_url,
        groups=f"telegram:{GROUP_CHAT}",
        private=False,
    )
    services = await Services.create(settings)
    platform = TelegramPlatform(settings, services, flood=FAST, album_wait=0.3, polling_timeout=5)
    await platform.start()
    try:
        yield platform, services
    finally:
        await platform.stop()
        await services.close()


async def test_telegram_chat_administrators_set_the_rules_members_cannot(
    tg: tuple[TelegramPlatform, Services], fake: FakeTelegram, mock_upstream: MockUpstream
) -> None:
    _, services = tg
    group = fake.group_chat(GROUP_CHAT)
    admin, member = fake.user(7001), fake.user(7002)
    fake.chat_members[(GROUP_CHAT, admin["id"])] = "administrator"

    fake.send_message(group, member, "/group quality low")
    refused = await fake.wait_call("sendMessage")
    assert refused.fields["text"] == services.t("en", "group.not_admin")

    fake.send_message(group, admin, "/群设置 quality low")
    saved = await fake.wait_call("sendMessage", count=2)
    assert saved.fields["text"].startswith(services.t("en", "group.saved"))
    asked = fake.calls_of("getChatMember")
    assert [c.fields["user_id"] for c in asked] == [str(member["id"]), str(admin["id"])]

    fake.send_message(group, member, "/draw a fox")
    await fake.wait_call("sendPhoto")
    assert mock_upstream.requests[-1].fields["quality"] == "low"
    # Only /group asks who is an administrator.
    assert len(fake.calls_of("getChatMember")) == 2


async def test_telegram_is_silent_outside_drawbridge_groups_and_in_private_when_off(
    tg: tuple[TelegramPlatform, Services], fake: FakeTelegram
) -> None:
    alice = fake.user(7003)
    fake.send_message(fake.group_chat(-1009999), alice, "/help")
    fake.send_message(fake.private_chat(alice), alice, "/help")
    fake.send_message(fake.group_chat(GROUP_CHAT), alice, "/help")

    await fake.wait_call("sendMessage", where=lambda c: c.fields["chat_id"] == str(GROUP_CHAT))
    assert texts_sent(fake, -1009999) == []
    assert texts_sent(fake, alice["id"]) == []


# --- QQ ----------------------------------------------------------------------------------


def qq_event(text: str, *, role: str, user_id: int = USER) -> Any:
    event = group_event(text, user_id=user_id)
    event.sender = Sender(user_id=user_id, nickname="tester", card="Alice", role=role)
    return event


async def test_qq_group_owner_and_admin_set_the_rules_a_member_cannot(
    app: App, matcher: type[Matcher], qq_services: Services
) -> None:
    t = qq_services.t
    refused = Matching(lambda m: plain(m["message"]) == t("en", "group.not_admin"))
    saved = Matching(lambda m: plain(m["message"]).startswith(t("en", "group.saved")))
    async with app.test_matcher(matcher) as ctx:
        qq = ctx.create_bot(base=OneBot, self_id=str(SELF_ID))
        ctx.receive_event(qq, qq_event("/群设置 cooldown 60", role="member"))
        ctx.should_call_api("send_msg", refused, {"message_id": 1})
        ctx.receive_event(qq, qq_event("/群设置 cooldown 60", role="admin"))
        ctx.should_call_api("send_msg", saved, {"message_id": 2})
        ctx.receive_event(qq, qq_event("/group off", role="owner"))
        ctx.should_call_api("send_msg", saved, {"message_id": 3})
    assert len(refused.seen) == 1 and len(saved.seen) == 2
    rules = await qq_services.store.group_rules(f"qq:group:{GROUP}")
    assert rules.cooldown == 60 and not rules.enabled


@pytest.fixture
async def qq_listed(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    services = await Services.create(
        settings_factory(image_hosts="127.0.0.1", groups=f"qq:{GROUP + 1}")
    )
    try:
        yield services
    finally:
        await services.close()


async def test_qq_is_silent_in_a_group_drawbridge_groups_does_not_name(
    app: App, qq_listed: Services
) -> None:
    from adapters.qq import create_platform
    from adapters.qq.chat import SendPacer
    from adapters.qq.handler import build_matcher

    platform = create_platform(qq_listed.settings, qq_listed)
    platform.handler.pacer = SendPacer(0.0)
    registered = build_matcher(platform.handler)
    try:
        async with app.test_matcher(registered) as ctx:
            qq = ctx.create_bot(base=OneBot, self_id=str(SELF_ID))
            # GROUP is not listed: the rule matches, the handler says nothing (no API call).
            ctx.receive_event(qq, group_event("/help"))
            ctx.should_pass_rule(registered)
    finally:
        registered.destroy()


# --- Discord -------------------------------------------------------------------------------


async def test_discord_manage_server_sets_the_rules_and_others_cannot(
    start_bot: Callable[..., Awaitable[Bot]],
) -> None:
    bot = await start_bot()
    fake = bot.fake
    command = fake.command("group")
    assert [o["name"] for o in command["options"]] == ["setting", "value"]

    refused = await fake.slash("group", setting="cap", value="5")
    assert (await bot.answer(refused)).content == bot.t("group.not_admin")

    fake.permissions[fake.user.id] = 1 << 5  # Manage Server
    saved = await fake.slash("group", setting="cap", value="5")
    message = await bot.answer(saved)
    assert message.content.startswith(bot.t("group.saved"))
    rules = await bot.services.store.group_rules(f"discord:{fake.channel_id}")
    assert rules.cap == 5


async def test_discord_is_silent_in_a_server_drawbridge_groups_does_not_name(
    start_bot: Callable[..., Awaitable[Bot]], fake_discord: Any
) -> None:
    bot = await start_bot(groups=f"discord:{fake_discord.guild_id}")
    fake = bot.fake
    listed = fake.guild_id
    fake.guild_id = listed + 1  # the same user, in a server the setting does not name
    silent = await fake.slash("help")
    fake.guild_id = listed
    answered = await fake.slash("help")
    # Interactions are taken in order: once the second is answered, the first was seen.
    assert "/draw" in (await bot.answer(answered)).content
    assert silent.original_id is None
    assert not any(str(silent.id) in path for _, path in fake.requests)
