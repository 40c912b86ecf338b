"""Reading a 200 answer: JSON and server-sent events, with base64 images decoded as they stream.

Memory: a 3840x2160 PNG is ~25 MB, ~34 MB as base64. Bodies are never held whole: the JSON is
read in chunks and every `b64_json` string is base64-decoded as it streams past, so the peak
is about the decoded image plus a small JSON skeleton (see `JsonImageReader`). The result
images are then checked to be what they claim (format, completeness, dimensions).
"""

from __future__ import annotations

import asyncio
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from PIL import Image

from bot.errors import MalformedResponseError
from bot.upstream.values import (
    CODE_BAD_BASE64,
    CODE_NOT_AN_IMAGE,
    CODE_NOT_JSON,
    CODE_TOO_LARGE,
    CODE_TRUNCATED_IMAGE,
)

# Everything in a response except the base64 images (prompt echo, usage, relay fields).
JSON_TEXT_LIMIT: Final = 4 * 1024 * 1024
# Pillow reads only the header, but a JPEG's SOF marker can sit behind large metadata.
_THREAD_INSPECT_BYTES: Final = 1024 * 1024


class JsonImageReader:
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
class SseMessage:
    """One `data:` message: its event name, JSON skeleton and the images decoded from it."""

    event: str
    text: bytes
    images: list[bytes]


class SseReader:
    """Splits a server-sent event stream into `data:` messages, fed in pieces.

    A completed event's line is ~34 MB of base64: lines are never collected whole, the data
    goes straight into a `JsonImageReader`. Every `data:` line is one JSON message (what all
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
        self._json: JsonImageReader | None = None

    def feed(self, chunk: bytes) -> list[SseMessage]:
        """Consume a piece of the stream; return the messages it completed."""
        messages: list[SseMessage] = []
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

    def finish(self) -> list[SseMessage]:
        """The message of a last line that had no newline, if any."""
        message = self._end_line() if self._kind is not None else None
        return [message] if message is not None else []

    def _start_field(self, name: bytes) -> None:
        if name == b"data":
            self._kind = "data"
            self._json = JsonImageReader(max_image_bytes=self._max_image)
        elif name == b"event":
            self._kind = "event"
            self._event_name = bytearray()
        else:  # comments (":"), id:, retry:
            self._kind = "skip"

    def _end_line(self) -> SseMessage | None:
        kind, self._kind = self._kind, None
        head, self._head = self._head, bytearray()
        if kind is None and not head.strip():
            self._event = ""  # a blank line ends the event
        elif kind == "event":
            self._event = bytes(self._event_name).strip().decode("utf-8", "replace")
        elif kind == "data" and self._json is not None:
            reader, self._json = self._json, None
            return SseMessage(self._event, reader.finish(), reader.images)
        return None


@dataclass(frozen=True, slots=True)
class Item:
    """A result as the response described it: decoded bytes, or a url still to download."""

    data: bytes | None
    url: str | None
    revised_prompt: str | None


@dataclass(slots=True)
class Answer:
    """What a 200 answer held, before result urls are downloaded."""

    items: list[Item] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    size: str | None = None


def load_object(text: bytes, what: str) -> dict[str, Any]:
    """`text` as a JSON object, else `MalformedResponseError` (code `not_json`)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise MalformedResponseError(f"{what} is not JSON", code=CODE_NOT_JSON) from exc
    if not isinstance(value, dict):
        raise MalformedResponseError(f"{what} is not a JSON object", code=CODE_NOT_JSON)
    return value


def item_from(obj: Mapping[str, Any], images: Sequence[bytes]) -> Item | None:
    """The result an answer's data entry (or completed event) describes, if any."""
    b64 = obj.get("b64_json")
    url = obj.get("url")
    revised = obj.get("revised_prompt")
    revised = revised if isinstance(revised, str) and revised.strip() else None
    if type(b64) is int and 0 <= b64 < len(images):
        return Item(images[b64], None, revised)
    if isinstance(url, str) and url.strip():
        return Item(None, url.strip(), revised)
    return None


def usage_of(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The answer's `usage` object, if it has one."""
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


async def inspect_image(data: bytes) -> tuple[str, int, int]:
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
