"""The `Chat` port over one Discord interaction.

An interaction is deferred ("thinking...") at once; that original response then becomes the
status line, shows partial previews as its attachment, and finally holds the result files
and buttons, so one message tells the whole story. Discord keeps the interaction token for
15 minutes: past `token_ttl` (or when Discord says the token is gone) messages go to the
channel instead, and the original is edited through the channel as the bot's own message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import discord

from bot.chat import MB, ChatLimits, MessageRef, OutFile, ResultMeta
from bot.errors import DeliveryError, ImageError
from bot.images import make_preview
from bot.services import Services

from .views import BUTTON_KEYS, confirm_view, result_view

log = logging.getLogger(__name__)

PLATFORM = "discord"
TOKEN_TTL = 14 * 60.0
"""Seconds an interaction token is used for; Discord's limit is 15 minutes."""
MAX_FILES = 10
"""Attachments per message."""
REQUEST_BYTES = 25 * MB
"""Discord's cap on one whole upload request."""
TEXT_LIMIT = 2000
"""Characters in a message's content."""

# States of the original (deferred) response.
_LOADING, _STATUS, _RESULT, _GONE = "loading", "status", "result", "gone"
# What discord.py raises reading a 2xx answer it cannot parse (an empty "204" where it waited
# for a message, say): the message was sent, only its id is unknown. HTTP errors raise
# `discord.HTTPException` instead.
_UNREADABLE = (KeyError, TypeError, ValueError, AttributeError)
# Webhook answers meaning the interaction token is no longer valid.
_TOKEN_GONE_STATUS = 401
_UNKNOWN_WEBHOOK = 10015


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text` cut to fit a Discord message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def batches(
    files: Sequence[tuple[str, bytes]],
    *,
    max_files: int = MAX_FILES,
    max_bytes: int = REQUEST_BYTES,
) -> list[list[tuple[str, bytes]]]:
    """Split files into messages of at most `max_files` files and `max_bytes` in total."""
    groups: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for name, data in files:
        if current and (len(current) >= max_files or size + len(data) > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append((name, data))
        size += len(data)
    if current:
        groups.append(current)
    return groups


def _preview_name(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0]
    return f"{stem}-preview.jpg"


class InteractionChat:
    """Answers one deferred interaction (slash command, button, modal or menu)."""

    def __init__(
        self,
        interaction: discord.Interaction[Any],
        services: Services,
        *,
        lang: str,
        ephemeral: bool,
        original_id: int | None,
        token_ttl: float = TOKEN_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interaction = interaction
        self._services = services
        self._lang = lang
        # Whether the deferred "thinking" message (and so the original response) is ephemeral.
        self._ephemeral = ephemeral
        self._original_id = original_id
        self._clock = clock
        self._deadline = clock() + token_ttl
        self._state = _LOADING
        # The first public text message (the status line): partial previews go into it.
        self._home: MessageRef | None = None
        # One operation at a time: a late status tick must never overwrite the result.
        self._lock = asyncio.Lock()

    @property
    def chat_id(self) -> str:
        return str(self._interaction.channel_id)

    @property
    def limits(self) -> ChatLimits:
        size = self._interaction.filesize_limit
        return ChatLimits(
            photo_bytes=size,
            file_bytes=size,
            max_files_per_message=MAX_FILES,
            can_edit=True,
            has_buttons=True,
            can_preview=True,
        )

    # --- the Chat port ---------------------------------------------------------------

    async def send_text(self, text: str, *, ephemeral: bool = False) -> MessageRef | None:
        async with self._lock:
            try:
                ref, _ = await self._post(ephemeral=ephemeral, content=clip(text))
            except discord.HTTPException as exc:
                log.warning("discord: could not send a message: %s", _describe(exc))
                return None
            if self._home is None and not ephemeral and ref is not None:
                self._home = ref
            return ref

    async def send_confirm(self, text: str, *, token: int, label: str) -> MessageRef | None:
        """The confirmation of a costly request: `text` with one Confirm button."""
        async with self._lock:
            try:
                ref, _ = await self._post(content=clip(text), view=confirm_view(token, label))
            except discord.HTTPException as exc:
                log.warning("discord: could not send a message: %s", _describe(exc))
                return None
            return ref

    async def edit_text(self, ref: MessageRef, text: str) -> None:
        async with self._lock:
            try:
                await self._edit(ref, content=clip(text))
            except _UNREADABLE:
                pass  # edited; only the answer describing the message was unreadable
            except discord.HTTPException as exc:
                log.debug("discord: could not edit a message: %s", _describe(exc))

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        async with self._lock:
            try:
                ref = ref or self._home
                if ref is not None:
                    await self._edit(ref, attachments=[_file("preview.jpg", image)])
                    return ref
                new_ref, _ = await self._post(files=[_file("preview.jpg", image)])
                return new_ref
            except _UNREADABLE:
                return ref  # shown; only the answer describing the message was unreadable
            except discord.HTTPException as exc:
                log.debug("discord: could not show a preview: %s", _describe(exc))
                return ref

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        limit = self._interaction.filesize_limit
        prepared: list[tuple[str, bytes]] = []
        shrunk = False
        for out in files:
            if len(out.data) <= limit:
                prepared.append((out.filename, out.data))
                continue
            try:
                # A little under the limit: the budget is for the file, not the request.
                preview = await make_preview(out.data, max_bytes=int(limit * 0.97))
            except ImageError as exc:
                raise DeliveryError(f"no preview fits {limit} bytes") from exc
            prepared.append((_preview_name(out.filename), preview))
            shrunk = True
        caption = meta.caption
        if shrunk:
            limit_mb = round(limit / MB, 1)
            note = self._services.t(self._lang, "result.preview_note", limit_mb=limit_mb)
            caption = f"{caption}\n{note}" if caption else note
        view = self._result_view(meta.job_id) if meta.actions else None
        groups = batches(prepared)
        async with self._lock:
            for index, group in enumerate(groups):
                fields: dict[str, Any] = {"files": [_file(n, d) for n, d in group]}
                if index == 0 and caption:
                    fields["content"] = clip(caption)
                if view is not None and index == len(groups) - 1:
                    fields["view"] = view
                try:
                    message_id = await self._deliver(fields)
                except discord.HTTPException as exc:
                    raise DeliveryError(_describe(exc)) from exc
                if message_id is None:
                    log.warning(
                        "discord: result of job %s sent; its message id is unknown", meta.job_id
                    )
                    continue
                try:
                    await self._services.remember_result(
                        PLATFORM, self.chat_id, str(message_id), meta.job_id
                    )
                except Exception:
                    # Delivered all the same: only "Edit image" on this message loses its job.
                    log.warning("discord: could not remember result message", exc_info=True)

    async def delete_invocation(self) -> bool:
        # Slash commands, buttons and modals leave no user message behind (a /token key is
        # typed into a modal only the user sees): there is nothing to delete.
        return False

    async def delete(self, ref: MessageRef) -> None:
        async with self._lock:
            if ref == self._home:
                self._home = None
            try:
                await self._delete(ref)
            except discord.HTTPException as exc:
                log.debug("discord: could not delete a message: %s", _describe(exc))

    # --- routing -----------------------------------------------------------------------

    def _expired(self) -> bool:
        return self._clock() >= self._deadline

    def _token_gone(self, exc: discord.HTTPException) -> bool:
        """Whether a webhook call failed because the interaction token expired; remember it."""
        if exc.status == _TOKEN_GONE_STATUS or exc.code == _UNKNOWN_WEBHOOK:
            self._deadline = float("-inf")
            return True
        return False

    def _channel(self) -> discord.PartialMessageable:
        interaction = self._interaction
        channel: discord.PartialMessageable = interaction.client.get_partial_messageable(
            interaction.channel_id, guild_id=interaction.guild_id
        )
        return channel

    def _learn_original(self, message: discord.Message) -> None:
        # The deferral's answer may not have named the message (a peer answering "204"): it is
        # needed to edit or remove the status line through the channel once the token is gone.
        if self._original_id is None:
            self._original_id = message.id

    def _original_ref(self) -> MessageRef:
        return MessageRef(str(self._original_id or "@original"), {"kind": "original"})

    def _result_view(self, job_id: int) -> discord.ui.View:
        labels = {a: self._services.t(self._lang, key) for a, key in BUTTON_KEYS.items()}
        return result_view(job_id, labels)

    async def _deliver(self, fields: dict[str, Any]) -> int | None:
        """Send one result message: into the original response while it is ours to fill.
        Returns the message's id (None when Discord's answer did not say)."""
        if self._state in (_LOADING, _STATUS) and not self._expired():
            try:
                message: discord.Message = await self._interaction.edit_original_response(
                    content=fields.get("content"),
                    attachments=fields["files"],
                    view=fields.get("view"),
                )
                self._state = _RESULT
                self._learn_original(message)
                return message.id
            except _UNREADABLE:
                self._state = _RESULT
                return self._original_id
            except discord.HTTPException as exc:
                if not self._token_gone(exc):
                    raise
                # discord.File objects are spent once sent (or tried): make fresh ones.
                fields = {**fields, "files": [_file(f.filename, _data(f)) for f in fields["files"]]}
        _, message_id = await self._post(**fields)
        return message_id

    async def _post(
        self, *, ephemeral: bool = False, **fields: Any
    ) -> tuple[MessageRef | None, int | None]:
        """Send a new message the best way the interaction still allows (lock held).

        Returns a reference to it and its id; both None when it was sent but Discord's
        answer did not say which message it became (it can then not be edited)."""
        message: discord.Message
        if not self._expired():
            try:
                if self._state == _LOADING and (self._ephemeral or not ephemeral):
                    edit = {("attachments" if k == "files" else k): v for k, v in fields.items()}
                    try:
                        message = await self._interaction.edit_original_response(**edit)
                    except _UNREADABLE:
                        self._state = _STATUS
                        return self._original_ref(), self._original_id
                    self._state = _STATUS
                    self._learn_original(message)
                    return self._original_ref(), message.id
                if self._state == _LOADING:
                    # Only the user may see this, but "thinking..." was posted for all: drop
                    # it, so the followup below is a new ephemeral message.
                    await self._interaction.delete_original_response()
                    self._state = _GONE
                try:
                    message = await self._interaction.followup.send(
                        wait=True, ephemeral=ephemeral, **fields
                    )
                except _UNREADABLE:
                    return None, None
                ref = MessageRef(str(message.id), {"kind": "followup", "ephemeral": ephemeral})
                return ref, message.id
            except discord.HTTPException as exc:
                if not self._token_gone(exc):
                    raise
                if "files" in fields:
                    fields["files"] = [_file(f.filename, _data(f)) for f in fields["files"]]
        try:
            message = await self._channel().send(**fields)
        except _UNREADABLE:
            return None, None
        return MessageRef(str(message.id), {"kind": "channel"}), message.id

    async def _edit(self, ref: MessageRef, **fields: Any) -> None:
        kind = ref.extra.get("kind")
        if kind == "original":
            # Once the original shows the result (or is gone), status edits no longer apply.
            if self._state != _STATUS:
                return
            if not self._expired():
                try:
                    await self._interaction.edit_original_response(**fields)
                    return
                except discord.HTTPException as exc:
                    if not self._token_gone(exc):
                        raise
            if self._ephemeral or self._original_id is None:
                return
            await self._channel().get_partial_message(self._original_id).edit(**fields)
            return
        if kind == "followup" and not self._expired():
            try:
                await self._interaction.followup.edit_message(int(ref.id), **fields)
                return
            except discord.HTTPException as exc:
                if not self._token_gone(exc):
                    raise
        if ref.extra.get("ephemeral"):
            return
        await self._channel().get_partial_message(int(ref.id)).edit(**fields)

    async def _delete(self, ref: MessageRef) -> None:
        kind = ref.extra.get("kind")
        if kind == "original":
            if self._state != _STATUS:
                return
            self._state = _GONE
            if not self._expired():
                try:
                    await self._interaction.delete_original_response()
                    return
                except discord.HTTPException as exc:
                    if not self._token_gone(exc):
                        raise
            if not self._ephemeral and self._original_id is not None:
                await self._channel().get_partial_message(self._original_id).delete()
            return
        if kind == "followup" and not self._expired():
            try:
                await self._interaction.followup.delete_message(int(ref.id))
                return
            except discord.HTTPException as exc:
                if not self._token_gone(exc):
                    raise
        if not ref.extra.get("ephemeral"):
            await self._channel().get_partial_message(int(ref.id)).delete()


def _file(filename: str, data: bytes) -> discord.File:
    return discord.File(io.BytesIO(data), filename=filename)


def _data(file: discord.File) -> bytes:
    fp = file.fp
    fp.seek(0)
    return fp.read()


def _describe(exc: discord.HTTPException) -> str:
    return f"HTTP {exc.status} (code {exc.code})"
