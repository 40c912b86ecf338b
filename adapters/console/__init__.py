"""The operators' web console and /metrics, served by `drawbridge run` (FastAPI + Jinja2 + htmx).

Like a chat platform it is found through the `drawbridge.platforms` entry point `console` and
started when `DRAWBRIDGE_CONSOLE_PASSWORD` is set; it reads and acts through `Services`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.platform import Platform
    from bot.services import Services


def create_platform(settings: Settings, services: Services) -> Platform:
    """The console, ready to `start()`."""
    from adapters.console.platform import ConsolePlatform

    return ConsolePlatform(settings, services)
