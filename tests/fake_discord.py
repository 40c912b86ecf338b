"""A fake Discord for tests: REST API, gateway and CDN in one aiohttp app on 127.0.0.1.

discord.py is pointed at it through `discord.http.Route.BASE` (REST and interaction webhooks)
and `DiscordWebSocket.DEFAULT_GATEWAY`; attachment URLs in the payloads it sends point at its
own CDN route. It speaks just enough of the real protocol for a bot built on discord.py:

- gateway: HELLO, heartbeats, IDENTIFY -> READY + GUILD_CREATE, then INTERACTION_CREATE
  events pushed by a test (slash commands, message context menus, button clicks, modals);
- REST: users/@me, the application, /gateway(/bot), command sync (global and per guild),
  the interaction callback, followup webhooks and `@original` edits (JSON or multipart with
  `payload_json` + `files[n]`), channel messages;
- the CDN serves attachment bytes, with the content type they were registered with.

Every JSON answer carries `Content-Type: application/json` exactly: discord.py only decodes
bodies with that header. Uploads over the interaction's `attachment_size_limit` or more than
10 files are refused as Discord refuses them, so a bot that ignores the limits fails here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import mimetypes
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

MIB = 1024 * 1024
DISCORD_EPOCH_MS = 1420070400000
MAX_FILES = 10

OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_RESUME = 6
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

# Interaction types and callback types (Discord API numbering).
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
MODAL_SUBMIT = 5
CB_MESSAGE = 4
CB_DEFERRED_MESSAGE = 5
CB_DEFERRED_UPDATE = 6
CB_UPDATE_MESSAGE = 7
CB_MODAL = 9

FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

# Application command option types.
OPTION_TYPES = {"string": 3, "integer": 4, "boolean": 5, "attachment": 11}

T = TypeVar("T")

_counter = itertools.count(1)


def snowflake() -> int:
    """A fresh, increasing Discord id carrying the current time."""
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(_counter) & 0x3FFFFF)


def _json_response(data: Any, status: int = 200) -> web.Response:
    # Built by hand: aiohttp's json_response appends "; charset=utf-8", which discord.py
    # does not recognise as JSON.
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _json_response({"code": code, "message": message}, status=status)


@dataclass(slots=True)
class FakeUser:
    """A Discord user as the fake sends it."""

    id: int
    username: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username.title(),
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }


@dataclass(slots=True)
class FakeAttachment:
    """A file stored on the fake CDN (uploaded by the bot or registered by a test)."""

    id: int
    filename: str
    data: bytes
    content_type: str
    url: str
    # Reported size; a test may claim more than it stores to check byte caps.
    size: int

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }


@dataclass(slots=True)
class FakeMessage:
    """A message in a channel of the fake (a bot answer, a followup, or a user's post)."""

    id: int
    channel_id: int
    author: FakeUser
    content: str = ""
    attachments: list[FakeAttachment] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    flags: int = 0
    # How the bot made it: "original", "followup", "channel", or "user" for a test's post.
    via: str = "channel"
    interaction_id: int | None = None
    deleted: bool = False
    edits: int = 0
    # Every state the message went through, oldest first (content, filenames).
    history: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    @property
    def filenames(self) -> list[str]:
        return [a.filename for a in self.attachments]

    def buttons(self) -> list[dict[str, Any]]:
        """All buttons on the message, in order."""
        found: list[dict[str, Any]] = []
        for row in self.components:
            for child in row.get("components", []):
                if child.get("type") == 2:
                    found.append(child)
        return found

    def snapshot(self) -> None:
        self.history.append((self.content, tuple(self.filenames)))

    def payload(self, guild_id: int | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "author": self.author.payload(),
            "content": self.content,
            "timestamp": "2025-01-01T00:00:00+00:00",
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload() for a in self.attachments],
            "embeds": [],
            "pinned": False,
            "type": 0 if self.interaction_id is None else 20,
            "flags": self.flags,
            "components": self.components,
        }
        if guild_id is not None:
            data["guild_id"] = str(guild_id)
        return data


