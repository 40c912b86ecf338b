"""Discord: slash commands, an "Edit image" context menu and result buttons (discord.py 2).

On when `DISCORD_BOT_TOKEN` is set. Commands come from `plugins.registry`; everything a
command does happens in the plugins, reached through `plugins.dispatch.dispatch`.
"""

from __future__ import annotations

import discord.http
import yarl
from discord.gateway import DiscordWebSocket

from bot.config import Settings
from bot.platform import Platform
from bot.services import Services

from .platform import DiscordPlatform

__all__ = ["DiscordPlatform", "create_platform"]


def create_platform(settings: Settings, services: Services) -> Platform:
    """The factory `drawbridge run` calls for Discord.

    `DISCORD_API_BASE` / `DISCORD_GATEWAY_URL` point discord.py at a proxy or a test double;
    discord.py keeps both as class attributes, and one process runs one Discord client.
    """
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    return DiscordPlatform(settings, services)
