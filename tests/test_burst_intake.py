"""A command's intake asks the store only what it needs (issue 15, the burst of 500 commands).

Every store call of an intake is paid 500 times when 500 commands arrive together, so a /draw
reads its group's rules once and its credits once, after the reservation: the price line then
says what the charge left, also when one user's commands are charged together.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest

from bot.config import Settings
from bot.services import Services
from bot.store import Store
from plugins.dispatch import dispatch
from tests.recording_chat import RecordingChat, invocation, run_command


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """Record, in order, every call of these Store methods."""
    calls: list[str] = []
    for name in names:
        original = getattr(Store, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(Store, name, counted)
    return calls


async def test_a_draw_in_a_group_reads_its_rules_once_and_its_credits_after_the_charge(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(monkeypatch, "group_rules", "credits_of", "group_used", "reserve")
    chat = await run_command(services, invocation("draw", "a fox", chat_id="g1", is_private=False))

    assert chat.results()
    assert calls == ["group_rules", "reserve", "credits_of"]
    assert "4 left after this" in chat.everything()


async def test_commands_arriving_together_say_what_is_left_after_their_charges(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(user_max_jobs=5))
    try:
        chats = [RecordingChat() for _ in range(3)]
        await asyncio.gather(*(dispatch(invocation("draw", "a fox"), c, services) for c in chats))
        await services.jobs.wait_idle()
    finally:
        await services.close()

    said = [
        int(m.group(1))
        for chat in chats
        if (m := re.search(r"(\d+) left after this", chat.everything())) is not None
    ]
    # 5 credits a day. Read after the charge, each says what was left once its own (and any
    # charged with it) was taken; read before it, all three said "4 left" and two were wrong.
    assert len(said) == 3
    assert all(2 <= n <= 4 for n in said)
    assert min(said) == 2


async def test_a_draw_nobody_can_pay_for_is_refused_by_the_reservation_alone(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = await Services.create(settings_factory(daily_credits=0))
    try:
        calls = count_calls(monkeypatch, "credits", "credits_of", "reserve")
        chat = await run_command(services, invocation("draw", "a fox"))

        assert "Not enough credits: this needs 1, you have 0" in chat.last_text()
        assert calls == ["reserve"]
        job = await services.store.job(1)
        assert job is not None
        assert (job.status, job.error_kind) == ("failed", "insufficient_credits")
    finally:
        await services.close()


async def test_a_costly_draw_still_asks_first_with_the_credits_it_would_leave(
    settings_factory: Callable[..., Settings],
) -> None:
    services = await Services.create(settings_factory(daily_credits=20, confirm_above=1))
    try:
        chat = await run_command(services, invocation("draw", "a fox --n 2"))
        assert not chat.results()
        assert "18 left after this" in chat.everything()
    finally:
        await services.close()
