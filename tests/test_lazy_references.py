"""Discord reference images are lazy: nothing is downloaded for a command the job runner
refuses (a banned user, one over the job limit), while an admitted edit still gets them.

Runs the real Discord adapter against the fake Discord, whose CDN logs every request. (The
QQ side is in tests/test_qq_matcher.py, against a stand-in QQ CDN.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bot.mock_upstream import MockUpstream
from tests import test_discord
from tests.test_discord import Bot, png

# The Discord suite's fixtures, shared rather than copied.
fake_discord = test_discord.fake_discord
start_bot = test_discord.start_bot
bot = test_discord.bot


def _cdn_requests(bot: Bot) -> list[str]:
    return [path for _, path in bot.fake.requests if path.startswith("/cdn/")]


async def test_banned_users_edit_downloads_no_attachment_an_allowed_one_does(
    bot: Bot, mock_upstream: MockUpstream
) -> None:
    user = await bot.services.store.user("discord", str(bot.fake.user.id))
    await bot.services.store.set_role(user.id, "banned")
    first = bot.fake.add_file(png(80, 60, "red"), "cat.png")
    second = bot.fake.add_file(png(60, 80, "blue"), "hat.png")

    refused = await bot.fake.slash("edit", prompt="hat on the cat", image=first, image2=second)
    refusal = await bot.fake.wait_message(lambda m: m.interaction_id == refused.id and m.ephemeral)
    await bot.settle()
    assert refusal.content == bot.t("error.banned")
    assert _cdn_requests(bot) == []
    assert mock_upstream.requests == []

    await bot.services.store.set_role(user.id, "user")
    allowed = await bot.fake.slash("edit", prompt="hat on the cat", image=first, image2=second)
    await bot.result(allowed)
    await bot.settle()
    assert len(_cdn_requests(bot)) == 2
    request = mock_upstream.requests[-1]
    assert sorted((f.width, f.height) for f in request.files) == [(60, 80), (80, 60)]


async def test_edit_over_the_job_limit_downloads_no_attachment(
    start_bot: Callable[..., Awaitable[Bot]], mock_upstream: MockUpstream
) -> None:
    bot = await start_bot(user_max_jobs=1)
    # The first job stays at the upstream until the test ends (teardown cancels it).
    mock_upstream.options.latency = 120
    await bot.fake.slash("draw", prompt="a slow lighthouse")
    async with asyncio.timeout(20):
        while not mock_upstream.requests:  # noqa: ASYNC110 - the mock has no event to wait on
            await asyncio.sleep(0.05)

    file = bot.fake.add_file(png(), "ref.png")
    edit = await bot.fake.slash("edit", prompt="make it blue", image=file)
    answer = await bot.answer(edit, lambda m: m.content == bot.t("error.too_many_jobs", limit=1))
    assert answer.content
    assert _cdn_requests(bot) == []
    assert len(mock_upstream.requests) == 1
