"""DRAWBRIDGE_EVENT_LOOP: which loop `drawbridge run` runs on (tests/test_telegram_run.py runs
it both ways for real)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from bot import event_loop
from bot.startup import SETTINGS, StartupError


def test_auto_is_uvloop_where_installed_and_asyncio_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert event_loop.chosen("auto") == "uvloop"  # a dependency off Windows
    assert event_loop.chosen("asyncio") == "asyncio"
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "uvloop" else found(name)
    )
    assert event_loop.chosen("auto") == "asyncio"
    with pytest.raises(StartupError) as refused:
        event_loop.chosen("uvloop")
    assert refused.value.exit_code == SETTINGS
    assert "DRAWBRIDGE_EVENT_LOOP" in str(refused.value)


def test_run_runs_on_the_chosen_loop_and_closes_what_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert event_loop.run(loop_module(), "uvloop") == "uvloop"
    assert event_loop.run(loop_module(), "asyncio") == "asyncio"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    never_run = loop_module()
    with pytest.raises(StartupError):
        event_loop.run(never_run, "uvloop")
    # Closed, not left to warn "coroutine ... was never awaited" at exit.
    assert never_run.cr_frame is None
