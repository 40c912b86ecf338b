"""`drawbridge run`'s supervision: signals stop it cleanly, a platform dying stops it loudly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bot.config import Settings
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.runner import _serve_until_stopped, announce_recovered
from bot.services import Services


class FakePlatform:
    """A platform whose connection ends after `lifetime` seconds (None: never)."""

    def __init__(self, name: str, lifetime: float | None) -> None:
        self.name = name
        self.lifetime = lifetime
        self.told: list[tuple[str, str]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def notify(self, chat_id: str, text: str) -> None:
        self.told.append((chat_id, text))

    async def wait_ended(self) -> None:
        if self.lifetime is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(self.lifetime)


async def test_a_signal_stops_with_exit_code_0() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    code = await _serve_until_stopped(stop, [FakePlatform("telegram", None)])
    assert code == 0


async def test_a_platform_that_ends_by_itself_stops_with_exit_code_1(caplog) -> None:  # type: ignore[no-untyped-def]
    healthy, dying = FakePlatform("telegram", None), FakePlatform("discord", 0.05)
    code = await asyncio.wait_for(_serve_until_stopped(asyncio.Event(), [healthy, dying]), 5)
    assert code == 1
    assert "discord stopped by itself" in caplog.text


async def test_chats_of_jobs_a_crash_interrupted_are_told_after_restart(
    settings_factory: Callable[..., Settings], mock_upstream: MockUpstream
) -> None:
    settings = settings_factory(default_lang="en")
    services = await Services.create(settings)
    store = services.store
    user = await store.user("test", "u1")
    await store.set_lang(user.id, "zh")
    job = await store.create_job(
        user_id=user.id,
        platform="test",
        chat_id="c9",
        group_key=None,
        kind="draw",
        prompt="a fox in the snow",
        options={},
        ref_count=0,
        own_key=False,
    )
    await store.reserve(job, user_id=user.id, cost=1, day=today(settings), daily_allowance=5)
    await store.mark_running(job, "default")
    await services.close(grace=0)  # as if the process died here: the job stays "running"

    services = await Services.create(settings)
    try:
        assert services.recovered == [job]
        platform = FakePlatform("test", None)
        assert await announce_recovered(services, [platform, FakePlatform("other", None)]) == 1
        [(chat_id, text)] = platform.told
        assert chat_id == "c9" and "a fox in the snow" in text and "额度已退还" in text
    finally:
        await services.close()
