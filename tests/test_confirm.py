"""A job priced over DRAWBRIDGE_CONFIRM_ABOVE waits for its confirmation: a button where the
chat has buttons, `/confirm` (`/确认`) elsewhere; nothing is reserved until then, and only the
person who asked can confirm. Driven through the recording chat."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import plugins.confirm
from adapters.telegram import FloodPolicy, TelegramPlatform
from bot.chat import ChatLimits, MessageRef
from bot.config import Settings
from bot.i18n import t
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.registry import find_command, split_command
from tests import test_discord
from tests.bot_process import BotProcess, bot_env
from tests.fake_onebot import FakeOneBot, ImageHost, text
from tests.fake_telegram import ApiCall, FakeTelegram
from tests.recording_chat import RecordingChat, Sent, invocation, job_count, left, run_command
from tests.test_discord import Bot as DiscordBot
from tests.test_qq_e2e import (
    SELF_ID,
    Running,
    _free_port,
    _results_for,
    _say,
    _texts_for,
    _until,
    _users,
)

# The Discord fixtures of tests/test_discord.py (the fake Discord and a bot started on it).
fake_discord = test_discord.fake_discord
start_bot = test_discord.start_bot
FAST = FloodPolicy(chat_interval=0.0, group_limit=10_000, global_interval=0.0)
PRICES = {"1k": {"high": 8, "medium": 4, "default": 1}}


class ButtonChat(RecordingChat):
    """A recording chat with buttons: it implements the confirm prompt capability."""

    def __init__(self) -> None:
        super().__init__(ChatLimits(can_preview=True, has_buttons=True))
        self.tokens: list[int] = []

    async def send_confirm(self, text: str, *, token: int, label: str) -> MessageRef | None:
        self.tokens.append(token)
        ref = MessageRef(f"confirm-{token}")
        self.log.append(Sent("confirm", f"{text} [{label}]", ref=ref))
        return ref


@pytest.fixture
async def costly(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    services = await Services.create(
        settings_factory(prices=PRICES, daily_credits=100, confirm_above=10)
    )
    try:
        yield services
    finally:
        await services.close()


COSTLY = "a castle --quality high --n 2"  # 16 credits, over 10


async def test_costly_job_asks_for_a_reply_and_reserves_nothing_until_confirmed(
    costly: Services, mock_upstream: MockUpstream
) -> None:
    asked = await run_command(costly, invocation("draw", COSTLY))
    [question] = asked.texts()
    assert "16 credits, 84 left after this" in question
    assert "reply /confirm within 60 s" in question
    assert mock_upstream.requests == [] and job_count(costly) == 0
    assert await left(costly) == 100

    done = await run_command(costly, invocation("confirm"))
    assert len(done.results()[0].files) == 2
    assert await left(costly) == 84
    assert len(mock_upstream.requests) == 1


async def test_chinese_alias_confirms_the_newest_request(
    costly: Services, mock_upstream: MockUpstream
) -> None:
    assert find_command("确认") is find_command("confirm")
    parsed = split_command("/确认")
    assert parsed is not None and parsed[0].name == "confirm"
    asked = await run_command(costly, invocation("draw", COSTLY, locale="zh-CN"))
    assert "回复 /确认" in asked.last_text()
    await run_command(costly, invocation("draw", "a tower --quality high --n 2"))
    done = await run_command(costly, invocation("confirm", locale="zh-CN"))
    assert done.results()
    assert "a tower" in mock_upstream.requests[-1].fields["prompt"]
    # The older request still waits for its own confirmation.
    again = await run_command(costly, invocation("confirm"))
    assert again.results()
    assert "a castle" in mock_upstream.requests[-1].fields["prompt"]


async def test_button_chat_gets_a_confirm_button_and_the_press_starts_the_job(
    costly: Services, mock_upstream: MockUpstream
) -> None:
    chat = ButtonChat()
    await run_command(costly, invocation("draw", COSTLY), chat)
    [token] = chat.tokens
    [prompt] = [s for s in chat.log if s.kind == "confirm"]
    assert "press Confirm within 60 s" in prompt.text and prompt.text.endswith("[Confirm]")
    assert job_count(costly) == 0

    pressed = await run_command(costly, invocation("confirm", str(token)))
    assert pressed.results()
    assert await left(costly) == 84


async def test_a_confirmation_by_someone_else_is_refused(
    costly: Services, mock_upstream: MockUpstream
) -> None:
    chat = ButtonChat()
    await run_command(costly, invocation("draw", COSTLY, is_private=False), chat)
    [token] = chat.tokens
    other = await run_command(costly, invocation("confirm", str(token), user_id="u2"))
    assert "Only the person who asked" in other.last_text()
    assert other.log[-1].ephemeral
    # A bare /confirm by someone else finds nothing of theirs.
    bare = await run_command(costly, invocation("confirm", user_id="u2"))
    assert "Nothing to confirm" in bare.last_text()
    assert mock_upstream.requests == [] and job_count(costly) == 0
    # The request is still there for its owner.
    mine = await run_command(costly, invocation("confirm", str(token)))
    assert mine.results()


async def test_a_confirmation_works_once(costly: Services, mock_upstream: MockUpstream) -> None:
    chat = ButtonChat()
    await run_command(costly, invocation("draw", COSTLY), chat)
    [token] = chat.tokens
    await run_command(costly, invocation("confirm", str(token)))
    twice = await run_command(costly, invocation("confirm", str(token)))
    assert "Nothing to confirm" in twice.last_text()
    assert len(mock_upstream.requests) == 1
    assert await left(costly) == 84


async def test_an_expired_request_cannot_be_confirmed(
    costly: Services, mock_upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Expired at once: the 60 s are a setting of the module, not waited for here.
    monkeypatch.setattr(plugins.confirm, "CONFIRM_SECONDS", 0.0)
    await run_command(costly, invocation("draw", COSTLY))
    late = await run_command(costly, invocation("confirm"))
    assert "Nothing to confirm" in late.last_text()
    assert mock_upstream.requests == [] and job_count(costly) == 0


async def test_jobs_at_or_under_the_limit_start_at_once(
    costly: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(
        costly, invocation("draw", "a hut --quality medium --n 2")
    )  # 8 credits
    assert chat.results()
    assert await left(costly) == 92


async def test_own_key_jobs_are_never_held(costly: Services, mock_upstream: MockUpstream) -> None:
    await run_command(costly, invocation("token", "sk-own-key-1234567890abcdef"))
    chat = await run_command(costly, invocation("draw", COSTLY))
    assert chat.results()


async def test_a_job_the_user_cannot_afford_is_refused_not_held(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(
        settings_factory(prices=PRICES, daily_credits=12, confirm_above=10)
    )
    try:
        chat = await run_command(services, invocation("draw", COSTLY))
        assert "confirm" not in chat.last_text().lower()
        assert "16" in chat.last_text()
        assert mock_upstream.requests == []
    finally:
        await services.close()


async def test_reroll_of_a_costly_result_asks_too(
    costly: Services, mock_upstream: MockUpstream
) -> None:
    await run_command(costly, invocation("draw", COSTLY))
    first = await run_command(costly, invocation("confirm"))
    meta = first.results()[0].meta
    assert meta is not None
    again = await run_command(costly, invocation("reroll", reply_to_job=meta.job_id))
    assert "reply /confirm" in again.last_text()
    assert len(mock_upstream.requests) == 1


# --- QQ end to end: `drawbridge run` with the fake OneBot (reply /确认) ---


@contextlib.asynccontextmanager
async def qq_bot(workdir: Path, **settings: str) -> AsyncIterator[Running]:
    """A `drawbridge run` serving QQ to a FakeOneBot, with these extra settings."""
    upstream = MockUpstream()
    api_base = await upstream.start()
    images = ImageHost()
    await images.start()
    port = _free_port()
    (workdir / ".env").write_text(
        f"DRAWBRIDGE_API_KEY={QQ_KEY}\nONEBOT_ACCESS_TOKEN={QQ_TOKEN}\n", "utf-8"
    )
    env = bot_env(
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        DRAWBRIDGE_DATA_DIR=str(workdir / "data"),
        DRAWBRIDGE_API_BASE=api_base,
        DRAWBRIDGE_IMAGE_HOSTS="127.0.0.1",
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        API_TIMEOUT="2",
        **settings,
    )
    process = BotProcess(env, workdir)
    onebot = FakeOneBot(SELF_ID, images=images)
    bot = Running(
        process, onebot, images, upstream, f"ws://127.0.0.1:{port}/onebot/v11/ws", workdir / "data"
    )
    try:
        await process.start(ready=r"\bqq ready\b")
        await onebot.connect(bot.url, QQ_TOKEN)
        await bot.wait_output(rf"Bot {SELF_ID}.* connected")
        yield bot
    finally:
        await onebot.close()
        if process.process is not None:
            await process.stop()
        await images.stop()
        await upstream.stop()


QQ_KEY = "sk-qq-confirm-shared-5Rt8"
QQ_TOKEN = "onebot-confirm-token-77aa"


@pytest.fixture(scope="module")
async def qq(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with qq_bot(
        tmp_path_factory.mktemp("qq-confirm"),
        DRAWBRIDGE_DAILY_CREDITS="100",
        DRAWBRIDGE_PRICES=json.dumps(PRICES),
        DRAWBRIDGE_CONFIRM_ABOVE="10",
    ) as bot:
        yield bot


async def test_qq_costly_draw_waits_for_a_reply_confirm_and_only_its_owner_can_give_it(
    qq: Running,
) -> None:
    alice, bob = next(_users), next(_users)
    asked = await _say(qq, alice, text(f"/画 {COSTLY}"))
    [question] = await _until(qq, _texts_for(asked))
    assert "16 credits, 84 left after this" in question.text
    assert "reply /confirm within 60 s" in question.text
    assert qq.upstream.requests == []

    # Bob's /确认 finds nothing of his; Alice's request still waits.
    stranger = await _say(qq, bob, text("/确认"))
    [refused] = await _until(qq, _texts_for(stranger))
    assert "Nothing to confirm" in refused.text
    assert qq.upstream.requests == []

    confirmed = await _say(qq, alice, text("/确认"))
    results = await _until(qq, _results_for(confirmed), n=2)
    assert len(results) == 2
    [ack] = _texts_for(confirmed)(qq.onebot.calls)
    assert "16 credits, 84 left after this" in ack.text
    with qq.db() as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


# --- Telegram (fake Bot API): the Confirm button is an inline keyboard ---


@pytest.fixture
async def tg(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> AsyncIterator[tuple[FakeTelegram, TelegramPlatform]]:
    async with FakeTelegram() as fake:
        settings = settings_factory(
            telegram_bot_token=fake.token,
            telegram_api_server=fake.base_url,
            prices=PRICES,
            daily_credits=100,
            confirm_above=10,
        )
        services = await Services.create(settings)
        platform = TelegramPlatform(settings, services, flood=FAST, polling_timeout=5)
        await platform.start()
        try:
            yield fake, platform
        finally:
            await platform.stop()
            await services.close()


def confirm_data(call: ApiCall) -> str:
    [[button]] = call.json("reply_markup")["inline_keyboard"]
    assert button["text"] == "Confirm"
    return str(button["callback_data"])


async def test_telegram_costly_draw_shows_a_confirm_button_only_its_asker_can_press(
    tg: tuple[FakeTelegram, TelegramPlatform], mock_upstream: MockUpstream
) -> None:
    fake, platform = tg
    alice, bob = fake.user(1001), fake.user(1002, "Bob")
    group = fake.group_chat()
    fake.send_message(group, alice, f"/draw {COSTLY}")
    question = await fake.wait_call(
        "sendMessage", where=lambda c: "inline_keyboard" in c.fields.get("reply_markup", "")
    )
    assert "16 credits, 84 left after this" in question.fields["text"]
    assert "press Confirm within 60 s" in question.fields["text"]
    data = confirm_data(question)
    assert data.startswith("db:confirm:")
    prompt = [m for m in fake.bot_messages(group["id"]) if "reply_markup" in m][-1]

    fake.press_button(group, bob, prompt, data)
    refusal = await fake.wait_call(
        "sendMessage", where=lambda c: "Only the person who asked" in c.fields["text"]
    )
    assert refusal.fields["chat_id"] == str(group["id"])
    assert mock_upstream.requests == []

    fake.press_button(group, alice, prompt, data)
    photo = await fake.wait_call("sendMediaGroup", within=20)
    assert photo.fields["chat_id"] == str(group["id"])
    await platform.services.jobs.wait_idle()
    assert len(mock_upstream.requests) == 1
    user = await platform.services.store.user("telegram", "1001")
    credits = await platform.services.store.credits(user.id, today(platform.services.settings), 100)
    assert credits.total_left == 84


# --- Discord (fake Discord): the Confirm button is a persistent component ---


async def test_discord_costly_draw_shows_a_confirm_button_that_works_for_its_asker_only(
    start_bot: Callable[..., Awaitable[DiscordBot]], mock_upstream: MockUpstream
) -> None:
    bot = await start_bot(prices=PRICES, daily_credits=100, confirm_above=10)
    asked = await bot.fake.slash("draw", prompt="a castle", quality="high", n=2)
    question = await bot.answer(asked, lambda m: bool(m.buttons()))
    [button] = question.buttons()
    assert button["custom_id"].startswith("db:confirm:") and button["label"] == "Confirm"
    assert "16 credits, 84 left after this" in question.content
    assert "press Confirm within 60 s" in question.content

    stranger = await bot.fake.click(question, button["custom_id"], user=bot.fake.other_user)
    refusal = await bot.fake.wait_message(
        lambda m: m.interaction_id == stranger.id and "Only the person who asked" in m.content
    )
    assert refusal.ephemeral
    await bot.settle()
    assert mock_upstream.requests == []

    mine = await bot.fake.click(question, button["custom_id"])
    result = await bot.result(mine)
    await bot.settle()
    assert len(result.filenames) == 2
    assert len(mock_upstream.requests) == 1


async def test_discord_dry_run_option_answers_the_price_only(
    start_bot: Callable[..., Awaitable[DiscordBot]], mock_upstream: MockUpstream
) -> None:
    bot = await start_bot(prices=PRICES, daily_credits=100)
    asked = await bot.fake.slash("draw", prompt="a castle", quality="high", dry_run=True)
    answer = await bot.answer(asked)
    await bot.settle()
    assert answer.content.startswith("1K · high · 1 image: 8 credits, 92 left after this")
    assert "nothing was started or charged" in answer.content
    assert mock_upstream.requests == []


async def test_telegram_menu_has_confirm_in_both_languages(
    tg: tuple[FakeTelegram, TelegramPlatform],
) -> None:
    fake, _ = tg
    for code, lang in (("en", "en"), ("zh", "zh")):
        menu = {c["command"]: c["description"] for c in fake.commands[code]}
        assert menu["confirm"] == t(lang, "help.confirm")


async def test_discord_confirm_pressed_after_a_restart_is_answered_not_left_failing(
    start_bot: Callable[..., Awaitable[DiscordBot]], mock_upstream: MockUpstream
) -> None:
    bot = await start_bot(prices=PRICES, daily_credits=100, confirm_above=10)
    asked = await bot.fake.slash("draw", prompt="a castle", quality="high", n=2)
    question = await bot.answer(asked, lambda m: bool(m.buttons()))
    [button] = question.buttons()
    await bot.platform.stop()
    await bot.services.close(grace=0)

    restarted = await start_bot(prices=PRICES, daily_credits=100, confirm_above=10)
    late = await restarted.fake.click(question, button["custom_id"])
    answer = await restarted.fake.wait_message(
        lambda m: m.interaction_id == late.id and "Nothing to confirm" in m.content
    )
    await restarted.settle()
    assert answer.ephemeral
    assert mock_upstream.requests == []
