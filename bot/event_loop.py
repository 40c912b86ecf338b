"""Which event loop `drawbridge run` runs on: uvloop where it is installed, else asyncio's.

uvloop (libuv under asyncio's API) makes every task switch, timer and socket read cheaper;
in `bench/load.py`'s burst of 500 commands it cut the bot's own overhead (`bench/README.md`).
Every library here runs on it (aiohttp, asyncpg, aiosqlite's thread, uvicorn, discord.py).
`DRAWBRIDGE_EVENT_LOOP=asyncio` is the way back should a platform library ever misbehave on it.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bot.startup import SETTINGS, StartupError

T = TypeVar("T")


def chosen(choice: str) -> str:
    """The loop `choice` (DRAWBRIDGE_EVENT_LOOP) means here: "asyncio" or "uvloop"."""
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise StartupError(
            "DRAWBRIDGE_EVENT_LOOP=uvloop but uvloop is not installed "
            "(pip install uvloop; it has no Windows build), or set it to asyncio",
            exit_code=SETTINGS,
        )
    return choice


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for asyncio.Runner, None for asyncio's own loop."""
    if chosen(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
