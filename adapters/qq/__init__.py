"""QQ through nonebot2 and the OneBot v11 protocol (NapCat, LLOneBot).

`drawbridge run` with `QQ_ENABLED=true` serves `ws://HOST:PORT/onebot/v11/ws`; point the
OneBot implementation's reverse WebSocket at it, with the same `ONEBOT_ACCESS_TOKEN`.
"""

from __future__ import annotations

from adapters.qq.platform import QQPlatform
from bot.config import Settings
from bot.services import Services

__all__ = ["QQPlatform", "create_platform"]


def create_platform(settings: Settings, services: Services) -> QQPlatform:
    """The QQ platform for `drawbridge run` (the `drawbridge.platforms` entry point)."""
    return QQPlatform(settings, services)
