"""From a OneBot message event to `dispatch`: the one matcher of the QQ adapter.

Any message starting with a command from the shared declarations (`/draw`, `/画`, `／改图`,
`/画一只猫`) is a command, in private chats and in groups, with or without an @-mention.
Reference images come from the message itself and from the quoted message; replying to one of
the bot's results with `/edit <prompt>` or `/reroll` points the command at that result's job.
"""

from __future__ import annotations

import asyncio
import logging

from nonebot import on_message
from nonebot.adapters.onebot.v11 import Bot, Message, MessageEvent
from nonebot.compat import type_validate_python
from nonebot.matcher import Matcher

from adapters.qq.chat import ONEBOT_ERRORS, PLATFORM, QQ_LIMITS, QQChat, SendPacer, chat_id_of
from adapters.qq.references import image_sources, image_urls
from bot.chat import ChatLimits, ImageSource, Invocation
from bot.fetch import FetchPolicy
from bot.services import Services
from plugins.dispatch import dispatch
from plugins.registry import split_command

log = logging.getLogger(__name__)

PRIORITY = 10


class QQHandler:
    """Turns a command message into an `Invocation` and a `QQChat`, then dispatches it."""

    def __init__(
        self,
        services: Services,
        pacer: SendPacer,
        limits: ChatLimits = QQ_LIMITS,
    ) -> None:
        settings = services.settings
        self.services = services
        self.pacer = pacer
        self.limits = limits
        self.policy = FetchPolicy(
            allowed_hosts=tuple(settings.image_host_list()), max_bytes=settings.max_input_bytes
        )
        self._running: set[asyncio.Task[object]] = set()

    async def handle(self, bot: Bot, event: MessageEvent) -> None:
        """Run the command in `event`, if it holds one."""
        parsed = split_command(event.get_plaintext())
        if parsed is None:
            return
        spec, text = parsed
        if spec.admin:
            # "/grant @someone 10": an @-mention names the target user by QQ number.
            text = " ".join([*_mentioned(event), text]).strip()
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            chat_id = chat_id_of(event)
            quoted_ids = _quoted_ids(event)
            reply_job = None
            for quoted_id in quoted_ids:
                reply_job = await self.services.job_for_message(PLATFORM, chat_id, quoted_id)
                if reply_job is not None:
                    break
            references: tuple[ImageSource, ...] = ()
            if spec.max_images:
                urls = image_urls(event.message)
                # A result's own images are better taken from the job's stored originals.
                if quoted_ids and reply_job is None:
                    quoted = (
                        event.reply.message
                        if event.reply is not None
                        else await _quoted_message(bot, quoted_ids[0])
                    )
                    urls += [u for u in image_urls(quoted) if u not in urls]
                # Lazy: nothing is downloaded before the job runner admits the job.
                references = image_sources(urls, self.policy)
            sender = event.sender
            invocation = Invocation(
                platform=PLATFORM,
                user_id=str(event.user_id),
                chat_id=chat_id,
                command=spec.name,
                text=text,
                is_private=event.message_type == "private",
                user_name=sender.card or sender.nickname or "",
                references=references,
                message_id=str(event.message_id),
                reply_to_job=reply_job,
                # DRAWBRIDGE_GROUPS names a QQ group by its number; its owner and admins
                # (the sender's role, free in every group event) set its rules with /group.
                space_id=str(getattr(event, "group_id", "") or "") or None,
                group_admin=getattr(sender, "role", None) in ("owner", "admin"),
            )
            chat = QQChat(bot, event, self.services, self.pacer, self.limits)
            await dispatch(invocation, chat, self.services)
        finally:
            if task is not None:
                self._running.discard(task)

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for commands being handled, then cancel the rest."""
        running = set(self._running)
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


async def is_command(event: MessageEvent) -> bool:
    """The matcher's rule: the message starts with a declared command, sent by someone else.

    Implementations set to report the bot's own messages (NapCat's `reportSelfMessage`)
    post them as message events; the bot must never take its own text as a command.
    """
    if str(event.user_id) == str(event.self_id):
        return False
    return split_command(event.get_plaintext()) is not None


def build_matcher(handler: QQHandler) -> type[Matcher]:
    """Register the command matcher; call `.destroy()` on the result to unregister it."""

    async def on_command(bot: Bot, event: MessageEvent) -> None:
        await handler.handle(bot, event)

    return on_message(rule=is_command, handlers=[on_command], priority=PRIORITY, block=True)


def _quoted_ids(event: MessageEvent) -> list[str]:
    """The id of the quoted message, as the reply segment and as `get_msg` gave it.

    The reply segment is enough to find one of our results: an implementation whose
    `get_msg` fails, or answers in a shape nonebot rejects, leaves `event.reply` empty, and
    `/reroll` must still work. nonebot drops the segment from `message` once it has the
    reply, so it is looked for in `original_message`.
    """
    ids = [
        str(seg.data.get("id")).strip()
        for seg in event.original_message
        if seg.type == "reply" and seg.data.get("id") is not None
    ][:1]
    if event.reply is not None and str(event.reply.message_id) not in ids:
        ids.append(str(event.reply.message_id))
    return ids


async def _quoted_message(bot: Bot, message_id: str) -> Message:
    """The quoted message when the adapter could not fetch it (its `get_msg` failed).

    Only `message` is needed, so this takes answers nonebot's strict `Reply` model refuses
    (no `real_id`, no `sender`, `message` as a CQ-code string).
    """
    try:
        data = await bot.call_api("get_msg", message_id=int(message_id))
        raw = data.get("message") if isinstance(data, dict) else None
        return type_validate_python(Message, raw) if raw else Message()
    except (*ONEBOT_ERRORS, ValueError, TypeError) as exc:
        log.info("qq: quoted message %s unavailable: %r", message_id, exc)
        return Message()


def _mentioned(event: MessageEvent) -> list[str]:
    """QQ numbers @-mentioned in the message, other than the bot and @all."""
    ignored = {"all", str(event.self_id)}
    return [
        str(seg.data.get("qq"))
        for seg in event.message
        if seg.type == "at" and str(seg.data.get("qq")) not in ignored
    ]
