"""A OneBot v11 implementation for tests, standing in for NapCat, plus a stand-in QQ image CDN.

`FakeOneBot` connects to the bot's reverse WebSocket the way NapCat does (`X-Self-ID`,
`X-Client-Role: Universal`, `Authorization: Bearer <access token>`), reports a lifecycle
`connect` event, pushes message events (text, image, reply and at segments) and answers the
actions drawbridge uses with `{"status", "retcode", "data", "echo"}`. It keeps every message
(pushed or sent by the bot) so `get_msg` can return it, turns the bot's `base64://` images
into links on the image host as QQ does, records every action for assertions, and injects
failures with `fail_next` (an error answer) or `stall_next` (no answer at all: a timeout);
actions named in `unsupported` are answered as unknown, like a minimal implementation would.
A `message` sent as a string is read as CQ code, as NapCat reads it (`parse_cq`): each call
keeps the segments the implementation would have acted on, so a test sees an `at` or `image`
that text smuggled in.

`ImageHost` serves image bytes over HTTP on 127.0.0.1 and records each request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

Segment = dict[str, Any]


def text(value: str) -> Segment:
    return {"type": "text", "data": {"text": value}}


def image(url: str, name: str = "image.png") -> Segment:
    # NapCat's shape: a file name in `file`, the download link in `url`.
    return {"type": "image", "data": {"file": name, "url": url, "summary": "", "subType": 0}}


def reply(message_id: int) -> Segment:
    return {"type": "reply", "data": {"id": str(message_id)}}


def at(user_id: int | str) -> Segment:
    return {"type": "at", "data": {"qq": str(user_id)}}


def png(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A small real PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def cq_escape(value: str, *, in_param: bool = False) -> str:
    """OneBot v11's CQ-code escaping: `&`, `[`, `]` always, and `,` inside a parameter."""
    value = value.replace("&", "&amp;").replace("[", "&#91;").replace("]", "&#93;")
    return value.replace(",", "&#44;") if in_param else value


def cq_text(segments: list[Segment]) -> str:
    """The CQ-code form OneBot puts in `raw_message`."""
    parts = []
    for seg in segments:
        if seg["type"] == "text":
            parts.append(cq_escape(seg["data"]["text"]))
        else:
            params = "".join(
                f",{k}={cq_escape(str(v), in_param=True)}"
                for k, v in seg["data"].items()
                if v is not None
            )
            parts.append(f"[CQ:{seg['type']}{params}]")
    return "".join(parts)


# NapCat's decodeCQCode pattern (src/onebot/helper/cqcode.ts): a type, then `,key=value`
# pairs whose values hold no raw `,` or `]`.
_CQ_CODE = re.compile(r"\[CQ:(\w+)((?:,\w+=[^,\]]*)*)\]")


def _cq_unescape(value: str) -> str:
    return (
        value.replace("&#91;", "[")
        .replace("&#93;", "]")
        .replace("&#44;", ",")
        .replace("&amp;", "&")
    )


def parse_cq(message: str) -> list[Segment]:
    """A string `message` as NapCat reads it: CQ codes become segments, the rest text."""
    segments: list[Segment] = []
    position = 0
    for found in _CQ_CODE.finditer(message):
        if found.start() > position:
            segments.append(text(_cq_unescape(message[position : found.start()])))
        data: dict[str, str] = {}
        for pair in filter(None, found.group(2).split(",")):
            key, _, value = pair.partition("=")
            data[key] = _cq_unescape(value)
        segments.append({"type": found.group(1), "data": data})
        position = found.end()
    if position < len(message):
        segments.append(text(_cq_unescape(message[position:])))
    return segments


@dataclass
class ApiCall:
    """One action the bot called, as received."""

    action: str
    params: dict[str, Any]
    at: float
    # The `data` the fake answered with (None for failures and stalls).
    data: Any = None

    @property
    def message_id(self) -> int:
        """The id the fake gave the message this call sent."""
        return int(self.data["message_id"])

    @property
    def sent_as_string(self) -> bool:
        """Whether `message` came as a string (CQ code), not as a segment list."""
        return isinstance(self.params.get("message"), str)

    @property
    def segments(self) -> list[Segment]:
        """The `message` parameter as the implementation acts on it (send_msg and friends).

        A string is CQ code unless `auto_escape` is set, exactly as NapCat reads it.
        """
        message = self.params.get("message", [])
        if isinstance(message, str):
            if self.params.get("auto_escape") in (True, "true", 1):
                return [text(message)]
            return parse_cq(message)
        if isinstance(message, dict):
            return [message]
        return list(message)

    @property
    def text(self) -> str:
        return "".join(s["data"].get("text", "") for s in self.segments if s["type"] == "text")

    def images(self) -> list[bytes]:
        """The `base64://` images the bot sent in this message."""
        found = []
        for seg in self.segments:
            file = seg["data"].get("file", "") if seg["type"] == "image" else ""
            if isinstance(file, str) and file.startswith("base64://"):
                found.append(base64.b64decode(file.removeprefix("base64://")))
        return found

    def reply_to(self) -> int | None:
        for seg in self.segments:
            if seg["type"] == "reply":
                return int(seg["data"]["id"])
        return None


