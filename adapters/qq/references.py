"""Reference images in QQ messages, handed to the job as lazy sources.

Nothing is downloaded while the command is read: the job runner first decides whether this
user may run the job at all (ban, job limit, queue, credits) and only then asks each source
for its bytes, so a refused command costs no download. QQ image links expire within hours;
the runner fetches before the job waits in the queue, well within that. Each source fetches
under the SSRF policy of `bot.fetch` and raises its failure (`ForbiddenURLError`,
`ImageFetchError`, `ImageTooLargeError`) for the runner to report before anything is charged.
"""

from __future__ import annotations

from collections.abc import Sequence

from nonebot.adapters.onebot.v11 import Message

from bot.chat import ImageSource
from bot.fetch import FetchPolicy, UrlImage


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


def image_sources(urls: Sequence[str], policy: FetchPolicy) -> tuple[ImageSource, ...]:
    """One lazy source per link, fetched only when the job runner asks.

    No shared client: each fetch makes its own (no proxies from the environment), because
    `bot.fetch` pins the connection to the address it checked, which a proxy would not keep.
    """
    return tuple(UrlImage(url, policy, f"image{i + 1}") for i, url in enumerate(urls))
