"""Reference images in QQ messages, downloaded the moment the command arrives.

QQ image links (`multimedia.nt.qq.com.cn`, `gchat.qpic.cn`) expire within hours and a job may
wait in the queue, so every image is fetched on receipt, under the SSRF policy of
`bot.fetch`. A download that fails becomes a source that raises the same error when the job
asks for it: the job runner then reports it the usual way, before anything is charged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from nonebot.adapters.onebot.v11 import Message

from bot.chat import BytesImage, ImageSource
from bot.errors import DrawbridgeError
from bot.fetch import FetchPolicy, UrlImage

MAX_PREFETCH = 16
"""Images downloaded per command; more are passed on unfetched (the runner refuses them)."""


def image_urls(message: Message) -> list[str]:
    """The image links of a message, in order.

    NapCat and LLOneBot put the download link in `url`; some implementations only in `file`.
    Anything that looks like a link is kept, whatever its scheme: the fetch policy decides.
    """
    urls = []
    for segment in message:
        if segment.type != "image":
            continue
        url = segment.data.get("url") or segment.data.get("file")
        if isinstance(url, str) and "://" in url and not url.startswith("base64://"):
            urls.append(url)
    return urls


@dataclass(frozen=True, slots=True)
class UnavailableImage:
    """A reference whose download already failed; `fetch` raises that failure."""

    label: str
    error: DrawbridgeError

    @property
    def name(self) -> str:
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        raise self.error


async def prefetch(urls: Sequence[str], policy: FetchPolicy) -> tuple[ImageSource, ...]:
    """Download `urls` concurrently; each becomes in-memory bytes or an `UnavailableImage`.

    Each download gets its own client (no proxies from the environment): `bot.fetch` pins
    the connection to the address it checked, which a shared, proxied client would not keep.
    """
    sources = [UrlImage(url, policy, f"image{i + 1}") for i, url in enumerate(urls)]
    now, later = sources[:MAX_PREFETCH], sources[MAX_PREFETCH:]
    fetched = await asyncio.gather(*(_download(source, policy) for source in now))
    return (*fetched, *later)


async def _download(source: UrlImage, policy: FetchPolicy) -> ImageSource:
    try:
        return BytesImage(await source.fetch(policy.max_bytes), source.label)
    except DrawbridgeError as exc:
        return UnavailableImage(source.label, exc)
