"""Reference images in Telegram messages, fetched lazily through `getFile`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

import aiohttp
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest
from aiogram.methods import GetFile
from aiogram.types import Message

from adapters.telegram.flood import TelegramSender
from bot.chat import MB
from bot.errors import ImageFetchError, ImageTooLargeError

# The cloud Bot API serves files up to 20 MB; a `--local` server has no such limit.
CLOUD_DOWNLOAD_LIMIT = 20 * MB
DOWNLOAD_TIMEOUT = 60
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class TelegramFile:
    """A photo or image document in a message; `fetch` downloads it (an `ImageSource`)."""

    sender: TelegramSender
    file_id: str
    file_size: int | None
    label: str
    local: bool = False

    @property
    def name(self) -> str:
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        limit = max_bytes if self.local else min(max_bytes, CLOUD_DOWNLOAD_LIMIT)
        if self.file_size and self.file_size > limit:
            raise _too_large(self.file_size, limit)
        try:
            file = await self.sender.call(GetFile(file_id=self.file_id))
        except TelegramBadRequest as exc:
            if "too big" in exc.message.lower():
                raise _too_large(self.file_size or limit + 1, limit) from None
            raise ImageFetchError(f"getFile refused: {exc.message[:100]}") from None
        except TelegramAPIError as exc:
            raise ImageFetchError(f"getFile failed: {type(exc).__name__}") from None
        if file.file_size and file.file_size > limit:
            raise _too_large(file.file_size, limit)
        if not file.file_path:
            raise ImageFetchError("getFile returned no path")
        api = self.sender.bot.session.api
        if api.is_local and os.path.isabs(file.file_path):
            # A `--local` server answers with a path on its disk, shared with us.
            path = api.wrap_local_file.to_local(file.file_path)
            return await asyncio.to_thread(_read_capped, str(path), limit)
        return await self._download(file.file_path, limit)

    async def _download(self, file_path: str, limit: int) -> bytes:
        bot = self.sender.bot
        url = bot.session.api.file_url(bot.token, file_path)
        chunks: list[bytes] = []
        size = 0
        stream = bot.session.stream_content(
            url=url, timeout=DOWNLOAD_TIMEOUT, chunk_size=_CHUNK, raise_for_status=True
        )
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(size, limit)
                    chunks.append(chunk)
        # Never put the URL in the error: it contains the bot token.
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ImageFetchError(f"download failed: {type(exc).__name__}") from None
        return b"".join(chunks)


def message_images(message: Message, sender: TelegramSender) -> list[TelegramFile]:
    """The images a message carries: its largest photo size and image documents."""
    local = sender.bot.session.api.is_local
    found: list[TelegramFile] = []
    if message.photo:
        # Sizes come smallest first; pick by area in case a server orders them otherwise.
        largest = max(message.photo, key=lambda size: size.width * size.height)
        label = f"photo-{largest.file_unique_id}.jpg"
        found.append(TelegramFile(sender, largest.file_id, largest.file_size, label, local))
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        label = document.file_name or f"image-{document.file_unique_id}"
        found.append(TelegramFile(sender, document.file_id, document.file_size, label, local))
    return found


def _too_large(size: int, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{size} bytes > {limit}", size_mb=round(size / MB, 1), limit_mb=limit // MB
    )


def _read_capped(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ImageFetchError(f"local file unreadable: {type(exc).__name__}") from None
    if len(data) > limit:
        raise _too_large(len(data), limit)
    return data
