"""The Chat port over OneBot v11: replies to the command message, results as image segments.

QQ cannot edit messages or show buttons, so progress is one short acknowledgement (the job
runner sends it and deletes it once the result is out). Results go one image per message,
paced per chat, because many images at once time out and trip QQ's risk control. An image
too large or too long for QQ goes out as a compressed preview, with the original as a group
(or private) file where the implementation supports uploads.

A OneBot timeout does not mean the message was not sent (the implementation may still
deliver it), so nothing is ever sent twice: a failed result send raises `DeliveryError` once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from nonebot.adapters.onebot.v11 import (
    ActionFailed,
    ApiNotAvailable,
    Bot,
    Message,
    MessageEvent,
    MessageSegment,
    NetworkError,
)

from bot.chat import MB, ChatLimits, MessageRef, OutFile, ResultMeta
from bot.errors import DeliveryError, ImageError
from bot.images import make_preview, probe
from bot.services import Services

log = logging.getLogger(__name__)

PLATFORM = "qq"

ONEBOT_ERRORS = (ActionFailed, NetworkError, ApiNotAvailable)
"""What a OneBot call raises when the implementation refuses, times out or is gone."""

QQ_LIMITS = ChatLimits(
    # An image segment travels base64-encoded (+1/3) in one websocket message; QQ's rich
    # media upload fails on big files (retcode 1200) long before NapCat's 50 MB frame cap.
    photo_bytes=8 * MB,
    # Group files go the same way, base64 in one message.
    file_bytes=30 * MB,
    max_files_per_message=1,
    can_edit=False,
    has_buttons=False,
    can_preview=False,
)
MAX_EDGE = 4096
"""Longest side QQ shows as an image; beyond it the preview goes out and the file follows."""
MAX_ASPECT = 4.0
"""Longer-than-this images are cut or refused by QQ clients."""
PREVIEW_EDGE = 2560


_UNSUPPORTED_RETCODES = frozenset({1404, 404, 10002})
"""OneBot v11's "unsupported action" (1404), and what some implementations answer instead."""
_UNSUPPORTED_WORDS = ("unsupported", "not support", "not_found", "unknown action", "不支持")

_UNSUPPORTED: weakref.WeakKeyDictionary[Bot, set[str]] = weakref.WeakKeyDictionary()
"""Actions each connected implementation said it lacks (a reconnect is a new `Bot`)."""


def is_unsupported(exc: ActionFailed) -> bool:
    """Whether the implementation refused because it does not know the action at all."""
    info = getattr(exc, "info", {}) or {}
    retcode = str(info.get("retcode", "")).strip()
    if retcode.isdigit() and int(retcode) in _UNSUPPORTED_RETCODES:
        return True
    words = f"{info.get('message', '')} {info.get('msg', '')} {info.get('wording', '')}".lower()
    return any(w in words for w in _UNSUPPORTED_WORDS)


def chat_id_of(event: MessageEvent) -> str:
    """`group:<id>` for a group message, `private:<user id>` for a private one."""
    group_id = getattr(event, "group_id", None)
    return f"group:{group_id}" if group_id is not None else f"private:{event.user_id}"


class SendPacer:
    """Keeps at least `interval` seconds between image sends in one chat."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def turn(self, chat_id: str) -> AsyncIterator[None]:
        """Wait for this chat's turn; the interval counts from the end of the previous send."""
        lock = self._locks.setdefault(chat_id, asyncio.Lock())
        async with lock:
            wait = self._last.get(chat_id, float("-inf")) + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                yield
            finally:
                self._last[chat_id] = time.monotonic()