@dataclass(frozen=True)
class _Fault:
    action: str
    when: Callable[[ApiCall], bool]
    failure: tuple[int, str] | None  # None: no answer at all


@dataclass
class Stored:
    """A message the fake knows about (for `get_msg`)."""

    message_id: int
    message_type: str
    sender_id: int
    segments: list[Segment]
    group_id: int | None = None
    time: int = field(default_factory=lambda: int(time.time()))


class ImageHost:
    """A stand-in for QQ's image CDN: serves bytes at `/img/<name>` and logs requests."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/img/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add(self, name: str, data: bytes, host: str = "127.0.0.1") -> str:
        """Serve `data`; returns its URL on `host` (`localhost` names the same server)."""
        self.images[name] = data
        return f"http://{host}:{self.port}/img/{name}"

    async def _serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append(name)
        data = self.images.get(name)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")


class FakeOneBot:
    """A OneBot v11 implementation connected over reverse WebSocket (Universal role)."""

    def __init__(self, self_id: int = 10001, *, images: ImageHost | None = None) -> None:
        self.self_id = self_id
        self.images = images
        self.calls: list[ApiCall] = []
        self.messages: dict[int, Stored] = {}
        self.can_recall = True
        # Actions answered as unknown (retcode 1404), as a minimal implementation would.
        self.unsupported: set[str] = set()
        self._ids = itertools.count(5001)
        self._faults: list[_Fault] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    # --- connection ---

    async def connect(self, url: str, access_token: str | None = None) -> None:
        """Connect like NapCat's reverse WebSocket client; raises if the bot refuses."""
        headers = {
            "X-Self-ID": str(self.self_id),
            "X-Client-Role": "Universal",
            "User-Agent": "OneBot/11",
        }
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._session.ws_connect(url, headers=headers, max_msg_size=0)
        except BaseException:
            await self._session.close()
            raise
        self._reader = asyncio.create_task(self._read())
        await self._push(
            {"post_type": "meta_event", "meta_event_type": "lifecycle", "sub_type": "connect"}
        )

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None:
            await self._session.close()

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed

    # --- playing the users ---

    async def group_message(
        self,
        group_id: int,
        user_id: int,
        segments: list[Segment],
        *,
        nickname: str = "tester",
        role: str = "member",
    ) -> int:
        """Post a group message from `user_id`; returns its message id."""
        message_id = next(self._ids)
        self.messages[message_id] = Stored(message_id, "group", user_id, segments, group_id)
        await self._push(
            {
                "post_type": "message",
                "message_type": "group",
                "sub_type": "normal",
                "message_id": message_id,
                "group_id": group_id,
                "user_id": user_id,
                "anonymous": None,
                "message_format": "array",
                "font": 0,
                "sender": {"user_id": user_id, "nickname": nickname, "card": "", "role": role},
                "message": segments,
                # Last, as some implementations send it: a log showing a frame's tail shows it.
                "raw_message": cq_text(segments),
            }
        )
        return message_id

    async def private_message(self, user_id: int, segments: list[Segment]) -> int:
        """Post a private message from `user_id`; returns its message id."""
        message_id = next(self._ids)
        self.messages[message_id] = Stored(message_id, "private", user_id, segments)
        await self._push(
            {
                "post_type": "message",
                "message_type": "private",
                "sub_type": "friend",
                "message_id": message_id,
                "user_id": user_id,
                "message_format": "array",
                "font": 0,
                "sender": {"user_id": user_id, "nickname": "tester"},
                "message": segments,
                "raw_message": cq_text(segments),
            }
        )
        return message_id

    # --- failure injection ---

    def fail_next(
        self,
        action: str,
        retcode: int = 1200,
        message: str = "failed",
        *,
        when: Callable[[ApiCall], bool] = lambda _: True,
    ) -> None:
        """Answer the next `action` call that `when` accepts with a failure.

        Retcode 1200 is what NapCat answers when QQ's rich media upload fails.
        """
        self._faults.append(_Fault(action, when, (retcode, message)))

    def stall_next(self, action: str, *, when: Callable[[ApiCall], bool] = lambda _: True) -> None:
        """Never answer the next `action` call that `when` accepts (the bot's call times out)."""
        self._faults.append(_Fault(action, when, None))

    # --- assertions ---

    def called(self, *actions: str) -> list[ApiCall]:
        """Calls of these actions (any action when none given), in order."""
        return [c for c in self.calls if not actions or c.action in actions]

    async def wait_for(
        self, predicate: Callable[[list[ApiCall]], bool], within: float = 10.0
    ) -> list[ApiCall]:
        """Wait up to `within` seconds until `predicate(calls)` holds; returns the calls."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self.calls))
        return self.calls

    # --- the protocol ---

    async def _push(self, event: dict[str, Any]) -> None:
        assert self._ws is not None, "not connected"
        await self._ws.send_str(
            json.dumps({"time": int(time.time()), "self_id": self.self_id, **event})
        )

    async def _read(self) -> None:
        assert self._ws is not None
        async for frame in self._ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            request = json.loads(frame.data)
            call = ApiCall(request["action"], request.get("params") or {}, time.monotonic())
            answer = self._answer(call)
            call.data = answer.get("data") if answer else None
            async with self._changed:
                self.calls.append(call)
                self._changed.notify_all()
            if answer is None:
                continue
            answer["echo"] = request.get("echo")
            await self._ws.send_str(json.dumps(answer))

    def _answer(self, call: ApiCall) -> dict[str, Any] | None:
        fault = next((f for f in self._faults if f.action == call.action and f.when(call)), None)
        if fault is not None:
            self._faults.remove(fault)
            return None if fault.failure is None else _failed(*fault.failure)
        handler = getattr(self, "_do_" + call.action, None)
        if handler is None or call.action in self.unsupported:
            return _failed(1404, f"unsupported action {call.action}")
        result: dict[str, Any] = handler(call.params)
        return result

    def _do_send_msg(self, params: dict[str, Any]) -> dict[str, Any]:
        message_type = params.get("message_type") or (
            "group" if "group_id" in params else "private"
        )
        message_id = next(self._ids)
        segments = [self._as_received(s) for s in ApiCall("send_msg", params, 0).segments]
        group_id = int(params["group_id"]) if message_type == "group" else None
        self.messages[message_id] = Stored(
            message_id, message_type, self.self_id, segments, group_id
        )
        return _ok({"message_id": message_id})

    def _do_send_group_msg(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._do_send_msg({**params, "message_type": "group"})

    def _do_send_private_msg(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._do_send_msg({**params, "message_type": "private"})

    def _do_get_msg(self, params: dict[str, Any]) -> dict[str, Any]:
        stored = self.messages.get(int(params["message_id"]))
        if stored is None:
            return _failed(1404, "message not found")
        return _ok(
            {
                "time": stored.time,
                "message_type": stored.message_type,
                "message_id": stored.message_id,
                "real_id": stored.message_id,
                "sender": {"user_id": stored.sender_id, "nickname": "someone"},
                "message": stored.segments,
                "raw_message": cq_text(stored.segments),
            }
        )

    def _do_delete_msg(self, params: dict[str, Any]) -> dict[str, Any]:
        stored = self.messages.get(int(params["message_id"]))
        if stored is None:
            return _failed(1404, "message not found")
        if stored.sender_id != self.self_id and not self.can_recall:
            return _failed(200, "not an admin")
        del self.messages[stored.message_id]
        return _ok(None)

    def _do_upload_group_file(self, params: dict[str, Any]) -> dict[str, Any]:
        return _ok({"file_id": f"/{params.get('name', 'file')}"})

    def _do_upload_private_file(self, params: dict[str, Any]) -> dict[str, Any]:
        return _ok({"file_id": f"/{params.get('name', 'file')}"})

    def _do_get_login_info(self, params: dict[str, Any]) -> dict[str, Any]:
        return _ok({"user_id": self.self_id, "nickname": "drawbridge"})

    def _as_received(self, segment: Segment) -> Segment:
        """What QQ hands back for a sent segment: images become CDN links."""
        file = segment["data"].get("file", "")
        if segment["type"] != "image" or not str(file).startswith("base64://"):
            return segment
        data = base64.b64decode(str(file).removeprefix("base64://"))
        name = f"sent-{next(self._ids)}.png"
        url = self.images.add(name, data) if self.images else f"http://127.0.0.1:1/img/{name}"
        return image(url, name)


def _ok(data: Any) -> dict[str, Any]:
    return {"status": "ok", "retcode": 0, "data": data, "message": "", "wording": ""}


def _failed(retcode: int, message: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "retcode": retcode,
        "data": None,
        "message": message,
        "wording": message,
    }
