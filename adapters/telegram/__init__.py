"""Telegram (aiogram 3): long polling or webhook, every command, results with buttons."""

from __future__ import annotations

from adapters.telegram.flood import FloodPolicy
from adapters.telegram.platform import TelegramPlatform
from bot.config import Settings
from bot.services import Services

__all__ = ["FloodPolicy", "TelegramPlatform", "create_platform"]


def create_platform(settings: Settings, services: Services) -> TelegramPlatform:
    """The Telegram platform for `drawbridge run` (needs `TELEGRAM_BOT_TOKEN`)."""
    return TelegramPlatform(settings, services)