class QQChat:
    """Answers one QQ command message (implements `bot.chat.Chat`)."""

    def __init__(
        self,
        bot: Bot,
        event: MessageEvent,
        services: Services,
        pacer: SendPacer,
        limits: ChatLimits = QQ_LIMITS,
    ) -> None:
        self._bot = bot
        self._event = event
        self._services = services
        self._pacer = pacer
        self._limits = limits
        self.chat_id = chat_id_of(event)
        self._group_id: int | None = getattr(event, "group_id", None)

    @property
    def limits(self) -> ChatLimits:
        return self._limits

    async def send_text(self, text: str, *, ephemeral: bool = False) -> MessageRef | None:
        # QQ has no message only one member of a group sees; a reply is the closest.
        try:
            return await self._send(self._reply_head() + MessageSegment.text(text))
        except ONEBOT_ERRORS as exc:
            log.warning("qq: could not send a text to %s: %r", self.chat_id, exc)
            return None

    async def edit_text(self, ref: MessageRef, text: str) -> None:
        return None  # QQ messages cannot be edited; can_edit=False keeps callers away.

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        return ref  # No live previews: every preview would be one more message in the group.

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        if meta.originals:
            files = [f for f in files if not await self._upload_original(f)]
            if not files:
                return
        for index, file in enumerate(files):
            try:
                await self._send_result(index, file, meta)
            except DeliveryError as exc:
                if index == 0:
                    raise
                # Images before this one are in the chat: the job pays for those (Chat port).
                raise DeliveryError(exc.detail, delivered=index) from exc

    async def _send_result(self, index: int, file: OutFile, meta: ResultMeta) -> None:
        """Send one result image (with the caption on the first), falling back to a preview."""
        image, original = await self._shape(file)
        caption = meta.caption if index == 0 else ""
        try:
            async with self._pacer.turn(self.chat_id):
                ref = await self._send(self._result_message(image, caption))
        except ActionFailed as exc:
            # A refusal is an answer (nothing was sent), unlike a timeout: QQ's rich media
            # upload failing (retcode 1200) on an image within our limits still leaves a
            # smaller copy worth one more try.
            if original is not None:
                raise DeliveryError(f"qq result image: {exc!r}") from exc
            log.info("qq: result refused in %s (%r); sending a preview", self.chat_id, exc)
            image = await make_preview(
                file.data, max_bytes=self._limits.photo_bytes // 2, max_edge=PREVIEW_EDGE
            )
            original = file
            async with self._pacer.turn(self.chat_id):
                ref = await self._deliver(
                    self._send(self._result_message(image, caption)), "result preview"
                )
        except ONEBOT_ERRORS as exc:
            raise DeliveryError(f"qq result image: {type(exc).__name__}") from exc
        if ref is not None:
            await self._remember(ref, meta.job_id)
        if original is not None and not meta.originals:
            await self._upload_quietly(original)

    async def delete_invocation(self) -> bool:
        if self._group_id is None:
            return False  # A bot cannot recall what a user sent it in private.
        try:
            await self._bot.call_api("delete_msg", message_id=self._event.message_id)
        except ONEBOT_ERRORS as exc:
            # Not an admin, or the sender is the owner or another admin.
            log.info("qq: could not recall a message in %s: %r", self.chat_id, exc)
            return False
        return True

    async def delete(self, ref: MessageRef) -> None:
        try:
            await self._bot.call_api("delete_msg", message_id=int(ref.id))
        except (*ONEBOT_ERRORS, ValueError) as exc:
            log.debug("qq: could not delete message %s: %r", ref.id, exc)

    # --- sending ---

    def _reply_head(self) -> Message:
        return Message(MessageSegment.reply(self._event.message_id))

    def _result_message(self, image: bytes, caption: str) -> Message:
        message = self._reply_head() + MessageSegment.image(image)
        if caption:
            message += MessageSegment.text("\n" + caption)
        return message

    def _target(self) -> dict[str, Any]:
        if self._group_id is not None:
            return {"message_type": "group", "group_id": self._group_id}
        return {"message_type": "private", "user_id": self._event.user_id}

    async def _send(self, message: Message) -> MessageRef | None:
        """Send with `send_msg`, or `send_group_msg`/`send_private_msg` where it is missing."""
        target = self._target()
        specific = f"send_{target.pop('message_type')}_msg"
        unsupported = _UNSUPPORTED.setdefault(self._bot, set())
        result: Any = None
        if "send_msg" in unsupported:
            result = await self._bot.call_api(specific, **target, message=message)
        else:
            try:
                result = await self._bot.call_api("send_msg", **self._target(), message=message)
            except ActionFailed as exc:
                if not is_unsupported(exc):
                    raise
                log.info("qq: %s has no send_msg (%r); using %s", self._bot.self_id, exc, specific)
                unsupported.add("send_msg")
                result = await self._bot.call_api(specific, **target, message=message)
        # OneBot answers `{"message_id": n}`; a bare id or nothing is taken as well.
        message_id = result.get("message_id") if isinstance(result, dict) else result
        if isinstance(message_id, bool) or not isinstance(message_id, int | str):
            return None
        return MessageRef(str(message_id)) if str(message_id).strip() else None

    async def _upload_original(self, file: OutFile) -> bool:
        """Upload `file` as a file; False when the implementation refused (send an image)."""
        try:
            async with self._pacer.turn(self.chat_id):
                await self._upload(file)
        except (ActionFailed, DeliveryError) as exc:
            # Refused (no group files here, or too big for one message): nothing was sent.
            log.info(
                "qq: original file refused in %s (%r); sending it as an image", self.chat_id, exc
            )
            return False
        except ONEBOT_ERRORS as exc:
            raise DeliveryError(f"qq original file: {type(exc).__name__}") from exc
        return True

    async def _upload(self, file: OutFile) -> None:
        if len(file.data) > self._limits.file_bytes:
            raise DeliveryError(f"{len(file.data)} bytes is over the QQ file limit")
        data = "base64://" + base64.b64encode(file.data).decode("ascii")
        if self._group_id is not None:
            await self._bot.call_api(
                "upload_group_file", group_id=self._group_id, file=data, name=file.filename
            )
        else:
            await self._bot.call_api(
                "upload_private_file", user_id=self._event.user_id, file=data, name=file.filename
            )

    async def _upload_quietly(self, file: OutFile) -> None:
        # The preview is already delivered; the original is a bonus where uploads work.
        try:
            async with self._pacer.turn(self.chat_id):
                await self._upload(file)
        except (*ONEBOT_ERRORS, DeliveryError) as exc:
            log.info("qq: original file not uploaded to %s: %r", self.chat_id, exc)

    async def _remember(self, ref: MessageRef, job_id: int) -> None:
        # The image is out whatever happens here: losing the reply mapping must not turn a
        # delivered result into a failed (and refunded) job.
        try:
            await self._services.remember_result(PLATFORM, self.chat_id, ref.id, job_id)
        except Exception:
            log.warning(
                "qq: could not record result message %s of job %s", ref.id, job_id, exc_info=True
            )

    async def _deliver(self, sending: Any, what: str) -> Any:
        try:
            return await sending
        except ONEBOT_ERRORS as exc:
            raise DeliveryError(f"qq {what}: {type(exc).__name__}") from exc

    async def _shape(self, file: OutFile) -> tuple[bytes, OutFile | None]:
        """The bytes for the image segment, and the original to upload when they differ."""
        width, height = file.width, file.height
        if not (width and height):
            try:
                info = await asyncio.to_thread(probe, file.data)
                width, height = info.width, info.height
            except ImageError:
                return file.data, None
        long_side, short_side = max(width, height), max(1, min(width, height))
        if (
            len(file.data) <= self._limits.photo_bytes
            and long_side <= MAX_EDGE
            and long_side / short_side <= MAX_ASPECT
        ):
            return file.data, None
        preview = await make_preview(
            file.data, max_bytes=self._limits.photo_bytes, max_edge=PREVIEW_EDGE
        )
        return preview, file
