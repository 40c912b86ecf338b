"""`drawbridge run`'s supervision: signals stop it cleanly, a platform dying stops it loudly."""

from __future__ import annotations

import asyncio

from bot.runner import _serve_until_stopped


class FakePlatform:
    """A platform whose connection ends after `lifetime` seconds (None: never)."""

    def __init__(self, name: str, lifetime: float | None) -> None:
        self.name = name
        self.lifetime = lifetime

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

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
