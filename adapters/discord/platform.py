"""The Discord platform inside `drawbridge run`: a discord.py client on the shared loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import discord
from discord import app_commands

from bot.config import Settings
from bot.platform import Connection
from bot.proxies import aiohttp_connector, proxy_from_setting
from bot.services import Services
from bot.startup import SETTINGS, StartupError

from . import redact
from .attachments import DISCORD_CDN_HOSTS
from .chat import TOKEN_TTL
from .commands import DeclarationTranslator, add_commands, sync
from .intake import DiscordIntake
from .views import ResultButton

log = logging.getLogger(__name__)

DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
"""Discord's upload limit without boosts: assumed when an interaction does not tell its own."""
# Guild channel types whose discord.py objects need a name and a position (text, voice,
# category, news, stage, forum, media).
_NAMED_GUILD_CHANNELS = frozenset({0, 2, 4, 5, 13, 15, 16})
_DM = 1


def normalize_interaction(data: dict[str, Any]) -> dict[str, Any]:
    """An INTERACTION_CREATE payload with the fields discord.py insists on filled in.

    discord.py 2.7 requires `attachment_size_limit` and takes the channel only from the
    partial `channel` object, while a peer may send just the documented `channel_id`, or a
    `channel` without name and position: without this the interaction is lost (or, worse,
    the gateway session with it).
    """
    data = dict(data)
    data.setdefault("attachment_size_limit", DEFAULT_FILESIZE_LIMIT)
    data.setdefault("version", 1)
    guild_id = data.get("guild_id")
    channel = data.get("channel")
    if not isinstance(channel, dict) and data.get("channel_id") is not None:
        channel = {"id": data["channel_id"], "type": 0 if guild_id is not None else _DM}
    if isinstance(channel, dict):
        channel = dict(channel)
        if guild_id is not None and channel.get("type") in _NAMED_GUILD_CHANNELS:
            channel.setdefault("name", "")
            channel.setdefault("position", 0)
        data["channel"] = channel
    return data


def guard_interaction_parser(parsers: dict[str, Callable[[Any], None]]) -> None:
    """Wrap discord.py's INTERACTION_CREATE parser: normalized input, and an event it cannot
    read is logged and dropped (an exception there would end the whole gateway session)."""
    parse = parsers["INTERACTION_CREATE"]

    def parse_interaction(data: Any) -> None:
        try:
            parse(normalize_interaction(data) if isinstance(data, dict) else data)
        except Exception:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            log.exception("discord: dropped an interaction discord.py could not read: %s", keys)

    parsers["INTERACTION_CREATE"] = parse_interaction


class DrawbridgeClient(discord.Client):
    """discord.py's client with our command tree and intake attached."""

    def __init__(
        self,
        intake: DiscordIntake,
        *,
        guild_ready_timeout: float,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        # The bot never joins voice: skip discord.py's warnings about voice libraries.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(
            # Slash commands, buttons and menus need no privileged intents (no message content).
            intents=discord.Intents(guilds=True),
            # A prompt echoed in a caption must never ping @everyone or anyone else.
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=guild_ready_timeout,
            # REST and the gateway's WebSocket share this connector's session in discord.py.
            connector=connector,
        )
        self.intake = intake
        self.tree: app_commands.CommandTree[DrawbridgeClient] = app_commands.CommandTree(self)
        # The gateway reads events through this very dict (`ws._discord_parsers`).
        guard_interaction_parser(self._connection.parsers)

    async def setup_hook(self) -> None:
        # Buttons of results sent before a restart still work: matched by custom id.
        self.add_dynamic_items(ResultButton)


