"""The Telegram platform: aiogram polling or webhook, and the handlers that call `dispatch`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.client.telegram import PRODUCTION, TelegramAPIServer
from aiogram.exceptions import (
    AiogramError,
    TelegramAPIError,
    TelegramNetworkError,
    TelegramUnauthorizedError,
)
from aiogram.methods import (
    AnswerCallbackQuery,
    DeleteWebhook,
    GetChatMember,
    GetMe,
    GetUpdates,
    Response,
    SendMessage,
    SetMyCommands,
    SetWebhook,
    TelegramMethod,
)
from aiogram.methods.base import TelegramType
from aiogram.types import BotCommand, CallbackQuery, Message, TelegramObject
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from adapters.telegram.chat import (
    CALLBACK_PREFIX,
    PLATFORM,
    EditPrompts,
    TelegramChat,
    TelegramLink,
)
from adapters.telegram.files import TelegramFile, message_images
from adapters.telegram.flood import FloodPolicy, TelegramSender
from adapters.telegram.proxy import bot_session
from bot.chat import Invocation
from bot.config import Settings
from bot.i18n import LANGUAGES
from bot.platform import Connection
from bot.services import Services
from bot.startup import SETTINGS, StartupError, listen_error
from plugins.dispatch import dispatch
from plugins.registry import COMMANDS, CommandSpec, split_command

log = logging.getLogger(__name__)

# A button's action -> the command it runs ("edit" asks for the change first).
BUTTON_COMMANDS = {
    "reroll": "reroll",
    "edit": "edit_hint",
    "orig": "original",
    # The confirm button of a costly request: its number is the request, not a job.
    "confirm": "confirm",
}
COMMAND_DESCRIPTION_LIMIT = 256
STOP_TIMEOUT = 5.0
# Seconds past the polling timeout a getUpdates may take before /healthz calls it stalled.
POLL_SLACK = 30.0
# Albums remembered so that a reply to any one photo of an album brings the whole album.
ALBUMS_REMEMBERED = 512


class PollWatch(BaseRequestMiddleware):
    """Notes how each `getUpdates` ended, so /healthz can tell polling that works from
    polling that aiogram keeps retrying (it never gives up, so the task alone says little)."""

    def __init__(self) -> None:
        self.last_ok = time.monotonic()
        self.failing = ""

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        if not isinstance(method, GetUpdates):
            return await make_request(bot, method)
        try:
            response = await make_request(bot, method)
        except Exception as exc:
            self.failing = type(exc).__name__
            raise
        self.last_ok = time.monotonic()
        self.failing = ""
        return response


@dataclass(slots=True)
class _Album:
    """The parts of one incoming album (one `media_group_id`) collected so far."""

    parts: list[Message]
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class TelegramPlatform:
    """The bot on Telegram inside `drawbridge run`: start() connects, stop() disconnects."""

    name = PLATFORM

    def __init__(
        self,
        settings: Settings,
        services: Services,
        *,
        flood: FloodPolicy | None = None,
        album_wait: float = 1.0,
        polling_timeout: int = 25,
    ) -> None:
        self.settings = settings
        self.services = services
        self._flood = flood or FloodPolicy()
        # Album parts arrive as separate updates; wait this long after the last one.
        self._album_wait = album_wait
        self._polling_timeout = polling_timeout
        self._prompts = EditPrompts()
        self._albums: dict[tuple[int, str], _Album] = {}
        self._seen_albums: OrderedDict[tuple[int, str], list[Message]] = OrderedDict()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._polling: asyncio.Task[None] | None = None
        self._web: web.AppRunner | None = None
        self._ready = asyncio.Event()
        self._polls = PollWatch()
        self._webhook_set = False
        self._started = False
        self._stopped = False
        self.bot: Bot | None = None
        self.username = ""
        # From getMe: a server need not use the token's numeric prefix as the bot's id.
        self.bot_id = 0

    # --- lifecycle ---

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        settings = self.settings
        server = PRODUCTION
        if settings.telegram_api_server:
            server = TelegramAPIServer.from_base(
                settings.telegram_api_server, is_local=settings.telegram_api_local
            )
        # TELEGRAM_PROXY, when set, carries every Bot API call and file download.
        session = bot_session(server, settings.telegram_proxy)
        self.bot = Bot(settings.telegram_bot_token, session=session)
        session.middleware(self._polls)
        self.sender = TelegramSender(self.bot, self._flood)
        self.link = TelegramLink(self.sender, self.services, self._prompts, server.is_local)
        self.dispatcher = Dispatcher(name="drawbridge")
        self.dispatcher.update.outer_middleware(self._track)
        self.dispatcher.startup.register(self._on_startup)
        self.dispatcher.include_router(self._router())
        try:
            try:
                me = await self.sender.call(GetMe(), request_timeout=30)
            except TelegramUnauthorizedError:
                raise StartupError(
                    "Telegram refused TELEGRAM_BOT_TOKEN (401 Unauthorized): check the token "
                    "@BotFather gave you" + _server_hint(settings),
                    exit_code=SETTINGS,
                ) from None
            except (TelegramNetworkError, OSError) as exc:
                raise StartupError(
                    f"cannot reach the Telegram Bot API ({_reason(exc, settings)}): check the "
                    f"network and TELEGRAM_PROXY{_server_hint(settings)}"
                ) from None
            except TelegramAPIError as exc:
                raise StartupError(
                    f"the Telegram Bot API refused getMe ({_reason(exc, settings)})"
                    + _server_hint(settings)
                ) from None
            self.username = me.username or ""
            self.bot_id = me.id
            await self._register_commands()
            if settings.telegram_webhook_url:
                await self._start_webhook()
            else:
                await self._start_polling()
        except BaseException:
            await self.stop()
            raise
        mode = "webhook" if settings.telegram_webhook_url else "long polling"
        server_name = "official" if server is PRODUCTION else "custom"
        log.info(
            "telegram: @%s serving by %s (%s Bot API server)", self.username, mode, server_name
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._polling is not None:
            # RuntimeError: polling had not started; the task is cancelled below either way.
            with contextlib.suppress(RuntimeError, TimeoutError):
                await asyncio.wait_for(self.dispatcher.stop_polling(), STOP_TIMEOUT)
            self._polling.cancel()
            with contextlib.suppress(BaseException):
                await self._polling
        if self._web is not None:
            try:
                await asyncio.wait_for(self.sender.call(DeleteWebhook()), STOP_TIMEOUT)
            except (TelegramAPIError, TimeoutError) as exc:
                log.warning("telegram: deleteWebhook failed: %s", type(exc).__name__)
            await self._web.cleanup()
        # Updates still being handled get a short grace, then are cancelled.
        pending = set(self._inflight)
        if pending:
            # Jobs have finished by now (the runner shuts them down first): only quick
            # handlers are left, and `drawbridge run` gives each platform 15 s to stop.
            grace = min(self.settings.shutdown_grace, 5)
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        link: TelegramLink | None = getattr(self, "link", None)
        if link is not None:
            await link.background.close()
        if self.bot is not None:
            await self.bot.session.close()
        log.info("telegram: stopped")

    async def notify(self, chat_id: str, text: str) -> None:
        """Post a message in a chat (paced and 429-aware like every send)."""
        chat = int(chat_id)
        await self.sender.call(SendMessage(chat_id=chat, text=text), chat_id=chat)

    def connection(self) -> Connection:
        """Polling: the task runs and its last `getUpdates` answered, recently. Webhook: set
        with Telegram and the server that takes its updates is up."""
        if self._stopped or not self._started:
            return Connection(False, "not started" if not self._started else "stopped")
        if self.settings.telegram_webhook_url:
            if self._web is not None and self._webhook_set:
                return Connection(True, "webhook set")
            return Connection(False, "webhook not set")
        if self._polling is None or self._polling.done():
            return Connection(False, "polling stopped")
        if self._polls.failing:
            return Connection(False, f"getUpdates failing: {self._polls.failing}")
        # A long poll answers within its timeout; past it plus aiogram's request slack, the
        # request hangs on a dead connection.
        silent = time.monotonic() - self._polls.last_ok
        if silent > self._polling_timeout + POLL_SLACK:
            return Connection(False, f"no getUpdates answer for {silent:.0f}s")
        return Connection(True, f"polling, last answer {silent:.0f}s ago")

    async def wait_ended(self) -> None:
        """Return if polling stops by itself (a webhook server runs until `stop`)."""
        if self._polling is not None:
            await asyncio.wait({self._polling})
        else:
            await asyncio.Event().wait()

    async def _start_polling(self) -> None:
        # A webhook left from an earlier run would make getUpdates fail with 409.
        try:
            await self.sender.call(DeleteWebhook(drop_pending_updates=False))
        except AiogramError as exc:
            log.warning("telegram: deleteWebhook failed: %s", type(exc).__name__)
        assert self.bot is not None
        self._polling = asyncio.create_task(
            self.dispatcher.start_polling(
                self.bot,
                polling_timeout=self._polling_timeout,
                handle_signals=False,
                close_bot_session=False,
            ),
            name="telegram-polling",
        )
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({self._polling, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            self._polling.result()
            raise RuntimeError("telegram polling ended before it started")

    async def _start_webhook(self) -> None:
        settings = self.settings
        assert self.bot is not None
        # Without a configured secret, anyone who finds the URL could post fake updates.
        secret = settings.telegram_webhook_secret or secrets.token_urlsafe(32)
        handler = SimpleRequestHandler(
            dispatcher=self.dispatcher, bot=self.bot, secret_token=secret
        )
        app = web.Application()
        app.router.add_post(urlsplit(settings.telegram_webhook_url).path or "/", handler.handle)
        # No access log: operators often put secrets in the webhook path.
        self._web = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await self._web.setup()
        site = web.TCPSite(
            self._web, settings.telegram_webhook_host, settings.telegram_webhook_port
        )
        try:
            await site.start()
        except OSError as exc:
            raise listen_error(
                "the Telegram webhook",
                settings.telegram_webhook_host,
                settings.telegram_webhook_port,
                exc,
                host_name="TELEGRAM_WEBHOOK_HOST",
                port_name="TELEGRAM_WEBHOOK_PORT",
            ) from None
        await self.sender.call(
            SetWebhook(
                url=settings.telegram_webhook_url,
                secret_token=secret,
                allowed_updates=self.dispatcher.resolve_used_update_types(),
            )
        )
        self._webhook_set = True

    async def _on_startup(self, **_: Any) -> None:
        self._ready.set()

    async def _register_commands(self) -> None:
        """The command menu from the shared declarations, in each language."""
        menu = [spec for spec in COMMANDS if spec.in_menu and not spec.admin]
        variants: list[tuple[str | None, str]] = [(lang, lang) for lang in LANGUAGES]
        variants.append((None, self.settings.default_lang))
        for code, lang in variants:
            commands = [
                BotCommand(command=spec.name, description=self._describe(spec, lang))
                for spec in menu
            ]
            try:
                await self.sender.call(SetMyCommands(commands=commands, language_code=code))
            except AiogramError as exc:
                log.warning("telegram: setMyCommands (%s) failed: %s", code, type(exc).__name__)

    def _describe(self, spec: CommandSpec, lang: str) -> str:
        text = self.services.t(lang, spec.help_key).strip().splitlines()[0]
        return text[:COMMAND_DESCRIPTION_LIMIT] or spec.name

    async def _track(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        # aiogram runs each update in a task of its own; stop() must be able to end them.
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            return await handler(event, data)
        finally:
            if task is not None:
                self._inflight.discard(task)

    # --- handlers ---

    def _router(self) -> Router:
        router = Router(name="drawbridge-telegram")
        router.message.register(self._on_album_part, F.media_group_id)
        router.message.register(self._on_message)
        router.callback_query.register(self._on_button, F.data.startswith(f"{CALLBACK_PREFIX}:"))
        return router

    async def _on_message(self, message: Message) -> None:
        await self._handle(message, [message])

    async def _on_album_part(self, message: Message) -> None:
        """Collect one album's updates; the first handler waits for the rest, then handles."""
        assert message.media_group_id is not None
        key = (message.chat.id, message.media_group_id)
        self._remember_album_part(key, message)
        album = self._albums.get(key)
        if album is not None:
            album.parts.append(message)
            album.arrived.set()
            return
        album = self._albums[key] = _Album([message])
        try:
            # Done once no part has arrived for `album_wait` seconds.
            while True:
                try:
                    await asyncio.wait_for(album.arrived.wait(), self._album_wait)
                except TimeoutError:
                    break
                album.arrived.clear()
        finally:
            del self._albums[key]
        parts = sorted(album.parts, key=lambda m: m.message_id)
        # Only the part with the caption carries the command; the others bring photos.
        lead = next((m for m in parts if m.caption or m.text), parts[0])
        await self._handle(lead, parts)

    def _remember_album_part(self, key: tuple[int, str], message: Message) -> None:
        parts = self._seen_albums.setdefault(key, [])
        self._seen_albums.move_to_end(key)
        if all(part.message_id != message.message_id for part in parts):
            parts.append(message)
        while len(self._seen_albums) > ALBUMS_REMEMBERED:
            self._seen_albums.popitem(last=False)

    def _album_of(self, message: Message) -> list[Message]:
        """`message` and, when it is part of an album seen before, every other part."""
        if message.media_group_id is None:
            return [message]
        parts = self._seen_albums.get((message.chat.id, message.media_group_id), [])
        if all(part.message_id != message.message_id for part in parts):
            parts = [*parts, message]
        return sorted(parts, key=lambda m: m.message_id)

    async def _handle(self, message: Message, parts: Sequence[Message]) -> None:
        user = message.from_user
        if user is None or user.is_bot:
            return
        chat_id = message.chat.id
        text = message.text or message.caption or ""
        target = message.reply_to_message
        to_bot = (
            target is not None
            and target.from_user is not None
            and (target.from_user.id == self.bot_id)
        )
        # Message ids are unique per chat and only the bot's own messages are recorded, so
        # these lookups need no `from` (a field servers may leave out of the replied message).
        prompt_job = self._prompts.job(chat_id, target.message_id) if target else None
        parsed = self._parse(text)
        if parsed is not None:
            command, body = parsed[0].name, parsed[1]
            if parsed[0].admin and target is not None and target.from_user and not to_bot:
                # "/ban" or "/grant 10" in reply to someone names them as the target.
                needed = len([o for o in parsed[0].options if o.required])
                if len(body.split()) < needed:
                    body = f"{target.from_user.id} {body}".strip()
        elif prompt_job is not None and text.strip():
            # The answer to the Edit button's "reply with what to change".
            command, body = "edit", text.strip()
        else:
            return
        reply_job = prompt_job
        if reply_job is None and target is not None:
            reply_job = await self.services.job_for_message(
                PLATFORM, str(chat_id), str(target.message_id)
            )
        references: list[TelegramFile] = []
        for part in parts:
            references += message_images(part, self.sender)
        # /edit on a result with no other image uses the kept originals (the plugin's
        # fallback); other commands keep the photo as before.
        originals = command == "edit" and not references and self._has_originals(target, reply_job)
        if target is not None and not originals:
            for part in self._album_of(target):
                references += message_images(part, self.sender)
        inv = Invocation(
            platform=PLATFORM,
            user_id=str(user.id),
            chat_id=str(chat_id),
            command=command,
            text=body,
            is_private=message.chat.type == "private",
            user_name=user.full_name,
            references=tuple(references),
            locale=user.language_code,
            message_id=str(message.message_id),
            reply_to_job=reply_job,
            # Asked of Telegram only for /group: every other command would pay a request.
            group_admin=command == "group" and await self._is_chat_admin(message, user.id),
        )
        chat = TelegramChat(
            self.link,
            chat_id,
            user_id=str(user.id),
            locale=user.language_code,
            reply_to=message.message_id,
            invocation_id=message.message_id,
        )
        # Never the text: it may be a /token with a key.
        log.info(
            "telegram: /%s from %s in %s (%d refs)", command, user.id, chat_id, len(references)
        )
        await dispatch(inv, chat, self.services)

    def _has_originals(self, target: Message | None, job_id: int | None) -> bool:
        """Whether a reply to `target` can use the kept originals of the job it shows.

        The photo in the chat is Telegram's recompressed copy (or a preview of a large
        result), and fetching it needs `getFile` on the bot's own upload; the kept files are
        the originals. An album part stays itself: the job's other results are not wanted.
        """
        if target is None or job_id is None or target.media_group_id is not None:
            return False
        return self.services.jobs.has_results(job_id)

    async def _on_button(self, query: CallbackQuery) -> None:
        # Stop the button's spinner first; the answer comes as a message.
        with contextlib.suppress(TelegramAPIError):
            await self.sender.call(AnswerCallbackQuery(callback_query_id=query.id), paced=False)
        action, _, raw_job = (query.data or "").partition(":")[2].partition(":")
        command = BUTTON_COMMANDS.get(action)
        message = query.message
        # An old result (over 48 h) arrives as an InaccessibleMessage: it still names the
        # chat and the message, which is all a button needs.
        if command is None or not raw_job.isdigit() or message is None:
            return
        job_id = int(raw_job)
        user = query.from_user
        private = message.chat.type == "private"
        confirming = command == "confirm"
        inv = Invocation(
            platform=PLATFORM,
            user_id=str(user.id),
            chat_id=str(message.chat.id),
            command=command,
            text=raw_job if confirming else "",
            is_private=private,
            user_name=user.full_name,
            locale=user.language_code,
            message_id=str(message.message_id),
            reply_to_job=None if confirming else job_id,
        )
        chat = TelegramChat(
            self.link,
            message.chat.id,
            user_id=str(user.id),
            locale=user.language_code,
            reply_to=message.message_id,
            edit_prompt_for=job_id if command == "edit_hint" else None,
        )
        log.info("telegram: button %s for job %s from %s", action, job_id, user.id)
        await dispatch(inv, chat, self.services)

    async def _is_chat_admin(self, message: Message, user_id: int) -> bool:
        """Whether the user is an administrator (or the creator) of the message's group."""
        if message.chat.type == "private":
            return False
        try:
            member = await self.sender.call(
                GetChatMember(chat_id=message.chat.id, user_id=user_id),
                chat_id=message.chat.id,
                paced=False,
            )
        except (TelegramAPIError, TelegramNetworkError) as exc:
            log.info("telegram: getChatMember in %s failed: %s", message.chat.id, exc)
            return False
        return member.status in ("creator", "administrator")

    def _parse(self, text: str) -> tuple[CommandSpec, str] | None:
        """The command in `text`, unless it is addressed to another bot (`/draw@otherbot`)."""
        parsed = split_command(text)
        if parsed is None:
            return None
        head = text.strip().split(maxsplit=1)[0]
        _, at, addressee = head.partition("@")
        if at and addressee.lower() != self.username.lower():
            return None
        return parsed


def _server_hint(settings: Settings) -> str:
    """`TELEGRAM_API_SERVER` named in a start-up failure when it is set (it may be the cause)."""
    if not settings.telegram_api_server:
        return ""
    return " and TELEGRAM_API_SERVER"


def _reason(exc: BaseException, settings: Settings) -> str:
    """A start-up failure's cause in a few words, without the token (URLs carry it)."""
    text = str(exc) or type(exc).__name__
    if settings.telegram_bot_token:
        text = text.replace(settings.telegram_bot_token, "<TELEGRAM_BOT_TOKEN>")
    return text if len(text) <= 200 else text[:197] + "..."
