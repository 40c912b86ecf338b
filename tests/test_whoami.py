"""/whoami (/我是谁) answers `platform:id`, exactly what DRAWBRIDGE_ADMINS takes.

Driven through the platform-neutral harness, and through the Telegram, Discord and QQ fakes
(their fixtures are imported from those platforms' own test modules).
"""

# Fixtures imported from the platforms' test modules are named again as test parameters.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Callable

from nonebot.adapters.onebot.v11 import Bot as OneBot
from nonebot.matcher import Matcher
from nonebug import App

from adapters.telegram import TelegramPlatform
from bot.config import Settings
from bot.i18n import t
from bot.services import Services
from plugins.registry import find_command, split_command
from tests.fake_telegram import FakeTelegram
from tests.recording_chat import invocation, run_command
from tests.test_discord import Bot, bot, fake_discord, start_bot  # noqa: F401 (fixtures)
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
from tests.test_telegram import fake, platform, tg_settings  # noqa: F401 (fixtures)


def first_line(text: str) -> str:
    return text.splitlines()[0]


def test_whoami_is_declared_once_with_its_chinese_alias() -> None:
    spec = find_command("whoami")
    assert spec is not None and spec.in_menu and not spec.admin
    assert find_command("我是谁") is spec
    assert split_command("/我是谁") == (spec, "")


def second_line(text: str) -> str:
    return text.splitlines()[2]


async def test_whoami_answers_platform_colon_id_privately(services: Services) -> None:
    chat = await run_command(services, invocation("whoami", user_id="12345", is_private=False))
    [sent] = chat.log
    assert first_line(sent.text) == "test:12345"
    assert sent.ephemeral


async def test_whoami_in_a_group_also_names_the_group_as_drawbridge_groups_takes_it(
    services: Services,
) -> None:
    group = await run_command(
        services, invocation("whoami", user_id="12345", chat_id="777", is_private=False)
    )
    assert second_line(group.last_text()) == t("en", "whoami.group", space="test:777")
    private = await run_command(services, invocation("whoami", user_id="12345"))
    assert len(private.last_text().splitlines()) == 2  # no group line in a private chat


async def test_whoami_answer_made_into_drawbridge_admins_makes_that_user_an_admin(
    services: Services, settings_factory: Callable[..., Settings]
) -> None:
    chat = await run_command(services, invocation("whoami", user_id="777"))
    who = first_line(chat.last_text())

    admin_services = await Services.create(settings_factory(admins=who))
    try:
        user = await admin_services.store.user("test", "777")
        assert user.role == "admin"
        stats = await run_command(admin_services, invocation("stats", user_id="777"))
        assert "Today:" in stats.last_text()
    finally:
        await admin_services.close()


async def test_whoami_on_telegram_answers_telegram_id_and_is_in_the_menu(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    alice = fake.user(424242)
    fake.send_message(fake.private_chat(alice), alice, "/whoami")

    answer = await fake.wait_call("sendMessage")

    assert first_line(answer.fields["text"]) == "telegram:424242"
    menus = [c for c in fake.calls if c.method == "setMyCommands"]
    assert menus
    assert all("whoami" in {c["command"] for c in call.json("commands")} for call in menus)


async def test_whoami_on_telegram_by_chinese_alias_in_a_group(
    platform: TelegramPlatform, fake: FakeTelegram
) -> None:
    bob = fake.user(515151, language_code="zh-hans")
    fake.send_message(fake.group_chat(), bob, "/我是谁")

    answer = await fake.wait_call("sendMessage")

    assert first_line(answer.fields["text"]) == "telegram:515151"
    assert "DRAWBRIDGE_ADMINS" in answer.fields["text"]
    # The group as DRAWBRIDGE_GROUPS takes it: its chat id.
    group_id = fake.group_chat()["id"]
    assert f"telegram:{group_id}" in second_line(answer.fields["text"])


async def test_whoami_on_discord_is_a_slash_command_answered_only_to_the_user(bot: Bot) -> None:
    assert bot.fake.command("whoami")["description_localizations"]["zh-CN"] == bot.services.t(
        "zh", "help.whoami"
    )
    interaction = await bot.fake.slash("whoami")
    message = await bot.answer(interaction)

    assert first_line(message.content) == f"discord:{bot.fake.user.id}"
    # The server, as DRAWBRIDGE_GROUPS names a Discord group.
    assert f"discord:{bot.fake.guild_id}" in second_line(message.content)
    assert message.ephemeral


async def test_whoami_on_qq_by_chinese_alias_in_a_group(app: App, matcher: type[Matcher]) -> None:
    answer = Matching(
        lambda m: (
            first_line(plain(m["message"])) == f"qq:{USER}"
            and f"qq:{GROUP}" in second_line(plain(m["message"]))
        )
    )
    async with app.test_matcher(matcher) as ctx:
        qq = ctx.create_bot(base=OneBot, self_id=str(SELF_ID))
        ctx.receive_event(qq, group_event("/我是谁"))
        ctx.should_pass_rule(matcher)
        ctx.should_call_api("send_msg", answer, {"message_id": 1})
    assert len(answer.seen) == 1, answer.seen
