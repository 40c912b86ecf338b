"""Reference images from Discord attachments, handed to the job as lazy sources.

What Discord already says about an attachment is judged at once, for free: a file that is not
an image, or a declared size over the limit, becomes a source that raises that error. The
bytes themselves are fetched only when the job runner asks, after it has decided the user may
run the job at all (ban, job limit, queue, credits), so a refused command downloads nothing.
Signed attachment URLs live about a day; the runner fetches before the job is queued.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass, field

import discord
import httpx

from bot.chat import MB
from bot.errors import ImageError, ImageTooLargeError, UnsupportedImageError
from bot.fetch import FetchPolicy, fetch_url

DISCORD_CDN_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
"""Where Discord serves attachments. The intake adds `DRAWBRIDGE_IMAGE_HOSTS` (a reverse
proxy or CDN mirror of the operator's); nothing else is downloaded."""


@dataclass(frozen=True, slots=True)
class AttachmentImage:
    """An attachment, downloaded on `fetch` (implements `bot.chat.ImageSource`).

    `error` holds what was already known against it at intake; `size` is Discord's word
    for its byte count (0 when unknown). `client`, if given, must not use a proxy (no
    `trust_env`): the download has to reach the address the SSRF check resolved; None makes
    a short-lived direct one.
    """

    label: str
    url: str = field(default="", repr=False)
    size: int = 0
    hosts: tuple[str, ...] = ()
    error: ImageError | None = None
    client: httpx.AsyncClient | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        if self.error is not None:
            raise self.error
        if self.size > max_bytes:
            raise _too_large(self.size, max_bytes)
        policy = FetchPolicy(allowed_hosts=self.hosts, max_bytes=max_bytes)
        return await fetch_url(self.url, policy, client=self.client)


def is_image(attachment: discord.Attachment) -> bool:
    """Whether Discord (or, lacking its word, the file name) says this is an image."""
    mime = attachment.content_type or mimetypes.guess_type(attachment.filename)[0] or ""
    return mime.split(";", 1)[0].strip().lower().startswith("image/")


def attachment_source(
    attachment: discord.Attachment,
    *,
    max_bytes: int,
    hosts: Sequence[str],
    client: httpx.AsyncClient | None = None,
) -> AttachmentImage:
    """A lazy source for one attachment; what its metadata already rules out fails at once."""
    label = attachment.filename
    if not is_image(attachment):
        return AttachmentImage(
            label, error=UnsupportedImageError(attachment.content_type or "unknown type")
        )
    if attachment.size > max_bytes:
        # Discord tells the size up front: no need to start a download that must fail.
        return AttachmentImage(label, error=_too_large(attachment.size, max_bytes))
    return AttachmentImage(label, attachment.url, attachment.size, tuple(hosts), client=client)


def attachment_sources(
    attachments: Sequence[discord.Attachment],
    *,
    max_bytes: int,
    hosts: Sequence[str],
    client: httpx.AsyncClient | None = None,
) -> tuple[AttachmentImage, ...]:
    """Lazy sources for several attachments, in their order."""
    return tuple(
        attachment_source(a, max_bytes=max_bytes, hosts=hosts, client=client) for a in attachments
    )


def _too_large(size: int, max_bytes: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{size} bytes", size_mb=round(size / MB, 1), limit_mb=round(max_bytes / MB, 1)
    )
