"""The `Chat` port on Telegram: status messages, previews, results with buttons."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiogram.exceptions import (
    AiogramError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramEntityTooLarge,
    TelegramNotFound,
)
from aiogram.methods import (
    DeleteMessage,
    EditMessageMedia,
    EditMessageText,
    SendChatAction,
    SendDocument,
    SendMediaGroup,
    SendMessage,
    SendPhoto,
)
from aiogram.types import (
    BufferedInputFile,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaDocument,
    InputMediaPhoto,
    MediaUnion,
    Message,
    ReplyParameters,
)
from PIL import Image

from adapters.telegram.flood import Skipped, TelegramSender
from bot.chat import MB, ChatLimits, MessageRef, OutFile, ResultMeta
from bot.errors import DeliveryError
from bot.images import make_preview
from bot.services import Services

log = logging.getLogger(__name__)

PLATFORM = "telegram"
CALLBACK_PREFIX = "db"
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
PHOTO_BYTES = 10 * MB
PHOTO_DIMENSION_SUM = 10000
PHOTO_MAX_RATIO = 20
# A preview photo needs no more: Telegram recompresses photos to 2560 px anyway.
PREVIEW_BYTES = 5 * MB
PREVIEW_EDGE = 2560
# Uploads of tens of MB take longer than aiogram's default 60 s request timeout.
UPLOAD_TIMEOUT = 300
ALBUM_SIZE = 10
# `upload_photo` shows for about 5 s; repeat it a little sooner.
ACTION_INTERVAL = 4.5


class EditPrompts:
    """Which bot message asked "reply with what to change" for which job (bounded, in memory)."""

    def __init__(self, capacity: int = 2048) -> None:
        self._capacity = capacity
        self._jobs: OrderedDict[tuple[int, int], int] = OrderedDict()

    def add(self, chat_id: int, message_id: int, job_id: int) -> None:
        self._jobs[(chat_id, message_id)] = job_id
        while len(self._jobs) > self._capacity:
            self._jobs.popitem(last=False)

    def job(self, chat_id: int, message_id: int) -> int | None:
        return self._jobs.get((chat_id, message_id))


class Background:
    """Status edits waiting for a slot, owned here so that the platform ends them on stop."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        """Run `work` until it ends or `close`; None (and `work` unrun) once closed."""
        if self.closed:
            work.close()
            return None
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel what is still waiting: a status edit is moot once the bot stops."""
        self.closed = True
        pending = set(self.tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


@dataclass(frozen=True, slots=True)
class TelegramLink:
    """What every chat of one bot shares: the sender, the services, the edit prompts."""

    sender: TelegramSender
    services: Services
    prompts: EditPrompts
    local: bool = False
    background: Background = field(default_factory=Background)


@dataclass(frozen=True, slots=True)
class _Actions:
    """The result buttons, and the text of the message that carries them under an album."""

    markup: InlineKeyboardMarkup
    text: str


def callback_data(action: str, job_id: int) -> str:
    """Button payload such as `db:reroll:42` (Telegram allows 64 bytes)."""
    return f"{CALLBACK_PREFIX}:{action}:{job_id}"


class TelegramChat:
    """One conversation's answers: replies to the invoking message, paced and retried."""

    def __init__(
        self,
        link: TelegramLink,
        chat_id: int,
        *,
        user_id: str,
        locale: str | None,
        reply_to: int | None = None,
        invocation_id: int | None = None,
        edit_prompt_for: int | None = None,
    ) -> None:
        self._link = link
        self._sender = link.sender
        self.chat_id = chat_id
        self._user_id = user_id
        self._locale = locale
        self._reply_to = reply_to
        # The user's message, deletable by `delete_invocation` (None for button presses).
        self._invocation_id = invocation_id
        # When set, the next text is the Edit button's prompt for this job (a ForceReply).
        self._edit_prompt_for = edit_prompt_for
        self._previews: list[MessageRef] = []
        # Status text: the newest asked for and not yet sent, and what the chat shows.
        self._latest: dict[str, str] = {}
        self._shown: dict[str, str] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}
        # Messages deleted by `delete`: late edits of them are dropped.
        self._gone: set[str] = set()
        # While results are being sent (and after), previews and status edits give way.
        self._delivering = 0
        self._delivered = False
        # Result files shown in the chat by the current `send_results`, for a partial failure.
        self._files_shown = 0

    @property
    def limits(self) -> ChatLimits:
        return ChatLimits(
            photo_bytes=PHOTO_BYTES,
            file_bytes=(2000 if self._link.local else 50) * MB,
            photo_dimension_sum=PHOTO_DIMENSION_SUM,
            max_files_per_message=ALBUM_SIZE,
            can_edit=True,
            has_buttons=True,
            can_preview=True,
        )

    # --- text ---

    async def send_text(self, text: str, *, ephemeral: bool = False) -> MessageRef | None:
        # Telegram has no ephemeral messages for ordinary commands: answer in the chat.
        markup = None
        if self._edit_prompt_for is not None:
            # Selective: in a group the reply box must not pop up for every member.
            markup = ForceReply(force_reply=True, selective=self.chat_id < 0)
        try:
            message = await self._sender.call(
                SendMessage(
                    chat_id=self.chat_id,
                    text=_clip(text, TEXT_LIMIT),
                    reply_parameters=self._reply_parameters(),
                    reply_markup=markup,
                ),
                chat_id=self.chat_id,
            )
        except AiogramError as exc:
            log.warning("telegram: sendMessage failed: %s", type(exc).__name__)
            return None
        if self._edit_prompt_for is not None:
            self._link.prompts.add(self.chat_id, message.message_id, self._edit_prompt_for)
        self._shown[str(message.message_id)] = text
        return MessageRef(str(message.message_id))

    async def edit_text(self, ref: MessageRef, text: str) -> None:
        # Never holds up the caller (the job runner edits "uploading" just before the
        # result): the newest text for a message goes out from a background task in a spare
        # slot; newer text replaces text still waiting, and results on their way drop it.
        key = ref.id
        if key in self._gone:
            return
        self._latest[key] = text
        if key not in self._flushers:
            name = f"telegram-edit-{self.chat_id}-{key}"
            task = self._link.background.spawn(self._flush_edits(key), name)
            if task is not None:
                self._flushers[key] = task

    async def _flush_edits(self, key: str) -> None:
        """Send the newest status text of message `key` until none is left waiting."""

        def wanted() -> bool:
            return key in self._latest and not self._delivering

        try:
            while (text := self._latest.get(key)) is not None:
                if text == self._shown.get(key):
                    del self._latest[key]
                    continue
                sending: list[str] = []
                # The text current once the slot is there, not when the wait began.
                build = functools.partial(self._edit_method, key, sending)
                try:
                    await self._sender.call_spare(
                        build, chat_id=self.chat_id, wait=True, wanted=wanted
                    )
                except Skipped:
                    if not sending or self._delivering or key in self._gone:
                        # A result is on its way or the message is gone: the text is moot.
                        self._latest.pop(key, None)
                        return
                    # A 429 holds the chat: send it (or a newer text) once it is over.
                    self._latest.setdefault(key, sending[0])
                    continue
                except AiogramError as exc:
                    if "not modified" not in str(exc):
                        log.info("telegram: status edit failed: %s", type(exc).__name__)
                    continue
                self._shown[key] = sending[0]
        finally:
            self._flushers.pop(key, None)

    def _edit_method(self, key: str, sending: list[str]) -> EditMessageText:
        """Take message `key`'s newest text (noted in `sending`) into an edit."""
        sending.append(self._latest.pop(key))
        return EditMessageText(
            chat_id=self.chat_id, message_id=int(key), text=_clip(sending[0], TEXT_LIMIT)
        )

    # --- previews and results ---

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        # The image's stream waits while this runs, and a preview is only worth showing
        # while it is current: one that cannot go out at once (the chat is busy or held by a
        # 429, or the result is on its way) is dropped, never queued in front of the result.
        if self._delivering or self._delivered:
            return ref
        photo = BufferedInputFile(image, "preview.jpg")
        try:
            if ref is None:
                message = await self._sender.call_spare(
                    SendPhoto(
                        chat_id=self.chat_id,
                        photo=photo,
                        reply_parameters=self._reply_parameters(),
                        disable_notification=True,
                    ),
                    chat_id=self.chat_id,
                    request_timeout=UPLOAD_TIMEOUT,
                )
                ref = MessageRef(str(message.message_id))
                if self._delivering or self._delivered:
                    # The result overtook this preview: it has nothing left to show.
                    await self.delete(ref)
                    return None
                self._previews.append(ref)
                return ref
            await self._sender.call_spare(
                EditMessageMedia(
                    chat_id=self.chat_id, message_id=int(ref.id), media=InputMediaPhoto(media=photo)
                ),
                chat_id=self.chat_id,
                request_timeout=UPLOAD_TIMEOUT,
            )
        except Skipped:
            log.debug("telegram: preview dropped in %s", self.chat_id)
        except AiogramError as exc:
            log.info("telegram: preview failed: %s", type(exc).__name__)
        return ref

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        if not files:
            return
        lang = await self._link.services.user_lang(PLATFORM, self._user_id, self._locale)
        caption = _clip(meta.caption or meta.revised_prompt or "", CAPTION_LIMIT) or None
        actions = None
        if meta.actions:
            text = self._link.services.t(lang, "result.actions", job=meta.job_id)
            actions = _Actions(self._buttons(meta.job_id, lang), text)
        # Status edits and previews still waiting for a slot give way to the result.
        self._delivering += 1
        self._sender.pacer.poke(self.chat_id)
        self._files_shown = 0
        try:
            async with self._uploading():
                if meta.originals:
                    sent = await self._send_documents(files, caption, actions)
                elif len(files) == 1:
                    markup = actions.markup if actions else None
                    sent = await self._send_single(files[0], caption, markup)
                else:
                    sent = await self._send_album(files, caption, actions)
        except TelegramAPIError as exc:
            detail = f"{type(exc).__name__}: {exc.message[:200]}"
            if self._files_shown:
                # Those are in the chat: the job is charged for them, not refunded.
                raise DeliveryError(detail, delivered=self._files_shown) from exc
            raise DeliveryError(detail) from exc
        finally:
            self._delivering -= 1
        self._delivered = True
        try:
            for message_id in sent:
                await self._link.services.remember_result(
                    PLATFORM, str(self.chat_id), str(message_id), meta.job_id
                )
        except Exception:
            # The images are in the chat: only replies and buttons lose their job.
            log.warning("telegram: could not remember result messages", exc_info=True)
        # The partial previews served their purpose once the result is in the chat.
        for preview in self._previews:
            await self.delete(preview)
        self._previews.clear()

    async def _send_single(
        self, file: OutFile, caption: str | None, markup: InlineKeyboardMarkup | None
    ) -> list[int]:
        if await _fits_photo(file):
            try:
                message = await self._send_photo(file.data, file.filename, caption, markup)
                self._files_shown += 1
                return [message.message_id]
            except (TelegramBadRequest, TelegramEntityTooLarge) as exc:
                # Telegram judges photos by rules we only approximate: fall back to a file.
                log.info("telegram: photo refused (%s), sending a preview", exc.message[:80])
        preview = await make_preview(file.data, max_bytes=PREVIEW_BYTES, max_edge=PREVIEW_EDGE)
        shown = await self._send_photo(preview, _preview_name(file.filename), caption, markup)
        self._files_shown += 1
        sent = [shown.message_id]
        if len(file.data) > self.limits.file_bytes:
            log.warning("telegram: result of %d bytes is over the file limit", len(file.data))
            return sent
        try:
            document = await self._send_document(file, None, None, reply_to=shown.message_id)
            sent.append(document.message_id)
        except AiogramError as exc:
            # The image is in the chat; the "Original file" button can try the file again.
            log.warning("telegram: original file not sent: %s", type(exc).__name__)
        return sent

    async def _send_album(
        self,
        files: Sequence[OutFile],
        caption: str | None,
        actions: _Actions | None,
    ) -> list[int]:
        sent: list[int] = []
        first: int | None = None
        for start in range(0, len(files), ALBUM_SIZE):
            chunk = files[start : start + ALBUM_SIZE]
            chunk_caption = caption if start == 0 else None
            if len(chunk) == 1:
                sent += await self._send_single(chunk[0], chunk_caption, None)
                first = first or sent[0]
                continue
            media: list[MediaUnion] = []
            too_big: list[OutFile] = []
            for index, file in enumerate(chunk):
                if await _fits_photo(file):
                    data, name = file.data, file.filename
                else:
                    data = await make_preview(
                        file.data, max_bytes=PREVIEW_BYTES, max_edge=PREVIEW_EDGE
                    )
                    name = _preview_name(file.filename)
                    too_big.append(file)
                # The first photo's caption is the album's caption.
                media.append(
                    InputMediaPhoto(
                        media=BufferedInputFile(data, name),
                        caption=chunk_caption if index == 0 else None,
                    )
                )
            try:
                messages = await self._sender.call(
                    SendMediaGroup(
                        chat_id=self.chat_id, media=media, reply_parameters=self._reply_parameters()
                    ),
                    chat_id=self.chat_id,
                    request_timeout=UPLOAD_TIMEOUT,
                )
            except (TelegramBadRequest, TelegramNotFound, TelegramEntityTooLarge) as exc:
                # Refused outright (a server without albums, or one rule we did not foresee):
                # nothing was posted, so the results go one by one instead.
                log.info("telegram: album refused (%s), sending one by one", exc.message[:80])
                for index, file in enumerate(chunk):
                    single = await self._send_single(
                        file, chunk_caption if index == 0 else None, None
                    )
                    sent += single
                    first = first or single[0]
                continue
            self._files_shown += len(chunk)
            sent += [m.message_id for m in messages]
            first = first or messages[0].message_id
            if too_big:
                try:
                    sent += await self._send_documents(
                        too_big, None, None, reply_to=messages[0], shows_files=False
                    )
                except AiogramError as exc:
                    # The album shows them; the "Original file" button can try the files again.
                    log.warning("telegram: original files not sent: %s", type(exc).__name__)
        if actions is not None:
            sent += await self._send_actions_after(actions, first)
        return sent

    async def _send_documents(
        self,
        files: Sequence[OutFile],
        caption: str | None,
        actions: _Actions | None,
        *,
        reply_to: Message | None = None,
        shows_files: bool = True,
    ) -> list[int]:
        # `shows_files` False: originals of photos already counted as shown.
        shown = 1 if shows_files else 0
        target = reply_to.message_id if reply_to is not None else None
        if len(files) == 1:
            markup = actions.markup if actions else None
            message = await self._send_document(files[0], caption, markup, reply_to=target)
            self._files_shown += shown
            return [message.message_id]
        sent: list[int] = []
        for start in range(0, len(files), ALBUM_SIZE):
            chunk = files[start : start + ALBUM_SIZE]
            if len(chunk) == 1:
                message = await self._send_document(chunk[0], None, None, reply_to=target)
                self._files_shown += shown
                sent.append(message.message_id)
                continue
            last_chunk = start + ALBUM_SIZE >= len(files)
            # A document album shows each file's caption under it: put it under the last.
            media: list[MediaUnion] = [
                InputMediaDocument(
                    media=BufferedInputFile(f.data, f.filename),
                    caption=caption if last_chunk and index == len(chunk) - 1 else None,
                )
                for index, f in enumerate(chunk)
            ]
            messages = await self._sender.call(
                SendMediaGroup(
                    chat_id=self.chat_id,
                    media=media,
                    reply_parameters=_reply_to(target) or self._reply_parameters(),
                ),
                chat_id=self.chat_id,
                request_timeout=UPLOAD_TIMEOUT,
            )
            self._files_shown += shown * len(chunk)
            sent += [m.message_id for m in messages]
        if actions is not None:
            sent += await self._send_actions_after(actions, sent[0])
        return sent

    async def _send_actions_after(self, actions: _Actions, reply_to: int | None) -> list[int]:
        """The buttons under images already in the chat: their failure fails no delivery."""
        try:
            return [await self._send_actions(actions, reply_to)]
        except AiogramError as exc:
            # Replies to the images still find the job; only the buttons are missing.
            log.warning("telegram: result buttons not sent: %s", type(exc).__name__)
            return []

    async def _send_actions(self, actions: _Actions, reply_to: int | None) -> int:
        """Albums cannot carry buttons: put them on a small message right under one."""
        message = await self._sender.call(
            SendMessage(
                chat_id=self.chat_id,
                text=actions.text,
                reply_markup=actions.markup,
                reply_parameters=_reply_to(reply_to),
                disable_notification=True,
            ),
            chat_id=self.chat_id,
        )
        return message.message_id

    async def _send_photo(
        self, data: bytes, name: str, caption: str | None, markup: InlineKeyboardMarkup | None
    ) -> Message:
        return await self._sender.call(
            SendPhoto(
                chat_id=self.chat_id,
                photo=BufferedInputFile(data, name),
                caption=caption,
                reply_markup=markup,
                reply_parameters=self._reply_parameters(),
            ),
            chat_id=self.chat_id,
            request_timeout=UPLOAD_TIMEOUT,
        )

    async def _send_document(
        self,
        file: OutFile,
        caption: str | None,
        markup: InlineKeyboardMarkup | None,
        *,
        reply_to: int | None,
    ) -> Message:
        return await self._sender.call(
            SendDocument(
                chat_id=self.chat_id,
                document=BufferedInputFile(file.data, file.filename),
                caption=caption,
                reply_markup=markup,
                reply_parameters=_reply_to(reply_to) or self._reply_parameters(),
                # Keep the original bytes: no conversion of images sent as files.
                disable_content_type_detection=True,
            ),
            chat_id=self.chat_id,
            request_timeout=UPLOAD_TIMEOUT,
        )

    async def send_confirm(self, text: str, *, token: int, label: str) -> MessageRef | None:
        """The confirmation of a costly request: `text` with one Confirm button under it."""
        markup = InlineKeyboardMarkup(
            inline_keyboard=[
                [InlineKeyboardButton(text=label, callback_data=callback_data("confirm", token))]
            ]
        )
        try:
            message = await self._sender.call(
                SendMessage(
                    chat_id=self.chat_id,
                    text=_clip(text, TEXT_LIMIT),
                    reply_parameters=self._reply_parameters(),
                    reply_markup=markup,
                ),
                chat_id=self.chat_id,
            )
        except AiogramError as exc:
            log.warning("telegram: sendMessage failed: %s", type(exc).__name__)
            return None
        return MessageRef(str(message.message_id))

    def _buttons(self, job_id: int, lang: str) -> InlineKeyboardMarkup:
        t = self._link.services.t
        return InlineKeyboardMarkup(
            inline_keyboard=[
                [
                    InlineKeyboardButton(
                        text=t(lang, "button.reroll"), callback_data=callback_data("reroll", job_id)
                    ),
                    InlineKeyboardButton(
                        text=t(lang, "button.edit"), callback_data=callback_data("edit", job_id)
                    ),
                    InlineKeyboardButton(
                        text=t(lang, "button.original"), callback_data=callback_data("orig", job_id)
                    ),
                ]
            ]
        )

    # --- deleting ---

    async def delete_invocation(self) -> bool:
        if self._invocation_id is None:
            return False
        try:
            return await self._sender.call(
                DeleteMessage(chat_id=self.chat_id, message_id=self._invocation_id),
                chat_id=self.chat_id,
                paced=False,
            )
        except AiogramError as exc:
            # In groups the bot needs the "delete messages" admin right.
            log.info("telegram: could not delete the user's message: %s", type(exc).__name__)
            return False

    async def delete(self, ref: MessageRef) -> None:
        # Edits of this message still waiting for a slot have nothing left to edit.
        self._gone.add(ref.id)
        if self._latest.pop(ref.id, None) is not None:
            self._sender.pacer.poke(self.chat_id)
        try:
            await self._sender.call(
                DeleteMessage(chat_id=self.chat_id, message_id=int(ref.id)),
                chat_id=self.chat_id,
                paced=False,
            )
        except AiogramError as exc:
            log.info("telegram: delete failed: %s", type(exc).__name__)

    # --- helpers ---

    def _reply_parameters(self) -> ReplyParameters | None:
        return _reply_to(self._reply_to)

    async def _action(self) -> None:
        with contextlib.suppress(AiogramError):
            await self._sender.call(
                SendChatAction(chat_id=self.chat_id, action="upload_photo"),
                chat_id=self.chat_id,
                paced=False,
            )

    @contextlib.asynccontextmanager
    async def _uploading(self) -> AsyncIterator[None]:
        """Show "sending photo..." for as long as the uploads take."""

        async def repeat() -> None:
            while True:
                await self._action()
                await asyncio.sleep(ACTION_INTERVAL)

        task = asyncio.create_task(repeat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _reply_to(message_id: int | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    # The user may have deleted their message meanwhile; answer anyway.
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _preview_name(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0] if "." in filename else filename
    return f"{stem}-preview.jpg"


async def _fits_photo(file: OutFile) -> bool:
    """Whether Telegram takes `file` as a photo: 10 MB, w + h <= 10000, ratio <= 20."""
    if len(file.data) > PHOTO_BYTES:
        return False
    width, height = file.width, file.height
    if not (width and height):
        size = await asyncio.to_thread(_dimensions, file.data)
        if size is None:
            return False
        width, height = size
    if width + height > PHOTO_DIMENSION_SUM:
        return False
    return max(width, height) / max(1, min(width, height)) <= PHOTO_MAX_RATIO


def _dimensions(data: bytes) -> tuple[int, int] | None:
    # Only the header is read: no full decode just to learn the size.
    try:
        with Image.open(io.BytesIO(data)) as img:
            size: Any = img.size
            return int(size[0]), int(size[1])
    except Exception:
        return None
