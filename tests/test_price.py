"""The price before you pay: the acknowledgement says what a job costs and what is left, and
`--dry-run` (`--预览`) says only that, running nothing. Driven through the recording chat."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest

from adapters.telegram import FloodPolicy, TelegramPlatform
from bot.config import Settings
from bot.jobs import Quote
from bot.mock_upstream import MockUpstream
from bot.services import Services
from plugins.options import parse_image_args
from tests.fake_onebot import text
from tests.fake_telegram import FakeTelegram
from tests.recording_chat import RecordingChat, invocation, job_count, left, run_command
from tests.test_confirm import qq_bot
from tests.test_qq_e2e import Running, _results_for, _say, _texts_for, _until, _users

OWN_KEY = "sk-own-key-1234567890abcdef"
FAST = FloodPolicy(chat_interval=0.0, group_limit=10_000, global_interval=0.0)
PRICES = {"1k": {"default": 1}, "2k": {"default": 3}, "4k": {"high": 8, "default": 4}}


@pytest.fixture
async def priced(settings_factory: Callable[..., Settings]) -> AsyncIterator[Services]:
    services = await Services.create(
        settings_factory(prices=PRICES, daily_credits=100, confirm_above=50)
    )
    try:
        yield services
    finally:
        await services.close()


async def test_acknowledgement_says_the_price_and_what_is_left_after_it(
    priced: Services,
) -> None:
    chat = await run_command(priced, invocation("draw", "a fox --size 4k --quality high --n 2"))
    assert chat.results()
    first = chat.texts()[0]
    assert "4K · high · 2 images: 16 credits, 84 left after this" in first
    # Every status of the job keeps saying it, until the result replaces the status.
    statuses = [s.text for s in chat.log if s.kind in ("text", "edit")]
    assert all("16 credits, 84 left after this" in text for text in statuses)
    assert await left(priced) == 84


async def test_acknowledgement_in_chinese(priced: Services) -> None:
    chat = await run_command(priced, invocation("draw", "一只猫 --size 2k", locale="zh-CN"))
    assert "2K · auto · 1 张:3 点额度,之后剩 97 点" in chat.texts()[0]


async def test_own_key_acknowledgement_says_the_key_pays(
    priced: Services, mock_upstream: MockUpstream
) -> None:
    await run_command(priced, invocation("token", OWN_KEY))
    chat = await run_command(priced, invocation("draw", "a fox --size 4k --quality high"))
    assert chat.results()
    assert "4K · high · 1 image: your own key pays for this" in chat.texts()[0]
    assert "credits" not in chat.texts()[0]
    assert await left(priced) == 100


async def test_dry_run_says_the_price_and_runs_nothing(
    priced: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(
        priced, invocation("draw", "a fox --size 4k --quality high --n 2 --dry-run")
    )
    [answer] = chat.texts()
    assert answer.startswith("4K · high · 2 images: 16 credits, 84 left after this")
    assert "nothing was started or charged" in answer
    assert not chat.results()
    assert mock_upstream.requests == []
    # Not recorded: a dry run is not a job (decided in plugins/image.py `_start`).
    assert job_count(priced) == 0
    assert await left(priced) == 100


async def test_dry_run_in_chinese_with_the_chinese_flag(
    priced: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(priced, invocation("draw", "一只猫 --预览", locale="zh-CN"))
    [answer] = chat.texts()
    assert "1K · auto · 1 张:1 点额度,之后剩 99 点" in answer
    assert "预览" in answer
    assert mock_upstream.requests == [] and job_count(priced) == 0


async def test_dry_run_as_a_typed_option_from_a_slash_command(
    priced: Services, mock_upstream: MockUpstream
) -> None:
    chat = await run_command(
        priced, invocation("edit", "night", options={"dry_run": True, "size": "2k"})
    )
    [answer] = chat.texts()
    assert "2K · auto · 1 image: 3 credits, 97 left after this" in answer
    assert mock_upstream.requests == [] and job_count(priced) == 0


async def test_dry_run_says_when_the_credits_do_not_reach(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    services = await Services.create(settings_factory(prices=PRICES, daily_credits=10))
    try:
        chat = await run_command(
            services, invocation("draw", "fox --size 4k --quality high --n 2 --dry-run")
        )
        assert "16 credits, but you have 10" in chat.last_text()
        assert mock_upstream.requests == []
    finally:
        await services.close()


def test_dry_run_flag_is_taken_out_of_the_prompt_in_every_spelling() -> None:
    for spelled in (
        "a fox --dry-run",
        "a fox --dry_run",
        "--dryrun a fox",
        "a fox —预览",
        "a fox --预览",
    ):
        opts = parse_image_args(spelled, {}, model="gpt-image-2", default_size="auto", max_n=4)
        assert opts.dry_run and opts.prompt == "a fox", spelled
    opts = parse_image_args("a fox", {}, model="gpt-image-2", default_size="auto", max_n=4)
    assert not opts.dry_run


async def test_free_jobs_still_say_what_is_left(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(prices={"default": {"default": 0}}))
    try:
        chat = RecordingChat()
        await run_command(services, invocation("draw", "a fox"), chat)
        assert "1 image: 0 credits, 5 left after this" in chat.texts()[0]
    finally:
        await services.close()


# --- QQ end to end (fake OneBot) ---


@pytest.fixture(scope="module")
async def qq(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with qq_bot(
        tmp_path_factory.mktemp("qq-price"),
        DRAWBRIDGE_DAILY_CREDITS="100",
        DRAWBRIDGE_PRICES=json.dumps(PRICES),
        DRAWBRIDGE_CONFIRM_ABOVE="50",
    ) as bot:
        yield bot


async def test_qq_acknowledgement_says_the_price_and_what_is_left(qq: Running) -> None:
    asked = await _say(qq, next(_users), text("/draw a fox --size 2k"))
    await _until(qq, _results_for(asked))
    [ack] = _texts_for(asked)(qq.onebot.calls)
    assert "2K · auto · 1 image: 3 credits, 97 left after this" in ack.text


async def test_qq_dry_run_in_chinese_answers_the_price_and_runs_nothing(qq: Running) -> None:
    before = len(qq.upstream.requests)
    asked = await _say(qq, next(_users), text("/画 一只猫 --size 4k --quality high --预览"))
    [answer] = await _until(qq, _texts_for(asked))
    assert answer.text.startswith("4K · high · 1 image: 8 credits, 92 left after this")
    assert "nothing was started or charged" in answer.text
    assert len(qq.upstream.requests) == before
    with qq.db() as db:
        prompts = [row[0] for row in db.execute("SELECT prompt FROM jobs")]
    assert "一只猫" not in prompts


# --- Telegram (fake Bot API) ---


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
        )
        services = await Services.create(settings)
        platform = TelegramPlatform(settings, services, flood=FAST, polling_timeout=5)
        await platform.start()
        try:
            yield fake, platform
        finally:
            await platform.stop()
            await services.close()


async def test_telegram_status_says_the_price_and_dry_run_runs_nothing(
    tg: tuple[FakeTelegram, TelegramPlatform], mock_upstream: MockUpstream
) -> None:
    fake, platform = tg
    alice = fake.user(1001)
    chat = fake.private_chat(alice)
    fake.send_message(chat, alice, "/draw a fox --size 2k --dry-run")
    answer = await fake.wait_call("sendMessage")
    assert answer.fields["text"].startswith("2K · auto · 1 image: 3 credits, 97 left after this")
    assert "nothing was started or charged" in answer.fields["text"]
    assert mock_upstream.requests == [] and job_count(platform.services) == 0

    fake.send_message(chat, alice, "/draw a fox --size 2k")
    await fake.wait_call("sendPhoto", where=lambda c: "reply_markup" in c.fields, within=20)
    status = fake.ok_calls("sendMessage")[1]
    assert status.fields["text"].startswith("Drawing")
    assert "2K · auto · 1 image: 3 credits, 97 left after this" in status.fields["text"]


def test_price_line_of_an_automatic_size_and_of_one_credit() -> None:
    assert Quote("auto", "auto", 1, 1, 4).render("en") == (
        "auto · auto · 1 image: 1 credit, 4 left after this"
    )
    assert Quote("4k", "high", 2, 16, 84).render("zh") == "4K · high · 2 张:16 点额度,之后剩 84 点"
