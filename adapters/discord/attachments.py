"""Reference images from Discord attachments, downloaded as soon as they arrive.

Attachment URLs are signed and expire, so the bytes are fetched while the interaction is
handled, not when the job gets a slot. Each becomes an `ImageSource` that hands back those
bytes, or raises the error met while getting them (a non-image file, too many bytes, a
failed download) so the plugin reports it in the user's language.
"""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import discord
import httpx

from bot.chat import MB
from bot.errors import ImageError, ImageTooLargeError, UnsupportedImageError
from bot.fetch import FetchPolicy, fetch_url

DISCORD_CDN_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
"""Where Discord serves attachments; nothing else is downloaded."""


@dataclass(frozen=True, slots=True)
class AttachmentImage:
    """A downloaded attachment (implements `bot.chat.ImageSource`)."""

    label: str
    data: bytes = field(default=b"", repr=False)
    error: ImageError | None = None

    @property
    def name(self) -> str:
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        if self.error is not None:
            raise self.error
        if len(self.data) > max_bytes:
            raise ImageTooLargeError(
                f"{len(self.data)} bytes",
                size_mb=round(len(self.data) / MB, 1),
                limit_mb=round(max_bytes / MB, 1),
            )
        return self.data


def is_image(attachment: discord.Attachment) -> bool:
    """Whether Discord (or, lacking its word, the file name) says this is an image."""
    mime = attachment.content_type or mimetypes.guess_type(attachment.filename)[0] or ""
    return mime.split(";", 1)[0].strip().lower().startswith("image/")


async def download(
    attachment: discord.Attachment,
    *,
    max_bytes: int,
    hosts: Sequence[str],
    client: httpx.AsyncClient | None = None,
) -> AttachmentImage:
    """Fetch one attachment now, capped at `max_bytes`; failures are kept for the job."""
    label = attachment.filename
    if not is_image(attachment):
        return AttachmentImage(
            label, error=UnsupportedImageError(attachment.content_type or "unknown type")
        )
    if attachment.size > max_bytes:
        # Discord tells the size up front: no need to start a download that must fail.
        return AttachmentImage(
            label,
            error=ImageTooLargeError(
                f"{attachment.size} bytes",
                size_mb=round(attachment.size / MB, 1),
                limit_mb=round(max_bytes / MB, 1),
            ),
        )
    policy = FetchPolicy(allowed_hosts=tuple(hosts), max_bytes=max_bytes)
    try:
        data = await fetch_url(attachment.url, policy, client=client)
    except ImageError as exc:
        return AttachmentImage(label, error=exc)
    return AttachmentImage(label, data)


async def download_all(
    attachments: Sequence[discord.Attachment],
    *,
    max_bytes: int,
    hosts: Sequence[str],
    client: httpx.AsyncClient | None = None,
) -> tuple[AttachmentImage, ...]:
    """Fetch several attachments at once, in their order."""
    results = await asyncio.gather(
        *(download(a, max_bytes=max_bytes, hosts=hosts, client=client) for a in attachments)
    )
    return tuple(results)
