"""The wire to an OpenAI-compatible image API (gpt-image-2 behind new-api / one-api relays).

`UpstreamClient` calls `/v1/images/generations` and `/v1/images/edits` for one configured
provider, turns `b64_json` or `url` results into bytes at once, reports progress (partial
previews when streaming) and raises exactly one `UpstreamError` subclass per failure.
`ProviderChain` tries the configured providers in order.

Billing decides the retry rules: a relay may charge every request that reached the model and
there is no idempotency key, so only requests that surely did not run are retried (connection
refused, 429 with a short `Retry-After`, 502/503 with an empty body), never a timeout.

Memory: a 3840x2160 PNG is ~25 MB, ~34 MB as base64. Bodies are never held whole: the JSON is
read in chunks and every `b64_json` string is base64-decoded as it streams past, so the peak
is about the decoded image plus a small JSON skeleton (see `_JsonImageReader`).
"""

from __future__ import annotations

import asyncio
import binascii
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

import httpx
from PIL import Image

from bot.config import ProviderConfig
from bot.errors import (
    GroupDeniedError,
    InvalidKeyError,
    MalformedResponseError,
    ModerationError,
    NoChannelError,
    NoReferenceImageError,
    NotSupportedError,
    RateLimitedError,
    RequestTooLargeError,
    ResultDownloadError,
    TooManyReferencesError,
    UnknownParameterError,
    UpstreamError,
    UpstreamQuotaError,
    UpstreamSizeError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from bot.images import Reference
from bot.sizes import Size, fallback_size

log = logging.getLogger(__name__)

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

# A Retry-After longer than this is not worth holding a job slot for.
MAX_RETRY_AFTER: Final = 30.0
# Connect-error backoff: 0.5 s, 1 s, 2 s ...
BACKOFF_BASE: Final = 0.5
# Error answers are short; a relay's HTML error page need not be read whole.
ERROR_BODY_LIMIT: Final = 64 * 1024
# Everything in a response except the base64 images (prompt echo, usage, relay fields).
JSON_TEXT_LIMIT: Final = 4 * 1024 * 1024
DETAIL_LIMIT: Final = 300
# Pillow reads only the header, but a JPEG's SOF marker can sit behind large metadata.
_THREAD_INSPECT_BYTES: Final = 1024 * 1024


# --- values ---


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


# --- errors ---


@dataclass(frozen=True, slots=True)
class _Envelope:
    """The useful parts of an error body, whatever shape the relay chose."""

    message: str = ""
    code: str = ""
    type: str = ""
    param: str = ""


_SECRET_RE: Final = re.compile(r"(sk-|bearer\s+)[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)
_TAG_RE: Final = re.compile(r"<[^>]*>")
_UNKNOWN_PARAM_RE: Final = re.compile(r"unknown parameter:?\s*['\"`]?([\w.\[\]-]+)", re.IGNORECASE)

_KEY_MARKERS: Final = (
    "无效的令牌",
    "invalid token",
    "令牌已过期",
    "令牌额度已用尽",
    "令牌状态不可用",
    "未提供令牌",
    "incorrect api key",
    "invalid api key",
    "invalid_api_key",
)
# new-api: the key's own budget (not the account's) is spent, like "该令牌额度已用尽".
_KEY_CODES: Final = frozenset({"invalid_api_key", "pre_consume_token_quota_failed"})
_QUOTA_CODES: Final = frozenset({"insufficient_user_quota", "insufficient_quota"})
_QUOTA_MARKERS: Final = ("用户额度不足", "insufficient_user_quota", "insufficient_quota")
_MODERATION_CODES: Final = frozenset(
    {"moderation_blocked", "content_policy_violation", "sensitive_words_detected"}
)
_MODERATION_MARKERS: Final = ("safety system", "safety_violations", "敏感词", "sensitive words")
_NO_CHANNEL_MARKERS: Final = ("无可用渠道", "no available channel")
_SIZE_MARKERS: Final = ("divisible by 16", "invalid size")


def classify_error(
    status: int,
    body: bytes | str | dict[str, Any] | None,
    headers: Mapping[str, str] | None = None,
) -> UpstreamError:
    """Map an error answer (HTTP status, body, headers) to one typed `UpstreamError`.

    Understands the OpenAI envelope `{"error": {message, type, param, code}}`, new-api and
    one-api variants (Chinese messages, ` (request id: ...)` suffixes, `{"message": ...}`),
    plain-text and empty bodies. An in-stream error event is classified with status 200.
    The error's detail is short and never contains anything that looks like a key.
    """
    return _classify(status, body, headers, secret="")


def _classify(
    status: int,
    body: bytes | str | dict[str, Any] | None,
    headers: Mapping[str, str] | None,
    *,
    secret: str,
) -> UpstreamError:
    env = _envelope(body)
    code = env.code.lower()
    message = env.message.lower()
    etype = env.type.lower()
    detail = _scrub(" ".join(p for p in (str(status), env.code, env.message) if p), secret)
    kwargs: dict[str, Any] = {
        "status": status,
        "code": env.code or None,
        "retry_after": _retry_after(headers),
    }

    def has(markers: Sequence[str]) -> bool:
        return any(m in message or m in code for m in markers)

    if code in _KEY_CODES or has(_KEY_MARKERS):
        return InvalidKeyError(detail, **kwargs)
    if code in _QUOTA_CODES or has(_QUOTA_MARKERS):
        return UpstreamQuotaError(detail, **kwargs)
    if status == 401:
        return InvalidKeyError(detail, **kwargs)
    if code in _MODERATION_CODES or has(_MODERATION_MARKERS):
        return ModerationError(detail, **kwargs)
    if code == "model_not_found" or has(_NO_CHANNEL_MARKERS):
        return NoChannelError(detail, **kwargs)
    if "无权访问" in message and "分组" in message:
        return GroupDeniedError(detail, **kwargs)
    if code == "unknown_parameter" or "unknown parameter" in message:
        match = _UNKNOWN_PARAM_RE.search(env.message)
        param = env.param or (match.group(1) if match else "")
        return UnknownParameterError(detail, param=param, **kwargs)
    if code == "invalid_size" or env.param == "size" or has(_SIZE_MARKERS):
        return UpstreamSizeError(detail, **kwargs)
    if status == 429:
        return RateLimitedError(detail, **kwargs)
    if status == 413:
        return RequestTooLargeError(detail, **kwargs)
    if status == 501 or code == "api_not_implemented":
        return NotSupportedError(detail, **kwargs)
    if status >= 500 or "封号" in message or (status < 400 and etype == "server_error"):
        return UpstreamUnavailableError(detail, **kwargs)
    return UpstreamError(detail, **kwargs)


def _envelope(body: bytes | str | dict[str, Any] | None) -> _Envelope:
    if body is None:
        return _Envelope()
    text = ""
    obj: Any = body
    if isinstance(body, bytes | bytearray):
        text = bytes(body[:ERROR_BODY_LIMIT]).decode("utf-8", "replace")
    elif isinstance(body, str):
        text = body[:ERROR_BODY_LIMIT]
    if not isinstance(body, dict):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
    if not isinstance(obj, dict):
        # An nginx or Cloudflare error page: its words, not its markup.
        return _Envelope(message=" ".join(_TAG_RE.sub(" ", text).split()))
    error = obj.get("error")
    source: dict[str, Any] = error if isinstance(error, dict) else obj
    message = (
        _text(source.get("message"))
        or (error if isinstance(error, str) else "")
        or _text(obj.get("message"))
        or _text(obj.get("detail"))
        or _text(obj.get("msg"))
    )
    return _Envelope(
        message=" ".join(message.split()),
        code=_text(source.get("code")) or _text(obj.get("code")),
        type=_text(source.get("type")),
        param=_text(source.get("param")),
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _scrub(text: str, secret: str = "") -> str:
    """A short, single-line, key-free version of `text` for logs and job rows."""
    if len(secret) >= 8:  # a real key; replacing a 1-letter test key would garble the text
        text = text.replace(secret, "***")
    text = _SECRET_RE.sub(lambda m: m.group(1) + "***", text)
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        if "retry-after" in lowered:
            value = lowered["retry-after"].strip()
            try:
                return max(0.0, float(value))
            except ValueError:
                when = parsedate_to_datetime(value)
                return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (ValueError, TypeError):
        return None
    return None


# --- reading responses ---


class _JsonImageReader:
    """A JSON text fed in pieces, with every `b64_json` string decoded as it streams past.

    The text outside those strings (the "skeleton") is kept; each `b64_json` value is replaced
    in it by the index of its decoded image in `images` (or `null` when empty), so a normal
    `json.loads` of the skeleton gives the structure without a 30 MB string in memory.
    Only valid JSON can hold the bytes `"b64_json"` followed by `:` as an object key (inside a
    string the quotes would be escaped), so a byte search is enough to find the values.
    """

    _KEY: Final = b'"b64_json"'
    _OUTSIDE, _AFTER_KEY, _AFTER_COLON, _IN_VALUE = range(4)
    _WHITESPACE: Final = b" \t\r\n"

    def __init__(self, *, max_image_bytes: int, max_text_bytes: int = JSON_TEXT_LIMIT) -> None:
        self._max_image = max_image_bytes
        self._max_text = max_text_bytes
        self._text = bytearray()
        self.images: list[bytes] = []
        self._state = self._OUTSIDE
        # The value being decoded: BytesIO.getvalue() hands over its buffer without a copy.
        self._out = io.BytesIO()
        self._size = 0
        self._pending = b""  # up to 3 base64 characters waiting for a full quantum
        self._padded = False
        self._escape = False  # the previous piece ended with a backslash

    def feed(self, chunk: bytes, start: int = 0, end: int | None = None) -> None:
        """Consume `chunk[start:end]`."""
        end = len(chunk) if end is None else end
        i = start
        while i < end:
            if self._state == self._IN_VALUE:
                i = self._feed_value(chunk, i, end)
            elif self._state == self._OUTSIDE:
                i = self._find_key(chunk, i, end)
            elif chunk[i] in self._WHITESPACE:
                self._keep(chunk, i, i + 1)
                i += 1
            elif self._state == self._AFTER_KEY:
                if chunk[i] == ord(":"):
                    self._keep(chunk, i, i + 1)
                    self._state = self._AFTER_COLON
                    i += 1
                else:  # "b64_json" was a value (in a list, say), not a key
                    self._state = self._OUTSIDE
            elif chunk[i] == ord('"'):
                self._begin_value()
                i += 1
            else:  # null, a number...: nothing to decode
                self._state = self._OUTSIDE

    def finish(self) -> bytes:
        """The skeleton text; `images` holds the decoded values it points to."""
        if self._state != self._OUTSIDE:
            # Cut inside a value: leave the skeleton unterminated so parsing it fails.
            self._state = self._OUTSIDE
            self._out = io.BytesIO()
        return bytes(self._text)

    def _keep(self, chunk: bytes, start: int, end: int) -> None:
        self._text += memoryview(chunk)[start:end]
        if len(self._text) > self._max_text:
            raise MalformedResponseError("response text too large", code=CODE_TOO_LARGE)

    def _find_key(self, chunk: bytes, start: int, end: int) -> int:
        # The key may straddle two pieces: search the kept tail plus this piece.
        tail = bytes(self._text[-(len(self._KEY) - 1) :])
        window = tail + chunk[start:end]
        found = window.find(self._KEY)
        if found < 0:
            self._keep(chunk, start, end)
            return end
        stop = start + found + len(self._KEY) - len(tail)
        self._keep(chunk, start, stop)
        self._state = self._AFTER_KEY
        return stop

    def _begin_value(self) -> None:
        self._state = self._IN_VALUE
        self._out = io.BytesIO()
        self._size = 0
        self._pending = b""
        self._padded = False
        self._escape = False

    def _end_value(self) -> None:
        if self._pending:
            raise MalformedResponseError(
                "b64_json length is not a multiple of 4", code=CODE_BAD_BASE64
            )
        if self._size:
            self._keep_literal(str(len(self.images)).encode())
            self.images.append(self._out.getvalue())
        else:  # "" counts as absent
            self._keep_literal(b"null")
        self._out = io.BytesIO()
        self._state = self._OUTSIDE

    def _keep_literal(self, text: bytes) -> None:
        self._keep(text, 0, len(text))

    def _feed_value(self, chunk: bytes, start: int, end: int) -> int:
        if self._escape:
            self._escape = False
            self._unescape(chunk[start])
            return start + 1
        quote = chunk.find(b'"', start, end)
        backslash = chunk.find(b"\\", start, end)
        stop = min((p for p in (quote, backslash) if p >= 0), default=end)
        self._decode(chunk, start, stop)
        if stop == end:
            return end
        if stop == quote:
            self._end_value()
            return stop + 1
        if stop + 1 < end:
            self._unescape(chunk[stop + 1])
            return stop + 2
        self._escape = True
        return end

    def _unescape(self, byte: int) -> None:
        # JSON encoders may write "/" as "\/" and wrap long base64 with "\n".
        if byte == ord("/"):
            self._decode(b"/", 0, 1)
        elif byte not in b"nrt":
            raise MalformedResponseError("unexpected escape in b64_json", code=CODE_BAD_BASE64)

    def _decode(self, chunk: bytes, start: int, stop: int) -> None:
        if start >= stop:
            return
        if self._pending:
            take = min(4 - len(self._pending), stop - start)
            self._pending += chunk[start : start + take]
            start += take
            if len(self._pending) < 4:
                return
            quantum, self._pending = self._pending, b""
            self._emit(quantum)
        usable = (stop - start) // 4 * 4
        if usable:
            self._emit(memoryview(chunk)[start : start + usable])
        if start + usable < stop:
            self._pending = chunk[start + usable : stop]

    def _emit(self, text: bytes | memoryview) -> None:
        if self._padded:
            raise MalformedResponseError("data after base64 padding", code=CODE_BAD_BASE64)
        try:
            data = binascii.a2b_base64(text, strict_mode=True)
        except binascii.Error as exc:
            raise MalformedResponseError(f"invalid base64: {exc}", code=CODE_BAD_BASE64) from exc
        self._padded = text[-1] == ord("=")
        self._size += len(data)
        if self._size > self._max_image:
            raise MalformedResponseError("result image too large", code=CODE_TOO_LARGE)
        self._out.write(data)


@dataclass(frozen=True, slots=True)
class _SseMessage:
    event: str
    text: bytes
    images: list[bytes]


class _SseReader:
    """Splits a server-sent event stream into `data:` messages, fed in pieces.

    A completed event's line is ~34 MB of base64: lines are never collected whole, the data
    goes straight into a `_JsonImageReader`. Every `data:` line is one JSON message (what all
    relays send); the `event:` line is remembered for `event: error`.
    """

    _HEAD_LIMIT: Final = 64
    _EVENT_LIMIT: Final = 256

    def __init__(self, max_image_bytes: int) -> None:
        self._max_image = max_image_bytes
        self._kind: str | None = None  # None (line start), "data", "event" or "skip"
        self._head = bytearray()
        self._event_name = bytearray()
        self._event = ""
        self._json: _JsonImageReader | None = None

    def feed(self, chunk: bytes) -> list[_SseMessage]:
        """Consume a piece of the stream; return the messages it completed."""
        messages: list[_SseMessage] = []
        i, end = 0, len(chunk)
        while i < end:
            newline = chunk.find(b"\n", i)
            line_end = end if newline < 0 else newline
            if self._kind is None:
                colon = chunk.find(b":", i, line_end)
                if colon < 0:
                    self._head += chunk[i:line_end]
                    if len(self._head) > self._HEAD_LIMIT:
                        self._kind = "skip"
                    i = line_end
                else:
                    self._head += chunk[i:colon]
                    self._start_field(bytes(self._head).strip())
                    i = colon + 1
            if self._kind == "data" and self._json is not None:
                self._json.feed(chunk, i, line_end)
            elif self._kind == "event" and len(self._event_name) < self._EVENT_LIMIT:
                self._event_name += chunk[i:line_end]
            i = line_end
            if newline >= 0:
                message = self._end_line()
                if message is not None:
                    messages.append(message)
                i = newline + 1
        return messages

    def finish(self) -> list[_SseMessage]:
        """The message of a last line that had no newline, if any."""
        message = self._end_line() if self._kind is not None else None
        return [message] if message is not None else []

    def _start_field(self, name: bytes) -> None:
        if name == b"data":
            self._kind = "data"
            self._json = _JsonImageReader(max_image_bytes=self._max_image)
        elif name == b"event":
            self._kind = "event"
            self._event_name = bytearray()
        else:  # comments (":"), id:, retry:
            self._kind = "skip"

    def _end_line(self) -> _SseMessage | None:
        kind, self._kind = self._kind, None
        head, self._head = self._head, bytearray()
        if kind is None and not head.strip():
            self._event = ""  # a blank line ends the event
        elif kind == "event":
            self._event = bytes(self._event_name).strip().decode("utf-8", "replace")
        elif kind == "data" and self._json is not None:
            reader, self._json = self._json, None
            return _SseMessage(self._event, reader.finish(), reader.images)
        return None


@dataclass(frozen=True, slots=True)
class _Item:
    """A result as the response described it: decoded bytes, or a url still to download."""

    data: bytes | None
    url: str | None
    revised_prompt: str | None


@dataclass(slots=True)
class _Answer:
    items: list[_Item] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    size: str | None = None


def _load_object(text: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise MalformedResponseError(f"{what} is not JSON", code=CODE_NOT_JSON) from exc
    if not isinstance(value, dict):
        raise MalformedResponseError(f"{what} is not a JSON object", code=CODE_NOT_JSON)
    return value


def _item(obj: Mapping[str, Any], images: Sequence[bytes]) -> _Item | None:
    b64 = obj.get("b64_json")
    url = obj.get("url")
    revised = obj.get("revised_prompt")
    revised = revised if isinstance(revised, str) and revised.strip() else None
    if type(b64) is int and 0 <= b64 < len(images):
        return _Item(images[b64], None, revised)
    if isinstance(url, str) and url.strip():
        return _Item(None, url.strip(), revised)
    return None


def _usage(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    usage = obj.get("usage")
    return usage if isinstance(usage, dict) else None


# --- result images ---

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def _sniff(data: bytes) -> str | None:
    if data.startswith(_PNG_SIGNATURE):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _is_complete(data: bytes, mime: str) -> bool:
    """Whether the file ends where its format says (a cut base64 can still decode)."""
    if mime == "image/png":
        return b"IEND" in data[-64:]
    if mime == "image/jpeg":
        return b"\xff\xd9" in data[-64:]
    return int.from_bytes(data[4:8], "little") + 8 <= len(data)


def _dimensions(data: bytes) -> tuple[int, int]:
    # Image.open only parses the header; nothing is decoded.
    with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP")) as img:
        return img.size


async def _inspect(data: bytes) -> tuple[str, int, int]:
    """MIME type, width and height of a result image; `MalformedResponseError` if it is not one."""
    mime = _sniff(data)
    if mime is None:
        raise MalformedResponseError(
            "result is not a PNG, JPEG or WEBP image", code=CODE_NOT_AN_IMAGE
        )
    if not _is_complete(data, mime):
        raise MalformedResponseError("result image is truncated", code=CODE_TRUNCATED_IMAGE)
    try:
        if len(data) > _THREAD_INSPECT_BYTES:
            width, height = await asyncio.to_thread(_dimensions, data)
        else:
            width, height = _dimensions(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MalformedResponseError(
            f"unreadable result image: {type(exc).__name__}", code=CODE_NOT_AN_IMAGE
        ) from exc
    return mime, width, height


# --- the client ---


class _Retry(Exception):
    """An attempt failed in a way that surely did not run the request: try again."""

    def __init__(self, error: UpstreamError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


class _SentSignal(httpx.AsyncByteStream):
    """A request body that reports when its last byte has been handed to the connection."""

    def __init__(self, body: httpx.AsyncByteStream, on_sent: Callable[[], Awaitable[None]]) -> None:
        self._body = body
        self._on_sent = on_sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk
        await self._on_sent()

    async def aclose(self) -> None:
        await self._body.aclose()


async def _notify(on_progress: ProgressHandler | None, event: Progress) -> None:
    if on_progress is None:
        return
    try:
        await on_progress(event)
    except Exception:
        # A failed preview must not fail (or re-bill) an image that is being made.
        log.warning("progress handler failed on %s", event.kind, exc_info=True)


def _parse_wxh(size: str | None) -> Size | None:
    width, sep, height = (size or "").lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return Size(int(width), int(height))


DROPPABLE_FIELDS = frozenset({"stream", "partial_images", "user"})
"""Optional request fields we add ourselves and may leave out when a relay refuses them."""


class UpstreamClient:
    """The `ImageAPI` port over httpx, for ONE provider (base URL, key, model, limits).

    Pass a shared `http` client to pool connections; the client is then not closed by
    `aclose`. Per-provider concurrency is the job runner's business, not this class's.
    """

    def __init__(self, provider: ProviderConfig, *, http: httpx.AsyncClient | None = None) -> None:
        self.provider = provider
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(headers={"User-Agent": USER_AGENT})
        self._timeout = httpx.Timeout(provider.timeout, connect=provider.connect_timeout)
        # Optional fields this provider answered `unknown_parameter` to: left out from now on.
        self._refused: set[str] = set()

    def __repr__(self) -> str:
        return f"UpstreamClient({self.provider.name!r}, {self.provider.api_base!r})"

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this instance created it."""
        if self._owns_http:
            await self.http.aclose()

    async def run(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """An edit if the request has references, else a generation."""
        if request.is_edit:
            return await self.edit(request, on_progress)
        return await self.generate(request, on_progress)

    async def generate(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """POST /v1/images/generations (references, if any, are ignored)."""
        return await self._call("generations", request, on_progress)

    async def edit(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """POST /v1/images/edits with one `image[]` part per reference."""
        if not request.references:
            raise NoReferenceImageError("an edit needs at least one reference")
        if len(request.references) > self.provider.max_references:
            raise TooManyReferencesError(
                count=len(request.references), limit=self.provider.max_references
            )
        return await self._call("edits", request, on_progress)

    # --- one call: size fallback around retries around attempts ---

    async def _call(
        self, endpoint: str, request: ImageRequest, on_progress: ProgressHandler | None
    ) -> ImageResult:
        started = time.monotonic()
        size = request.size
        fallback: str | None = None
        try:
            answer = await self._without_refused_fields(endpoint, request, size, on_progress)
        except UpstreamSizeError:
            fallback = self._fallback_for(size)
            if fallback is None:
                raise
            log.info("%s refused size %s; retrying at %s", self.provider.name, size, fallback)
            await _notify(on_progress, Progress("retry", index=1, detail="size_fallback"))
            size = fallback
            answer = await self._without_refused_fields(endpoint, request, size, on_progress)
        images = await self._materialize(answer, on_progress)
        return ImageResult(
            images=tuple(images),
            usage=answer.usage,
            provider=self.provider.name,
            model=self.provider.model,
            size=answer.size or size,
            revised_prompt=next((i.revised_prompt for i in images if i.revised_prompt), None),
            elapsed=time.monotonic() - started,
            fallback_size=fallback,
        )

    async def _without_refused_fields(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
    ) -> _Answer:
        """Drop an optional field the relay refuses as unknown, then ask again (once each).

        Some relays reject `stream`/`partial_images` or `user` with `unknown_parameter`; an
        error answer was not billed, so asking again without the field is safe. The client
        remembers, so later requests leave it out from the start.
        """
        while True:
            try:
                return await self._with_retries(endpoint, request, size, on_progress)
            except UnknownParameterError as error:
                param = str(error.params.get("param") or "")
                if param not in DROPPABLE_FIELDS or param in self._refused:
                    raise
                self._refused.add(param)
                log.warning("%s refuses %r; asking without it", self.provider.name, param)
                await _notify(on_progress, Progress("retry", detail=f"without_{param}"))

    def _fallback_for(self, size: str | None) -> str | None:
        parsed = _parse_wxh(size)
        if not self.provider.size_fallback or parsed is None:
            return None
        smaller = fallback_size(parsed, self.provider.model)
        return str(smaller) if smaller is not None else None

    async def _with_retries(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
    ) -> _Answer:
        attempt = 0
        while True:
            try:
                return await self._attempt(endpoint, request, size, on_progress)
            except _Retry as retry:
                if attempt >= self.provider.max_retries:
                    log.warning(
                        "%s %s failed after %d retries: %s",
                        self.provider.name,
                        endpoint,
                        attempt,
                        retry.error,
                    )
                    raise retry.error from retry.__cause__
                attempt += 1
                delay = (
                    retry.delay if retry.delay is not None else BACKOFF_BASE * 2 ** (attempt - 1)
                )
                log.warning(
                    "%s %s: %s; retry %d/%d in %.1fs",
                    self.provider.name,
                    endpoint,
                    retry.error,
                    attempt,
                    self.provider.max_retries,
                    delay,
                )
                await _notify(
                    on_progress, Progress("retry", index=attempt, detail=retry.error.kind)
                )
                await asyncio.sleep(delay)
            except UpstreamError as error:
                log.warning(
                    "%s %s failed: %s (%s)", self.provider.name, endpoint, error.kind, error
                )
                raise

    async def _attempt(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
    ) -> _Answer:
        http_request = self._build(endpoint, request, size, on_progress)
        try:
            async with asyncio.timeout(self.provider.timeout):
                if endpoint == "edits":
                    await _notify(on_progress, Progress("uploading", index=len(request.references)))
                response = await self.http.send(http_request, stream=True)
                try:
                    if not response.is_success:
                        body = await _read_limited(response, ERROR_BODY_LIMIT)
                        raise self._error_answer(response, body)
                    return await self._read_answer(response, request.n, on_progress)
                finally:
                    await response.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = UpstreamUnavailableError(
                f"cannot connect: {type(exc).__name__}", code=CODE_CONNECT_FAILED
            )
            raise _Retry(error) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            # The request may be running upstream, and may be billed: never retried.
            raise UpstreamTimeoutError(
                f"no answer within {self.provider.timeout:g}s ({type(exc).__name__})",
                code=CODE_TIMEOUT,
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(
                f"connection lost: {type(exc).__name__}", code=CODE_CONNECTION_LOST
            ) from exc

    def _build(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
    ) -> httpx.Request:
        provider = self.provider
        stream = bool(provider.stream) and not self._refused & {"stream", "partial_images"}
        fields: dict[str, Any] = {"model": provider.model, "prompt": request.prompt, "n": request.n}
        optional = {
            "size": size,
            "quality": request.quality,
            "background": request.background,
            "output_format": request.output_format,
            "output_compression": request.output_compression,
            "moderation": request.moderation,
            "user": None if "user" in self._refused else request.user,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        if stream:
            fields["stream"] = True
            fields["partial_images"] = provider.partial_images
        if provider.response_format:
            fields["response_format"] = provider.response_format
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json, text/event-stream",
        }
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        url = f"{provider.api_base}/v1/images/{endpoint}"
        if endpoint == "edits":
            form = {k: _form_value(v) for k, v in fields.items()}
            files = [("image[]", (r.filename, r.data, r.mime)) for r in request.references]
            built = self.http.build_request(
                "POST", url, data=form, files=files, headers=headers, timeout=self._timeout
            )
            sent = Progress("waiting")
        else:
            built = self.http.build_request(
                "POST", url, json=fields, headers=headers, timeout=self._timeout
            )
            sent = Progress("request_sent")
        if on_progress is not None and isinstance(built.stream, httpx.AsyncByteStream):
            built.stream = _SentSignal(built.stream, lambda: _notify(on_progress, sent))
        return built

    def _error_answer(self, response: httpx.Response, body: bytes) -> Exception:
        error = _classify(
            response.status_code, body, response.headers, secret=self.provider.api_key
        )
        if response.status_code in (502, 503) and not body.strip():
            # A gateway answering with nothing never reached the model.
            return _Retry(error)
        if (
            isinstance(error, RateLimitedError)
            and error.retry_after is not None
            and error.retry_after <= MAX_RETRY_AFTER
        ):
            return _Retry(error, error.retry_after)
        return error

    async def _read_answer(
        self, response: httpx.Response, wanted: int, on_progress: ProgressHandler | None
    ) -> _Answer:
        content_type = response.headers.get("content-type", "").lower()
        try:
            if content_type.startswith("text/event-stream"):
                return await self._read_events(response, wanted, on_progress)
            # Also the answer of relays that ignore `stream`.
            return await self._read_json(response)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            # The upstream answered 200: it ran. Nothing to retry, nothing to fall back to.
            raise MalformedResponseError(
                f"response cut: {type(exc).__name__}", code=CODE_STREAM_CUT
            ) from exc

    async def _read_json(self, response: httpx.Response) -> _Answer:
        reader = _JsonImageReader(max_image_bytes=self.provider.max_result_bytes)
        async for chunk in response.aiter_bytes():
            reader.feed(chunk)
        obj = _load_object(reader.finish(), "response")
        return self._answer_from(obj, reader.images)

    def _answer_from(self, obj: dict[str, Any], images: Sequence[bytes]) -> _Answer:
        data = obj.get("data")
        if obj.get("error") and not data:
            # Some relays wrap failures in a 200.
            raise _classify(200, obj, None, secret=self.provider.api_key)
        items = (
            [_item(entry, images) for entry in data if isinstance(entry, dict)]
            if isinstance(data, list)
            else []
        )
        size = obj.get("size")
        return _Answer(
            items=[i for i in items if i is not None],
            usage=_usage(obj),
            size=size if isinstance(size, str) and size else None,
        )

    async def _read_events(
        self, response: httpx.Response, wanted: int, on_progress: ProgressHandler | None
    ) -> _Answer:
        reader = _SseReader(self.provider.max_result_bytes)
        answer = _Answer()
        done = False
        try:
            async for chunk in response.aiter_bytes():
                for message in reader.feed(chunk):
                    done = await self._on_event(message, answer, on_progress)
                    if done:
                        break
                if done:
                    break
            else:
                for message in reader.finish():
                    await self._on_event(message, answer, on_progress)
        except httpx.TransportError:
            if not answer.items or len(answer.items) < wanted:
                raise
            log.info("%s: stream cut after all %d images", self.provider.name, wanted)
        if not answer.items:
            raise MalformedResponseError(
                "stream ended without a completed image", code=CODE_STREAM_CUT
            )
        return answer

    async def _on_event(
        self, message: _SseMessage, answer: _Answer, on_progress: ProgressHandler | None
    ) -> bool:
        """Apply one event to `answer`; True at `[DONE]`."""
        text = message.text.strip()
        if not text:
            return False
        if text == b"[DONE]":
            return True
        obj = _load_object(text, "stream event")
        kind_value = obj.get("type")
        kind = kind_value if isinstance(kind_value, str) else ""
        if message.event == "error" or kind == "error" or obj.get("error"):
            raise _classify(200, obj, None, secret=self.provider.api_key)
        if kind.endswith("partial_image"):
            found = _item(obj, message.images)
            if found is not None and found.data is not None:
                index = obj.get("partial_image_index")
                await _notify(
                    on_progress,
                    Progress("partial", data=found.data, index=index if type(index) is int else 0),
                )
        elif kind.endswith("completed"):
            found = _item(obj, message.images)
            if found is not None:
                answer.items.append(found)
            # Relays repeat the whole request's usage on each completed event: keep the last.
            answer.usage = _usage(obj) or answer.usage
            size = obj.get("size")
            if isinstance(size, str) and size:
                answer.size = size
        elif isinstance(obj.get("data"), list):
            # A whole non-streamed answer sent as one event.
            whole = self._answer_from(obj, message.images)
            answer.items.extend(whole.items)
            answer.usage = whole.usage or answer.usage
            answer.size = whole.size or answer.size
        return False

    # --- results ---

    async def _materialize(
        self, answer: _Answer, on_progress: ProgressHandler | None
    ) -> list[GeneratedImage]:
        if not answer.items:
            raise MalformedResponseError("no image in the response", code=CODE_NO_DATA)
        images: list[GeneratedImage] = []
        for index, item in enumerate(answer.items):
            data = item.data
            if data is None and item.url is not None:
                await _notify(on_progress, Progress("downloading", index=index))
                data = await self._download(item.url)
            if data is None:
                continue
            mime, width, height = await _inspect(data)
            images.append(GeneratedImage(data, mime, width, height, item.revised_prompt))
        return images

    async def _download(self, url: str) -> bytes:
        """Fetch a result url at once (relay urls expire), capped at max_result_bytes."""
        limit = self.provider.max_result_bytes
        host = httpx.URL(url).host if url.startswith(("http://", "https://")) else ""
        if not host:
            raise ResultDownloadError("result url is not http(s)", code="bad_url")
        try:
            async with asyncio.timeout(self.provider.timeout):
                # No Authorization: the url may point at another host (a CDN).
                async with self.http.stream(
                    "GET",
                    url,
                    headers={"User-Agent": USER_AGENT},
                    timeout=self._timeout,
                    follow_redirects=True,
                ) as response:
                    if not response.is_success:
                        raise ResultDownloadError(
                            f"GET result on {host}: {response.status_code}",
                            status=response.status_code,
                        )
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise ResultDownloadError(
                            f"result on {host} is {declared} bytes", code=CODE_TOO_LARGE
                        )
                    buffer = io.BytesIO()
                    async for chunk in response.aiter_bytes():
                        buffer.write(chunk)
                        if buffer.tell() > limit:
                            raise ResultDownloadError(
                                f"result on {host} exceeds {limit} bytes", code=CODE_TOO_LARGE
                            )
                    return buffer.getvalue()
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise ResultDownloadError(f"GET result on {host} timed out", code=CODE_TIMEOUT) from exc
        except httpx.HTTPError as exc:
            raise ResultDownloadError(
                f"GET result on {host}: {type(exc).__name__}", code=CODE_CONNECTION_LOST
            ) from exc


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


# --- several providers ---


def _surely_not_billed(error: UpstreamError) -> bool:
    """An error answer, or no connection at all: the upstream did not make (or bill) an image."""
    return error.status is not None or error.code == CODE_CONNECT_FAILED


class ProviderChain:
    """Tries the configured providers in order.

    Moves to the next provider only when the error class allows it (`try_next_provider`) and
    the request surely was not billed (an error answer, a connect failure) — never after a
    timeout. An edit skips providers taking fewer references than it has.
    """

    def __init__(self, clients: Sequence[UpstreamClient]) -> None:
        self.clients = list(clients)

    async def run(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """The first provider's result that succeeds; else the most telling error."""
        errors: list[UpstreamError] = []
        tried = 0
        for client in self.clients:
            if request.is_edit and client.provider.max_references < len(request.references):
                continue
            if tried:
                await _notify(on_progress, Progress("retry", index=tried, detail="next_provider"))
            tried += 1
            try:
                return await client.run(request, on_progress)
            except UpstreamError as error:
                if not (type(error).try_next_provider and _surely_not_billed(error)):
                    raise
                log.info(
                    "provider %s failed (%s); trying the next", client.provider.name, error.kind
                )
                errors.append(error)
        if not tried:
            limit = max((c.provider.max_references for c in self.clients), default=0)
            raise TooManyReferencesError(count=len(request.references), limit=limit)
        # Every provider failed: "unavailable" says less than, say, "no channel".
        specific = [e for e in errors if not isinstance(e, UpstreamUnavailableError)]
        raise (specific or errors)[-1]

    async def aclose(self) -> None:
        """Close every client (and the HTTP clients they own)."""
        for client in self.clients:
            await client.aclose()


def build_clients(
    providers: Sequence[ProviderConfig], http: httpx.AsyncClient | None = None
) -> list[UpstreamClient]:
    """One client per configured provider, sharing `http` when given."""
    return [UpstreamClient(provider, http=http) for provider in providers]
