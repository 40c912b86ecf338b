"""A fake Telegram Bot API server for tests: aiohttp on 127.0.0.1, spoken to by the real aiogram.

It answers the methods drawbridge uses the way api.telegram.org does (multipart requests,
`attach://<key>` uploads, `{"ok": false, "error_code", "description", "parameters"}` errors,
long-polled `getUpdates` with offsets, file downloads from `/file/bot<token>/<path>`, webhook
delivery with the secret header), keeps the messages it "sent" so users can reply to them,
and records every call for assertions. Test code plays the users with `send_message` and
`press_button`, and injects failures with `fail_next`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

MB = 1024 * 1024
DEFAULT_TOKEN = "123456789:AAFakeTokenForTests_x1y2z3abcdefghij"


@dataclass
class Upload:
    """One multipart file part of a request."""

    field: str
    filename: str
    data: bytes


@dataclass
class ApiCall:
    """One Bot API request as the fake received it, and the HTTP status it answered."""

    method: str
    fields: dict[str, str]
    files: dict[str, Upload]
    at: float
    status: int = 200

    def json(self, name: str) -> Any:
        """A JSON-serialized field (`reply_markup`, `media`, `commands`), decoded."""
        return json.loads(self.fields[name])

    def attachment(self, ref: str) -> Upload:
        """The upload an `attach://<key>` reference points to."""
        assert ref.startswith("attach://"), ref
        return self.files[ref.removeprefix("attach://")]


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    data: bytes
    path: str
    mime: str


@dataclass
class _Failure:
    method: str
    error_code: int
    description: str
    retry_after: int | None
    times: int
    chat_id: int | None = None


@dataclass
class FakeTelegram:
    """The fake server. `await start()` returns the base URL for `TELEGRAM_API_SERVER`."""

    token: str = DEFAULT_TOKEN
    username: str = "drawbridge_test_bot"
    photo_max_bytes: int = 10 * MB
    download_max_bytes: int = 20 * MB
    # Per-chat: False means the bot lacks `can_delete_messages` there.
    can_delete: dict[int, bool] = field(default_factory=dict)
    # `--local` mode: getFile answers with absolute paths of files written here.
    local_dir: Path | None = None
    # The bot's id in getMe and on its messages; by default the token's numeric prefix.
    bot_user_id: int | None = None
    # getChatMember: (chat id, user id) -> status ("creator", "administrator"); else "member".
    chat_members: dict[tuple[int, int], str] = field(default_factory=dict)

    calls: list[ApiCall] = field(default_factory=list)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    files: dict[str, StoredFile] = field(default_factory=dict)
    commands: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    webhook: dict[str, Any] | None = None
    webhook_deliveries: list[int] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    base_url: str = ""

    def __post_init__(self) -> None:
        self.bot_id = self.bot_user_id or int(self.token.split(":", 1)[0])
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._file_ids = itertools.count(1)
        self._group_ids = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self._failures: list[_Failure] = []
        # Replaced on every change: waiters hold the old one, which is set.
        self._tick = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._webhook_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._webhook_task: asyncio.Task[None] | None = None

    # --- lifecycle ---

    async def start(self) -> str:
        app = web.Application(client_max_size=200 * MB)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        self._webhook_task = asyncio.create_task(self._deliver_webhooks())
        return self.base_url

    async def stop(self) -> None:
        self._closing = True
        self._poke()
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._webhook_task
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTelegram:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the users' side ---

    @staticmethod
    def user(user_id: int = 1001, first_name: str = "Alice", language_code: str = "en") -> dict:
        return {
            "id": user_id,
            "is_bot": False,
            "first_name": first_name,
            "language_code": language_code,
        }

    @staticmethod
    def private_chat(user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    @staticmethod
    def group_chat(chat_id: int = -1001234567890, title: str = "Artists") -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    def add_file(self, data: bytes, *, mime: str = "image/png", ext: str = "png") -> StoredFile:
        n = next(self._file_ids)
        stored = StoredFile(
            file_id=f"FILE{n:05d}-{len(data)}",
            file_unique_id=f"U{n:05d}",
            data=data,
            path=f"photos/file_{n}.{ext}",
            mime=mime,
        )
        self.files[stored.file_id] = stored
        return stored

    def photo_sizes(self, data: bytes) -> list[dict[str, Any]]:
        """A PhotoSize list like Telegram's: a small thumbnail first, the full image last."""
        width, height = _dimensions(data)
        thumb = self.add_file(_tiny_png(), mime="image/png")
        full = self.add_file(data, mime=_mime(data))
        scale = 90 / max(width, height, 1)
        return [
            {
                "file_id": thumb.file_id,
                "file_unique_id": thumb.file_unique_id,
                "width": max(1, round(width * scale)),
                "height": max(1, round(height * scale)),
                "file_size": len(thumb.data),
            },
            {
                "file_id": full.file_id,
                "file_unique_id": full.file_unique_id,
                "width": width,
                "height": height,
                "file_size": len(data),
            },
        ]

    def document(self, data: bytes, *, file_name: str, mime: str) -> dict[str, Any]:
        stored = self.add_file(data, mime=mime, ext=file_name.rsplit(".", 1)[-1])
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": file_name,
            "mime_type": mime,
            "file_size": len(data),
        }

    def send_message(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        text: str | None = None,
        *,
        caption: str | None = None,
        photo: bytes | None = None,
        document: bytes | None = None,
        document_name: str = "image.png",
        document_mime: str = "image/png",
        document_size: int | None = None,
        reply_to: dict[str, Any] | None = None,
        media_group_id: str | None = None,
    ) -> dict[str, Any]:
        """A user writes in `chat`; the update is queued (or posted to the webhook)."""
        message = self._new_message(chat, user)
        if text is not None:
            message["text"] = text
            if text.startswith("/"):
                length = len(text.split(maxsplit=1)[0])
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
        if caption is not None:
            message["caption"] = caption
        if photo is not None:
            message["photo"] = self.photo_sizes(photo)
        if document is not None:
            message["document"] = self.document(
                document, file_name=document_name, mime=document_mime
            )
            if document_size is not None:
                # Telegram reports the size; a "huge" file need not be allocated in tests.
                message["document"]["file_size"] = document_size
        if reply_to is not None:
            message["reply_to_message"] = {
                k: v for k, v in reply_to.items() if k != "reply_to_message"
            }
        if media_group_id is not None:
            message["media_group_id"] = media_group_id
        self._store(message)
        self.push_update({"message": message})
        return message

    def press_button(
        self, chat: dict[str, Any], user: dict[str, Any], message: dict[str, Any], data: str
    ) -> str:
        """A user presses an inline button under `message`; returns the callback query id."""
        query_id = f"CB{next(self._callback_ids)}"
        self.push_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "chat_instance": f"ci{chat['id']}",
                    "message": message,
                    "data": data,
                }
            }
        )
        return query_id

    def push_update(self, payload: dict[str, Any]) -> int:
        update = {"update_id": next(self._update_ids), **payload}
        if self.webhook is not None:
            self._webhook_queue.put_nowait(update)
        else:
            self._updates.append(update)
            self._poke()
        return update["update_id"]

    def fail_next(
        self,
        method: str,
        *,
        error_code: int = 429,
        description: str | None = None,
        retry_after: int | None = None,
        times: int = 1,
        chat_id: int | None = None,
    ) -> None:
        """Answer the next `times` calls of `method` with this error instead of running them.

        With `chat_id`, only calls to that chat fail (one chat in a flood wait, others not).
        """
        if description is None:
            description = (
                f"Too Many Requests: retry after {retry_after}"
                if error_code == 429
                else "Bad Request: injected failure"
            )
        self._failures.append(
            _Failure(method, error_code, description, retry_after, times, chat_id)
        )

    # --- the bot's side, for assertions ---

    def calls_of(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def ok_calls(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and c.status == 200]

    def bot_messages(self, chat_id: int) -> list[dict[str, Any]]:
        return [
            m
            for (cid, _), m in sorted(self.messages.items())
            if cid == chat_id
            and m.get("from", {}).get("id") == self.bot_id
            and not m.get("_deleted")
        ]

    async def wait_for(
        self, predicate: Callable[[], Any], *, within: float = 10.0, what: str = "condition"
    ) -> Any:
        """Wait until `predicate()` is truthy (re-checked on every request) and return it."""
        deadline = time.monotonic() + within
        while not (value := predicate()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                methods = [c.method for c in self.calls]
                raise AssertionError(f"timed out waiting for {what}; calls: {methods}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), min(remaining, 0.2))
        return value

    async def wait_call(
        self,
        method: str,
        *,
        count: int = 1,
        where: Callable[[ApiCall], bool] | None = None,
        ok: bool = True,
        within: float = 10.0,
    ) -> ApiCall:
        """Wait for the `count`-th call of `method` (answered 200 when `ok`) and return it."""

        def found() -> ApiCall | None:
            hits = [
                c
                for c in self.calls
                if c.method == method
                and (not ok or c.status == 200)
                and (where is None or where(c))
            ]
            return hits[count - 1] if len(hits) >= count else None

        return await self.wait_for(found, within=within, what=f"{method} #{count}")

    # --- HTTP ---

    def _poke(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        fields: dict[str, str] = {}
        files: dict[str, Upload] = {}
        if request.method == "POST":
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    files[key] = Upload(key, value.filename, value.file.read())
                else:
                    fields[key] = str(value)
        fields.update({k: v for k, v in request.query.items() if k not in fields})
        call = ApiCall(method, fields, files, time.monotonic())
        self.calls.append(call)
        try:
            if request.match_info["token"] != self.token:
                return self._error(call, 401, "Unauthorized")
            failure = self._take_failure(method, fields.get("chat_id"))
            if failure is not None:
                return self._error(
                    call, failure.error_code, failure.description, failure.retry_after
                )
            handler = getattr(self, f"_m_{method}", None)
            if handler is None:
                return self._error(call, 404, "Not Found: method not found")
            try:
                result = await handler(call)
            except _ApiError as e:
                return self._error(call, e.code, e.description)
            return web.json_response({"ok": True, "result": result})
        finally:
            self._poke()

    def _error(
        self, call: ApiCall, code: int, description: str, retry_after: int | None = None
    ) -> web.Response:
        call.status = code
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=code)

    def _take_failure(self, method: str, chat_id: str | None) -> _Failure | None:
        for failure in self._failures:
            if failure.chat_id is not None and str(failure.chat_id) != chat_id:
                continue
            if failure.method == method and failure.times > 0:
                failure.times -= 1
                return failure
        return None

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401, text="Unauthorized")
        path = request.match_info["path"]
        self.downloads.append(path)
        for stored in self.files.values():
            if stored.path == path:
                return web.Response(body=stored.data, content_type=stored.mime)
        return web.Response(status=404, text="Not Found")

    async def _deliver_webhooks(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                update = await self._webhook_queue.get()
                hook = self.webhook
                if hook is None:
                    self._updates.append(update)
                    continue
                headers = {}
                if hook.get("secret_token"):
                    headers["X-Telegram-Bot-Api-Secret-Token"] = hook["secret_token"]
                try:
                    async with session.post(hook["url"], json=update, headers=headers) as resp:
                        self.webhook_deliveries.append(resp.status)
                except aiohttp.ClientError:
                    self.webhook_deliveries.append(0)
                self._poke()

    # --- helpers for messages ---

    def _bot_user(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Drawbridge",
            "username": self.username,
        }

    def _chat(self, chat_id: int) -> dict[str, Any]:
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": "User"}
        return {"id": chat_id, "type": "supergroup", "title": "Group"}

    def _new_message(self, chat: dict[str, Any], sender: dict[str, Any]) -> dict[str, Any]:
        ids = self._message_ids.setdefault(chat["id"], itertools.count(1))
        return {"message_id": next(ids), "date": int(time.time()), "chat": chat, "from": sender}

    def _store(self, message: dict[str, Any]) -> None:
        self.messages[(message["chat"]["id"], message["message_id"])] = message

    def _bot_message(self, call: ApiCall) -> dict[str, Any]:
        chat_id = _int(call.fields, "chat_id")
        message = self._new_message(self._chat(chat_id), self._bot_user())
        reply_to = self._reply_target(call, chat_id)
        if reply_to is not None:
            message["reply_to_message"] = {
                k: v for k, v in reply_to.items() if k != "reply_to_message"
            }
        if "reply_markup" in call.fields:
            markup = call.json("reply_markup")
            if "inline_keyboard" in markup:
                message["reply_markup"] = markup
        return message

    def _reply_target(self, call: ApiCall, chat_id: int) -> dict[str, Any] | None:
        target: int | None = None
        allow_missing = False
        if "reply_parameters" in call.fields:
            params = call.json("reply_parameters")
            target = params.get("message_id")
            allow_missing = bool(params.get("allow_sending_without_reply"))
        elif "reply_to_message_id" in call.fields:
            target = int(call.fields["reply_to_message_id"])
            allow_missing = call.fields.get("allow_sending_without_reply") == "true"
        if target is None:
            return None
        found = self.messages.get((chat_id, target))
        if found is None or found.get("_deleted"):
            if allow_missing:
                return None
            raise _ApiError(400, "Bad Request: message to be replied not found")
        return found

    def _find(self, call: ApiCall) -> dict[str, Any]:
        key = (_int(call.fields, "chat_id"), _int(call.fields, "message_id"))
        message = self.messages.get(key)
        if message is None or message.get("_deleted"):
            raise _ApiError(400, "Bad Request: message to edit not found")
        return message

    def _upload(self, call: ApiCall, ref: str) -> bytes:
        if ref.startswith("attach://"):
            return call.attachment(ref).data
        if ref in self.files:
            return self.files[ref].data
        raise _ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")

    def _photo(self, data: bytes) -> list[dict[str, Any]]:
        if len(data) > self.photo_max_bytes:
            raise _ApiError(400, "Bad Request: PHOTO_SAVE_FILE_INVALID")
        try:
            width, height = _dimensions(data)
        except Exception:
            raise _ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from None
        if width + height > 10000 or max(width, height) / max(1, min(width, height)) > 20:
            raise _ApiError(400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
        return self.photo_sizes(data)

    def _document(self, data: bytes, filename: str) -> dict[str, Any]:
        if len(data) > 50 * MB:
            raise _ApiError(413, "Request Entity Too Large")
        return self.document(data, file_name=filename, mime=_mime(data))

    def _media_item(self, call: ApiCall, item: dict[str, Any]) -> dict[str, Any]:
        ref = item["media"]
        data = self._upload(call, ref)
        if item["type"] == "photo":
            return {"photo": self._photo(data)}
        if item["type"] == "document":
            name = call.attachment(ref).filename if ref.startswith("attach://") else "file"
            return {"document": self._document(data, name)}
        raise _ApiError(400, f"Bad Request: unsupported media type {item['type']}")

    # --- methods ---

    async def _m_getMe(self, call: ApiCall) -> dict[str, Any]:
        return {**self._bot_user(), "can_join_groups": True, "can_read_all_group_messages": False}

    async def _m_getUpdates(self, call: ApiCall) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise _ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = int(call.fields.get("offset", "0") or 0)
        timeout = float(call.fields.get("timeout", "0") or 0)
        limit = int(call.fields.get("limit", "100") or 100)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        while not self._updates and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), remaining)
        return self._updates[:limit]

    async def _m_setWebhook(self, call: ApiCall) -> bool:
        self.webhook = {"url": call.fields["url"], "secret_token": call.fields.get("secret_token")}
        return True

    async def _m_deleteWebhook(self, call: ApiCall) -> bool:
        self.webhook = None
        return True

    async def _m_setMyCommands(self, call: ApiCall) -> bool:
        self.commands[call.fields.get("language_code", "")] = call.json("commands")
        return True

    async def _m_getChatMember(self, call: ApiCall) -> dict[str, Any]:
        chat_id, user_id = _int(call.fields, "chat_id"), _int(call.fields, "user_id")
        status = self.chat_members.get((chat_id, user_id), "member")
        member: dict[str, Any] = {"status": status, "user": self.user(user_id)}
        if status == "administrator":
            rights = ("can_be_edited", "is_anonymous", "can_manage_chat", "can_delete_messages")
            rights += ("can_manage_video_chats", "can_restrict_members", "can_promote_members")
            rights += ("can_change_info", "can_invite_users", "can_post_stories")
            rights += ("can_edit_stories", "can_delete_stories", "can_send_welcome_messages")
            member |= {right: right != "can_be_edited" for right in rights}
        elif status == "creator":
            member["is_anonymous"] = False
        return member

    async def _m_sendMessage(self, call: ApiCall) -> dict[str, Any]:
        text = call.fields.get("text", "")
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        message = self._bot_message(call)
        message["text"] = text
        self._store(message)
        return message

    async def _m_editMessageText(self, call: ApiCall) -> dict[str, Any]:
        message = self._find(call)
        text = call.fields.get("text", "")
        if message.get("text") == text and "reply_markup" not in call.fields:
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        message["text"] = text
        message["edit_date"] = int(time.time())
        return message

    async def _m_sendChatAction(self, call: ApiCall) -> bool:
        return True

    async def _m_sendPhoto(self, call: ApiCall) -> dict[str, Any]:
        data = self._upload(call, call.fields["photo"])
        photo = self._photo(data)
        message = self._bot_message(call)
        message["photo"] = photo
        if call.fields.get("caption"):
            message["caption"] = call.fields["caption"]
        self._store(message)
        return message

    async def _m_sendDocument(self, call: ApiCall) -> dict[str, Any]:
        ref = call.fields["document"]
        data = self._upload(call, ref)
        name = call.attachment(ref).filename if ref.startswith("attach://") else "file"
        document = self._document(data, name)
        message = self._bot_message(call)
        message["document"] = document
        if call.fields.get("caption"):
            message["caption"] = call.fields["caption"]
        self._store(message)
        return message

    async def _m_sendMediaGroup(self, call: ApiCall) -> list[dict[str, Any]]:
        media = call.json("media")
        if not 2 <= len(media) <= 10:
            raise _ApiError(400, "Bad Request: wrong number of media in the album")
        kinds = {item["type"] for item in media}
        if "document" in kinds and kinds != {"document"}:
            raise _ApiError(400, "Bad Request: documents can't be mixed with other media types")
        contents = [self._media_item(call, item) for item in media]
        group_id = f"MG{next(self._group_ids)}"
        sent = []
        for item, content in zip(media, contents, strict=True):
            message = self._bot_message(call)
            message.update(content)
            message["media_group_id"] = group_id
            if item.get("caption"):
                message["caption"] = item["caption"]
            self._store(message)
            sent.append(message)
        return sent

    async def _m_editMessageMedia(self, call: ApiCall) -> dict[str, Any]:
        message = self._find(call)
        content = self._media_item(call, call.json("media"))
        message.pop("photo", None)
        message.pop("document", None)
        message.update(content)
        message["edit_date"] = int(time.time())
        return message

    async def _m_deleteMessage(self, call: ApiCall) -> bool:
        chat_id = _int(call.fields, "chat_id")
        message = self.messages.get((chat_id, _int(call.fields, "message_id")))
        if message is None or message.get("_deleted"):
            raise _ApiError(400, "Bad Request: message to delete not found")
        from_bot = message.get("from", {}).get("id") == self.bot_id
        if chat_id < 0 and not from_bot and not self.can_delete.get(chat_id, True):
            raise _ApiError(400, "Bad Request: message can't be deleted")
        message["_deleted"] = True
        return True

    async def _m_answerCallbackQuery(self, call: ApiCall) -> bool:
        return True

    async def _m_getFile(self, call: ApiCall) -> dict[str, Any]:
        stored = self.files.get(call.fields.get("file_id", ""))
        if stored is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        path = stored.path
        if self.local_dir is not None:
            local = self.local_dir / stored.path
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(stored.data)
            path = str(local.resolve())
        elif len(stored.data) > self.download_max_bytes:
            raise _ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.data),
            "file_path": path,
        }


class _ApiError(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def _int(fields: dict[str, str], name: str) -> int:
    try:
        return int(fields[name])
    except (KeyError, ValueError):
        raise _ApiError(400, f"Bad Request: {name} is required") from None


def _dimensions(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 200, 200)).save(buf, "PNG")
    return buf.getvalue()


def make_png(
    width: int = 640, height: int = 480, color: tuple[int, int, int] = (30, 120, 200)
) -> bytes:
    """A real PNG of the given size (a plain colour compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def make_noisy_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: random pixels, about 3 bytes per pixel."""
    import os

    img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=0)
    return buf.getvalue()
