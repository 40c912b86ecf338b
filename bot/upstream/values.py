"""The values the image API port speaks in: requests, results, progress, and our own codes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from bot.images import Reference

USER_AGENT: Final = "drawbridge/0.1"

# `UpstreamError.code` values of our own, for failures that carry no upstream code.
CODE_CONNECT_FAILED: Final = "connect_failed"  # nothing was sent: safe to retry or move on
CODE_CONNECTION_LOST: Final = "connection_lost"  # sent, then the connection broke: may have run
CODE_TIMEOUT: Final = "timeout"
CODE_STREAM_CUT: Final = "stream_cut"
CODE_NO_DATA: Final = "no_data"
CODE_BAD_BASE64: Final = "bad_base64"
CODE_NOT_AN_IMAGE: Final = "not_an_image"
CODE_TRUNCATED_IMAGE: Final = "truncated_image"
CODE_NOT_JSON: Final = "not_json"
CODE_TOO_LARGE: Final = "too_large"
CODE_BAD_ENCODING: Final = "bad_encoding"  # a result sent compressed though identity was asked


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """One generation or edit as the upstream sees it (already validated by the caller)."""

    prompt: str
    # "1536x1024"; None: not sent, the API default applies.
    size: str | None = None
    n: int = 1
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    # Non-empty: an edit of these images.
    references: tuple[Reference, ...] = ()
    # An opaque end-user id (hashed by the caller), for the upstream's abuse tracking.
    user: str | None = None

    @property
    def is_edit(self) -> bool:
        """Whether this goes to `/v1/images/edits`."""
        return bool(self.references)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One result image, already downloaded or decoded, with its real format and size."""

    data: bytes
    mime: str
    width: int
    height: int
    revised_prompt: str | None


@dataclass(frozen=True, slots=True)
class ImageResult:
    """Everything one successful call produced."""

    images: tuple[GeneratedImage, ...]
    usage: dict[str, Any] | None
    provider: str
    model: str
    size: str | None
    # The first non-empty revised prompt among the images.
    revised_prompt: str | None
    elapsed: float
    # The size actually used when the provider refused a 4K size and we retried smaller.
    fallback_size: str | None


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress event.

    `kind` is one of "request_sent" (a generation's body is sent), "uploading" (an edit's
    references start uploading), "waiting" (the upload finished), "partial" (`data` is a
    partial preview, `index` its partial_image_index), "downloading" (fetching result `index`
    from its url) or "retry" (`index` is the attempt, `detail` why).
    """

    kind: str
    data: bytes | None = None
    index: int = 0
    detail: str = ""


ProgressHandler = Callable[[Progress], Awaitable[None]]