@dataclass(slots=True)
class FakeInteraction:
    """One interaction the fake sent, and what the bot answered to it."""

    id: int
    token: str
    type: int
    payload: dict[str, Any]
    channel_id: int
    user: FakeUser
    callback_type: int | None = None
    callback_data: dict[str, Any] = field(default_factory=dict)
    original_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    # When True, webhook calls with this token fail as after Discord's 15 minutes.
    expired: bool = False

    @property
    def modal(self) -> dict[str, Any] | None:
        """The modal the bot opened in answer, if it did."""
        return self.callback_data if self.callback_type == CB_MODAL else None

    def modal_inputs(self) -> list[dict[str, Any]]:
        """The text inputs of the opened modal, in order (each has custom_id and label)."""
        if self.modal is None:
            return []
        inputs: list[dict[str, Any]] = []

        def walk(components: Iterable[dict[str, Any]]) -> None:
            for component in components:
                if component.get("type") == 4:
                    inputs.append(component)
                walk(component.get("components", []))
                if "component" in component:
                    walk([component["component"]])

        walk(self.modal.get("components", []))
        return inputs


@dataclass(slots=True)
class _Connection:
    ws: web.WebSocketResponse
    seq: int = 0
    identified: bool = False


class FakeDiscord:
    """The fake Discord server. Start it, point discord.py at it, drive it from a test."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        attachment_size_limit: int = 10 * MIB,
        guild_ready: bool = True,
    ) -> None:
        self.token = token
        self.attachment_size_limit = attachment_size_limit
        self.guild_ready = guild_ready
        # False: interaction callbacks get "204 No Content", as Discord answers them without
        # `with_response` and as a minimal peer may answer them always.
        self.callback_with_body = True
        # False: followups get "204 No Content" even when the bot asked to `wait` for them.
        self.followup_with_body = True
        self.application_id = snowflake()
        self.bot = FakeUser(self.application_id, "drawbridge", bot=True)
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.user = FakeUser(snowflake(), "alice")
        self.other_user = FakeUser(snowflake(), "bob")
        # The member permissions interactions carry, by user id (Manage Server is 1 << 5).
        self.permissions: dict[int, int] = {}

        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.identifies: list[dict[str, Any]] = []
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.files: dict[int, FakeAttachment] = {}

        self._connections: list[_Connection] = []
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """What `discord.http.Route.BASE` should be."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """What `DiscordWebSocket.DEFAULT_GATEWAY` should be."""
        return self.base_url.replace("http://", "ws://", 1) + "/gateway"

    async def start(self) -> str:
        """Serve on 127.0.0.1 on a free port; return the base URL."""
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * MIB)
        app.middlewares.append(self._record)
        api = "/api/v10"
        routes = [
            web.get("/gateway", self._gateway),
            web.get("/cdn/attachments/{file_id}/{filename}", self._cdn),
            web.get(api + "/users/@me", self._me),
            web.get(api + "/oauth2/applications/@me", self._application),
            web.get(api + "/gateway", self._gateway_url),
            web.get(api + "/gateway/bot", self._gateway_url),
            web.put(api + "/applications/{app}/commands", self._sync_commands),
            web.put(api + "/applications/{app}/guilds/{guild}/commands", self._sync_commands),
            web.get(api + "/applications/{app}/commands", self._list_commands),
            web.get(api + "/applications/{app}/guilds/{guild}/commands", self._list_commands),
            web.post(api + "/interactions/{id}/{token}/callback", self._callback),
            web.post(api + "/webhooks/{app}/{token}", self._followup),
            web.get(api + "/webhooks/{app}/{token}/messages/{message}", self._webhook_get),
            web.patch(api + "/webhooks/{app}/{token}/messages/{message}", self._webhook_edit),
            web.delete(api + "/webhooks/{app}/{token}/messages/{message}", self._webhook_delete),
            web.post(api + "/channels/{channel}/messages", self._channel_send),
            web.get(api + "/channels/{channel}/messages/{message}", self._channel_get),
            web.patch(api + "/channels/{channel}/messages/{message}", self._channel_edit),
            web.delete(api + "/channels/{channel}/messages/{message}", self._channel_delete),
            web.post(api + "/channels/{channel}/typing", self._typing),
        ]
        app.add_routes(routes)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- waiting -----------------------------------------------------------------------

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, check: Callable[[], T | None], within: float = 10.0) -> T:
        """Wait until `check()` returns something truthy, and return it."""
        assert self._changed is not None
        async with asyncio.timeout(within):
            async with self._changed:
                while True:
                    value = check()
                    if value:
                        return value
                    await self._changed.wait()

    async def wait_identified(self, within: float = 10.0) -> dict[str, Any]:
        """The IDENTIFY payload of the bot's (first) gateway session."""
        return await self.wait_for(lambda: self.identifies[0] if self.identifies else None, within)

    def channel_messages(self, *, include_deleted: bool = False) -> list[FakeMessage]:
        """Messages in the channel, oldest first."""
        return [
            m
            for m in sorted(self.messages.values(), key=lambda m: m.id)
            if include_deleted or not m.deleted
        ]

    async def wait_message(
        self, check: Callable[[FakeMessage], bool], within: float = 10.0
    ) -> FakeMessage:
        """The first live message for which `check` holds, waiting for it to appear."""

        def find() -> FakeMessage | None:
            for message in self.channel_messages():
                if check(message):
                    return message
            return None

        return await self.wait_for(find, within)

    # --- what a test does as a user ----------------------------------------------------

    def add_file(
        self,
        data: bytes,
        filename: str,
        content_type: str | None = None,
        *,
        size: int | None = None,
    ) -> FakeAttachment:
        """Put a file on the fake CDN (as if a user had uploaded it)."""
        file_id = snowflake()
        mime = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        attachment = FakeAttachment(
            id=file_id,
            filename=filename,
            data=data,
            content_type=mime,
            url=f"{self.base_url}/cdn/attachments/{file_id}/{filename}",
            size=len(data) if size is None else size,
        )
        self.files[file_id] = attachment
        return attachment

    def post_user_message(
        self,
        content: str = "",
        attachments: Iterable[FakeAttachment] = (),
        *,
        user: FakeUser | None = None,
    ) -> FakeMessage:
        """A message a user posted in the channel (the target of a context menu, say)."""
        message = FakeMessage(
            id=snowflake(),
            channel_id=self.channel_id,
            author=user or self.user,
            content=content,
            attachments=list(attachments),
            via="user",
        )
        self.messages[message.id] = message
        return message

    async def slash(
        self,
        name: str,
        *,
        user: FakeUser | None = None,
        locale: str = "en-US",
        attachment_size_limit: int | None = None,
        omit: Iterable[str] = (),
        **options: Any,
    ) -> FakeInteraction:
        """Invoke a synced slash command; `FakeAttachment` values become attachment options.

        `omit` drops top-level fields from the event, as a minimal peer might not send them."""
        command = self.command(name)
        types = {opt["name"]: opt["type"] for opt in command.get("options", [])}
        data_options: list[dict[str, Any]] = []
        resolved: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            if key not in types:
                raise KeyError(f"/{name} has no option {key!r}: {sorted(types)}")
            if isinstance(value, FakeAttachment):
                resolved[str(value.id)] = value.payload()
                value = str(value.id)
            data_options.append({"name": key, "type": types[key], "value": value})
        data: dict[str, Any] = {
            "id": command["id"],
            "name": name,
            "type": 1,
            "options": data_options,
            "guild_id": str(self.guild_id),
        }
        if resolved:
            data["resolved"] = {"attachments": resolved}
        return await self._interact(
            APPLICATION_COMMAND,
            data,
            user=user,
            locale=locale,
            attachment_size_limit=attachment_size_limit,
            omit=omit,
        )

    async def message_command(
        self, name: str, target: FakeMessage, *, user: FakeUser | None = None, locale: str = "en-US"
    ) -> FakeInteraction:
        """Use a message context menu command ("Apps > name") on `target`."""
        command = self.command(name, kind=3)
        data = {
            "id": command["id"],
            "name": name,
            "type": 3,
            "target_id": str(target.id),
            "guild_id": str(self.guild_id),
            "resolved": {"messages": {str(target.id): target.payload(self.guild_id)}},
        }
        return await self._interact(APPLICATION_COMMAND, data, user=user, locale=locale)

    async def click(
        self,
        message: FakeMessage,
        custom_id: str,
        *,
        user: FakeUser | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Press the button `custom_id` on `message`."""
        if not any(b.get("custom_id") == custom_id for b in message.buttons()):
            raise KeyError(f"no button {custom_id!r} on message {message.id}")
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interact(
            MESSAGE_COMPONENT, data, user=user, locale=locale, message=message
        )

    async def submit_modal(
        self,
        opened_by: FakeInteraction,
        *values: str,
        user: FakeUser | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Fill the modal the bot opened in answer to `opened_by` (text inputs in order)."""
        modal = opened_by.modal
        if modal is None:
            raise AssertionError(f"interaction {opened_by.id} got no modal")
        inputs = opened_by.modal_inputs()
        if len(values) > len(inputs):
            raise AssertionError(f"modal has {len(inputs)} inputs, got {len(values)} values")
        answers = {i["custom_id"]: v for i, v in zip(inputs, values, strict=False)}
        rows: list[dict[str, Any]] = []
        # The submit mirrors the modal's layout: a Label (type 18) holds one component, a
        # legacy action row (type 1) a list of them.
        for top in modal.get("components", []):
            if top.get("type") == 18:
                inner = top["component"]
                if inner.get("custom_id") in answers:
                    value = {"type": 4, "custom_id": inner["custom_id"]}
                    value["value"] = answers[inner["custom_id"]]
                    rows.append({"type": 18, "id": top.get("id"), "component": value})
            elif top.get("type") == 1:
                row = [
                    {"type": 4, "custom_id": c["custom_id"], "value": answers[c["custom_id"]]}
                    for c in top.get("components", [])
                    if c.get("custom_id") in answers
                ]
                rows.append({"type": 1, "components": row})
        data = {"custom_id": modal["custom_id"], "components": rows}
        message = None
        if opened_by.type == MESSAGE_COMPONENT:
            message_id = int(opened_by.payload["message"]["id"])
            message = self.messages.get(message_id)
        return await self._interact(
            MODAL_SUBMIT, data, user=user or opened_by.user, locale=locale, message=message
        )

    def command(self, name: str, kind: int = 1) -> dict[str, Any]:
        """A synced command by name (guild commands first, then global)."""
        for scope in (self.guild_id, None):
            for command in self.commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == kind:
                    return command
        raise KeyError(f"command {name!r} (type {kind}) was not synced")

    async def _interact(
        self,
        kind: int,
        data: dict[str, Any],
        *,
        user: FakeUser | None,
        locale: str,
        message: FakeMessage | None = None,
        attachment_size_limit: int | None = None,
        omit: Iterable[str] = (),
    ) -> FakeInteraction:
        user = user or self.user
        interaction_id = snowflake()
        token = f"itoken-{interaction_id}"
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "token": token,
            "version": 1,
            "data": data,
            "guild_id": str(self.guild_id),
            "channel_id": str(self.channel_id),
            "channel": self._channel_payload(),
            "member": {
                "user": user.payload(),
                "roles": [],
                "joined_at": "2024-01-01T00:00:00+00:00",
                "deaf": False,
                "mute": False,
                "flags": 0,
                "pending": False,
                "nick": None,
                "permissions": str(self.permissions.get(user.id, 2248473465835073)),
            },
            "locale": locale,
            "guild_locale": "en-US",
            "app_permissions": "2248473465835073",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0,
            "attachment_size_limit": attachment_size_limit or self.attachment_size_limit,
        }
        if message is not None:
            payload["message"] = message.payload(self.guild_id)
        sent = {k: v for k, v in payload.items() if k not in set(omit)}
        interaction = FakeInteraction(
            id=interaction_id,
            token=token,
            type=kind,
            payload=payload,
            channel_id=self.channel_id,
            user=user,
        )
        self.interactions[interaction_id] = interaction
        await self.dispatch("INTERACTION_CREATE", sent)
        return interaction

    async def dispatch(self, event: str, data: Mapping[str, Any]) -> None:
        """Send a gateway DISPATCH event to every identified session."""
        live = [c for c in self._connections if c.identified and not c.ws.closed]
        if not live:
            raise AssertionError("no identified gateway session to dispatch to")
        for conn in live:
            await self._send_event(conn, event, data)

    # --- gateway -------------------------------------------------------------------------

    def _channel_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.channel_id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": "images",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }

    def _guild_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.guild_id),
            "name": "Test Guild",
            "icon": None,
            "owner_id": str(self.user.id),
            "unavailable": False,
            "member_count": 3,
            "large": False,
            "joined_at": "2024-01-01T00:00:00+00:00",
            "features": [],
            "roles": [
                {
                    "id": str(self.guild_id),
                    "name": "@everyone",
                    "permissions": "2248473465835073",
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ],
            "channels": [self._channel_payload()],
            "members": [
                {
                    "user": self.bot.payload(),
                    "roles": [],
                    "joined_at": "2024-01-01T00:00:00+00:00",
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                }
            ],
            "threads": [],
            "emojis": [],
            "stickers": [],
            "voice_states": [],
            "presences": [],
            "preferred_locale": "en-US",
            "premium_tier": 0,
        }

    async def _send_event(self, conn: _Connection, event: str, data: Mapping[str, Any]) -> None:
        conn.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": conn.seq, "d": data}
        await conn.ws.send_str(json.dumps(frame))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = _Connection(ws)
        self._connections.append(conn)
        await ws.send_str(json.dumps({"op": OP_HELLO, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op = frame.get("op")
                if op == OP_HEARTBEAT:
                    await ws.send_str(json.dumps({"op": OP_HEARTBEAT_ACK}))
                elif op == OP_IDENTIFY:
                    await self._identify(conn, frame["d"])
                elif op == OP_RESUME:
                    conn.identified = True
                    await self._send_event(conn, "RESUMED", {})
        finally:
            self._connections.remove(conn)
            await self._notify()
        return ws

    async def _identify(self, conn: _Connection, data: dict[str, Any]) -> None:
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identifies.append(data)
        conn.identified = True
        ready = {
            "v": 10,
            "user": self.bot.payload(),
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": f"session-{snowflake()}",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
        }
        await self._send_event(conn, "READY", ready)
        if self.guild_ready:
            await self._send_event(conn, "GUILD_CREATE", self._guild_payload())
        await self._notify()

    # --- REST: identity and commands -----------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        path = request.path
        if path.startswith("/api/") and not path.startswith("/api/v10/interactions/"):
            is_webhook = path.startswith("/api/v10/webhooks/")
            if not is_webhook and request.headers.get("Authorization") != f"Bot {self.token}":
                return _error(401, 0, "401: Unauthorized")
        return await handler(request)

    async def _unknown(self, request: web.Request) -> web.Response:
        self.unhandled.append((request.method, request.path))
        return _error(404, 0, "404: Not Found")

    async def _me(self, request: web.Request) -> web.Response:
        return _json_response({**self.bot.payload(), "verified": True, "mfa_enabled": False})

    async def _application(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "id": str(self.application_id),
                "name": "drawbridge",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.user.payload(),
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
                "summary": "",
            }
        )

    async def _gateway_url(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def _sync_commands(self, request: web.Request) -> web.Response:
        guild = request.match_info.get("guild")
        scope = int(guild) if guild else None
        body = await request.json()
        synced = []
        for command in body:
            synced.append(
                {
                    # Discord answers with every field, "" descriptions for context menus.
                    "description": "",
                    "options": [],
                    **command,
                    "id": str(snowflake()),
                    "application_id": str(self.application_id),
                    "version": str(snowflake()),
                    **({"guild_id": guild} if guild else {}),
                }
            )
        self.commands[scope] = synced
        await self._notify()
        return _json_response(synced)

    async def _list_commands(self, request: web.Request) -> web.Response:
        guild = request.match_info.get("guild")
        return _json_response(self.commands.get(int(guild) if guild else None, []))

    async def _cdn(self, request: web.Request) -> web.Response:
        attachment = self.files.get(int(request.match_info["file_id"]))
        if attachment is None:
            return web.Response(status=404)
        return web.Response(body=attachment.data, headers={"Content-Type": attachment.content_type})

    async def _typing(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    # --- REST: messages ----------------------------------------------------------------

    async def _read_message_body(
        self, request: web.Request
    ) -> tuple[dict[str, Any], dict[int, tuple[str, bytes]]]:
        """The JSON payload and the uploaded files (by index) of a message request."""
        if request.content_type.startswith("multipart/"):
            payload: dict[str, Any] = {}
            files: dict[int, tuple[str, bytes]] = {}
            reader = await request.multipart()
            async for part in reader:
                name = part.name or ""  # type: ignore[union-attr]
                body = await part.read(decode=False)  # type: ignore[union-attr]
                if name == "payload_json":
                    payload = json.loads(body)
                elif name.startswith("files["):
                    files[int(name[6:-1])] = (part.filename or f"file{len(files)}", body)  # type: ignore[union-attr]
            return payload, files
        if request.can_read_body:
            return await request.json(), {}
        return {}, {}

    def _check_upload(
        self, files: Mapping[int, tuple[str, bytes]], limit: int
    ) -> web.Response | None:
        if len(files) > MAX_FILES:
            return _error(400, 50035, "Invalid Form Body: too many attachments")
        for filename, data in files.values():
            if len(data) > limit:
                return _error(413, 40005, f"Request entity too large: {filename}")
        return None

    def _store_upload(self, filename: str, data: bytes) -> FakeAttachment:
        return self.add_file(data, filename)

    def _apply(
        self,
        message: FakeMessage,
        payload: Mapping[str, Any],
        files: Mapping[int, tuple[str, bytes]],
        *,
        creating: bool,
    ) -> None:
        """Apply a create or edit payload to `message` the way Discord does."""
        if "content" in payload:
            message.content = payload["content"] or ""
        if "components" in payload:
            message.components = payload["components"] or []
        if creating and "flags" in payload and payload["flags"] is not None:
            message.flags |= int(payload["flags"]) & FLAG_EPHEMERAL
        if "attachments" in payload:
            kept = {a.id: a for a in message.attachments}
            new: list[FakeAttachment] = []
            for item in payload["attachments"] or []:
                item_id = int(item["id"])
                if item_id in kept:
                    new.append(kept[item_id])
                elif item_id in files:
                    new.append(self._store_upload(*files[item_id]))
            message.attachments = new
        elif files:
            message.attachments = message.attachments + [
                self._store_upload(*files[i]) for i in sorted(files)
            ]
        if not creating:
            message.edits += 1
            # Once edited with content, a deferred "thinking" message stops loading.
            message.flags &= ~FLAG_LOADING
        message.snapshot()

    def _interaction_by_token(self, token: str) -> FakeInteraction | None:
        for interaction in self.interactions.values():
            if interaction.token == token:
                return interaction
        return None

    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(int(request.match_info["id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            return _error(404, 10062, "Unknown interaction")
        if interaction.callback_type is not None:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        payload, files = await self._read_message_body(request)
        problem = self._check_upload(files, self._limit_of(interaction))
        if problem is not None:
            return problem
        kind = int(payload["type"])
        data = payload.get("data") or {}
        interaction.callback_type = kind
        interaction.callback_data = data
        resource: dict[str, Any] = {"type": kind}
        message: FakeMessage | None = None
        if kind in (CB_MESSAGE, CB_DEFERRED_MESSAGE):
            message = FakeMessage(
                id=snowflake(),
                channel_id=interaction.channel_id,
                author=self.bot,
                via="original",
                interaction_id=interaction.id,
            )
            if kind == CB_DEFERRED_MESSAGE:
                message.flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
                message.snapshot()
            else:
                self._apply(message, data, files, creating=True)
            self.messages[message.id] = message
            interaction.original_id = message.id
            resource["message"] = message.payload(self.guild_id)
        elif kind == CB_UPDATE_MESSAGE:
            target = self._component_message(interaction)
            if target is not None:
                self._apply(target, data, files, creating=False)
        await self._notify()
        answer: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.type,
                "response_message_id": str(message.id) if message else None,
                "response_message_loading": kind == CB_DEFERRED_MESSAGE,
                "response_message_ephemeral": bool(message and message.ephemeral),
            }
        }
        if kind != CB_DEFERRED_UPDATE:
            answer["resource"] = resource
        if not self.callback_with_body:
            return web.Response(status=204)
        return _json_response(answer)

    def _component_message(self, interaction: FakeInteraction) -> FakeMessage | None:
        raw = interaction.payload.get("message")
        return self.messages.get(int(raw["id"])) if raw else None

    def _limit_of(self, interaction: FakeInteraction | None) -> int:
        if interaction is None:
            return self.attachment_size_limit
        return int(interaction.payload.get("attachment_size_limit", self.attachment_size_limit))

    def _webhook_interaction(self, request: web.Request) -> FakeInteraction | web.Response:
        if request.match_info["app"] != str(self.application_id):
            return _error(404, 10015, "Unknown Webhook")
        interaction = self._interaction_by_token(request.match_info["token"])
        if interaction is None or interaction.expired:
            return _error(401, 50027, "Invalid Webhook Token")
        return interaction

    def _webhook_message(
        self, interaction: FakeInteraction, message_ref: str
    ) -> FakeMessage | web.Response:
        if message_ref == "@original":
            message_id = interaction.original_id
        else:
            message_id = int(message_ref)
            if message_id != interaction.original_id and message_id not in interaction.followup_ids:
                return _error(404, 10008, "Unknown Message")
        message = self.messages.get(message_id) if message_id is not None else None
        if message is None or message.deleted:
            return _error(404, 10008, "Unknown Message")
        return message

    async def _followup(self, request: web.Request) -> web.Response:
        found = self._webhook_interaction(request)
        if isinstance(found, web.Response):
            return found
        interaction = found
        if interaction.callback_type is None:
            return _error(404, 10015, "Unknown Webhook")
        payload, files = await self._read_message_body(request)
        problem = self._check_upload(files, self._limit_of(interaction))
        if problem is not None:
            return problem
        original = self.messages.get(interaction.original_id) if interaction.original_id else None
        if original is not None and original.loading and not original.deleted:
            # Discord: the first followup after a deferred response fills the "thinking"
            # message, which keeps the ephemerality chosen when deferring.
            self._apply(original, payload, files, creating=False)
            message = original
        else:
            message = FakeMessage(
                id=snowflake(),
                channel_id=interaction.channel_id,
                author=self.bot,
                via="followup",
                interaction_id=interaction.id,
            )
            self._apply(message, payload, files, creating=True)
            self.messages[message.id] = message
            interaction.followup_ids.append(message.id)
        await self._notify()
        if self.followup_with_body and request.query.get("wait") in ("true", "1", "True"):
            return _json_response(message.payload(self.guild_id))
        return web.Response(status=204)

    async def _webhook_get(self, request: web.Request) -> web.Response:
        found = self._webhook_interaction(request)
        if isinstance(found, web.Response):
            return found
        message = self._webhook_message(found, request.match_info["message"])
        if isinstance(message, web.Response):
            return message
        return _json_response(message.payload(self.guild_id))

    async def _webhook_edit(self, request: web.Request) -> web.Response:
        found = self._webhook_interaction(request)
        if isinstance(found, web.Response):
            return found
        message = self._webhook_message(found, request.match_info["message"])
        if isinstance(message, web.Response):
            return message
        payload, files = await self._read_message_body(request)
        problem = self._check_upload(files, self._limit_of(found))
        if problem is not None:
            return problem
        self._apply(message, payload, files, creating=False)
        await self._notify()
        return _json_response(message.payload(self.guild_id))

    async def _webhook_delete(self, request: web.Request) -> web.Response:
        found = self._webhook_interaction(request)
        if isinstance(found, web.Response):
            return found
        message = self._webhook_message(found, request.match_info["message"])
        if isinstance(message, web.Response):
            return message
        message.deleted = True
        await self._notify()
        return web.Response(status=204)

    def _channel_message(self, request: web.Request) -> FakeMessage | web.Response:
        message = self.messages.get(int(request.match_info["message"]))
        if (
            message is None
            or message.deleted
            or message.ephemeral
            or str(message.channel_id) != request.match_info["channel"]
        ):
            return _error(404, 10008, "Unknown Message")
        return message

    async def _channel_send(self, request: web.Request) -> web.Response:
        if request.match_info["channel"] != str(self.channel_id):
            return _error(404, 10003, "Unknown Channel")
        payload, files = await self._read_message_body(request)
        problem = self._check_upload(files, self.attachment_size_limit)
        if problem is not None:
            return problem
        message = FakeMessage(
            id=snowflake(), channel_id=self.channel_id, author=self.bot, via="channel"
        )
        payload = {k: v for k, v in payload.items() if k != "flags"}
        self._apply(message, payload, files, creating=True)
        self.messages[message.id] = message
        await self._notify()
        return _json_response(message.payload(self.guild_id))

    async def _channel_get(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if isinstance(message, web.Response):
            return message
        return _json_response(message.payload(self.guild_id))

    async def _channel_edit(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if isinstance(message, web.Response):
            return message
        if message.author.id != self.bot.id:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        payload, files = await self._read_message_body(request)
        problem = self._check_upload(files, self.attachment_size_limit)
        if problem is not None:
            return problem
        self._apply(message, payload, files, creating=False)
        await self._notify()
        return _json_response(message.payload(self.guild_id))

    async def _channel_delete(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if isinstance(message, web.Response):
            return message
        message.deleted = True
        await self._notify()
        return web.Response(status=204)