class DiscordPlatform:
    """Connects with `DISCORD_BOT_TOKEN`, syncs slash commands, serves interactions."""

    name = "discord"

    def __init__(
        self,
        settings: Settings,
        services: Services,
        *,
        cdn_hosts: Sequence[str] = DISCORD_CDN_HOSTS,
        token_ttl: float = TOKEN_TTL,
        ready_timeout: float = 60.0,
        # Only the guilds intent: no member chunking to wait for after the last guild.
        guild_ready_timeout: float = 0.5,
    ) -> None:
        self.settings = settings
        self.services = services
        self.intake = DiscordIntake(services, cdn_hosts=cdn_hosts, token_ttl=token_ttl)
        self._ready_timeout = ready_timeout
        self._guild_ready_timeout = guild_ready_timeout
        self.client: DrawbridgeClient | None = None
        self._connection: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Log in, publish the commands, connect to the gateway; return once ready."""
        redact.install()
        client = DrawbridgeClient(
            self.intake,
            guild_ready_timeout=self._guild_ready_timeout,
            connector=self._proxy_connector(),
        )
        self.client = client
        add_commands(client.tree, self.services, self.intake.on_slash, self.intake.on_edit_image)
        await client.tree.set_translator(DeclarationTranslator(self.services))
        try:
            await self._login(client)
            await self._sync(client)
            self._connection = asyncio.create_task(client.connect(), name="discord-gateway")
            try:
                await self._wait_ready(client, self._connection)
            except (
                TimeoutError,
                ConnectionError,
                discord.DiscordException,
                aiohttp.ClientError,
            ) as exc:
                raise StartupError(
                    f"Discord's gateway did not connect ({type(exc).__name__}): check the "
                    "network, DISCORD_PROXY" + self._setting_hint("discord_gateway_url")
                ) from None
        except BaseException:
            await self.stop()
            raise
        log.info("discord: logged in as %s (%d guilds)", client.user, len(client.guilds))

    async def _login(self, client: DrawbridgeClient) -> None:
        """Log in with the token; failures the operator can act on become one line."""
        try:
            await client.login(self.settings.discord_bot_token)
        except discord.LoginFailure:
            raise StartupError(
                "Discord refused DISCORD_BOT_TOKEN (401 Unauthorized): check the bot token "
                "from the developer portal" + self._setting_hint("discord_api_base"),
                exit_code=SETTINGS,
            ) from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise StartupError(
                f"cannot reach Discord's API ({type(exc).__name__}): check the network and "
                "DISCORD_PROXY" + self._setting_hint("discord_api_base")
            ) from None
        except discord.HTTPException as exc:
            raise StartupError(
                f"Discord's API refused the login (HTTP {exc.status})"
                + self._setting_hint("discord_api_base")
            ) from None

    def _setting_hint(self, field: str) -> str:
        # Named only when set: an unset one cannot be the cause.
        if not getattr(self.settings, field):
            return ""
        return " and " + (
            "DISCORD_API_BASE" if field == "discord_api_base" else "DISCORD_GATEWAY_URL"
        )

    def _proxy_connector(self) -> aiohttp.BaseConnector | None:
        """`DISCORD_PROXY` as a connector: every connection tunnels through it.

        discord.py's own `proxy=` would do for http proxies only; a connector serves socks5
        too, and one code path for all three schemes keeps them alike.
        """
        proxy = proxy_from_setting(self.settings.discord_proxy)
        if proxy is None:
            return None
        log.info("discord: connecting through %s", proxy.address)
        # limit=0 as discord.py's own connector: no cap on parallel requests.
        return aiohttp_connector(proxy, limit=0)

    async def notify(self, chat_id: str, text: str) -> None:
        """Post a message in a channel (chat ids are channel ids)."""
        if self.client is None:
            raise RuntimeError("discord is not connected")
        channel = self.client.get_channel(int(chat_id)) or await self.client.fetch_channel(
            int(chat_id)
        )
        if not isinstance(channel, discord.abc.Messageable):
            raise RuntimeError(f"channel {chat_id} cannot take messages")
        await channel.send(text, allowed_mentions=discord.AllowedMentions.none())

    def connection(self) -> Connection:
        """Connected while the client is ready, not closed, and its gateway WebSocket open.

        discord.py keeps `is_ready()` true while it reconnects by itself: the socket says
        whether events can arrive now.
        """
        client = self.client
        if client is None or client.is_closed():
            return Connection(False, "client closed")
        if not client.is_ready():
            return Connection(False, "gateway not ready")
        gateway = client.ws
        if gateway is None or not gateway.open:
            return Connection(False, "gateway reconnecting")
        return Connection(True, f"gateway ready, {len(client.guilds)} guilds")

    async def wait_ended(self) -> None:
        """Return if the gateway connection gives up (discord.py reconnects by itself)."""
        if self._connection is not None:
            await asyncio.wait({self._connection})

    async def _sync(self, client: DrawbridgeClient) -> None:
        guilds = self.settings.discord_guilds()
        try:
            count = await sync(client.tree, guilds)
        except discord.HTTPException as exc:
            # The bot can still answer buttons and commands synced earlier.
            log.warning("discord: could not sync slash commands: HTTP %s", exc.status)
            return
        where = f"guilds {', '.join(map(str, guilds))}" if guilds else "globally"
        log.info("discord: synced %d commands %s", count, where)

    async def _wait_ready(self, client: DrawbridgeClient, connection: asyncio.Task[None]) -> None:
        ready = asyncio.create_task(client.wait_until_ready())
        try:
            done, _ = await asyncio.wait(
                {ready, connection},
                timeout=self._ready_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
        if ready in done:
            return
        if connection in done:
            connection.result()  # re-raises why the gateway gave up
            raise ConnectionError("discord gateway closed before ready")
        raise TimeoutError(f"discord not ready after {self._ready_timeout:.0f}s")

    async def stop(self) -> None:
        """Refuse new interactions, cancel hand-overs in progress, disconnect."""
        await self.intake.close()
        client, self.client = self.client, None
        if client is not None:
            await client.close()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(connection, timeout=10)
