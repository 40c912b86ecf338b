"""The seam between chat platforms and everything else.

An adapter turns a platform event into an `Invocation` and implements `Chat` to answer.
Nothing here imports a chat library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChatLimits:
    """What the platform accepts, so results can be shaped before sending."""

    photo_bytes: int = 10 * MB
    file_bytes: int = 50 * MB
    # Telegram: width + height of a photo; 0 means no such limit.
    photo_dimension_sum: int = 0
    max_files_per_message: int = 10
    can_edit: bool = True
    has_buttons: bool = False
    can_preview: bool = False


@dataclass(frozen=True, slots=True)
class OutFile:
    """An image (or any file) to send."""

    data: bytes
    filename: str
    mime: str
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class ResultMeta:
    """What a delivered result is, so result actions (reroll, edit, original) can find it."""

    job_id: int
    caption: str = ""
    revised_prompt: str | None = None
    # Send the files as documents/attachments, uncompressed (the "Original file" action).
    originals: bool = False
    # Show result actions (reroll, edit, original) where the platform has buttons.
    actions: bool = True


@runtime_checkable
class ImageSource(Protocol):
    """A reference image that is fetched only when the job needs it."""

    @property
    def name(self) -> str:
        """A label for messages and logs (a file name, never a signed URL)."""
        ...

    async def fetch(self, max_bytes: int) -> bytes:
        """Download the image, refusing more than `max_bytes`.

        Raises `ImageTooLargeError`, `ImageFetchError` or `ForbiddenURLError`.
        """
        ...


@dataclass(frozen=True, slots=True)
class BytesImage:
    """An image already in memory (a terminal file, a test, a cached result)."""

    data: bytes
    label: str = "image"

    @property
    def name(self) -> str:
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        from bot.errors import ImageTooLargeError

        if len(self.data) > max_bytes:
            raise ImageTooLargeError(
                f"{len(self.data)} bytes",
                size_mb=round(len(self.data) / MB, 1),
                limit_mb=max_bytes // MB,
            )
        return self.data


@dataclass(frozen=True, slots=True)
class Invocation:
    """One command as the plugins see it, whatever platform it came from."""

    platform: str
    user_id: str
    chat_id: str
    command: str
    text: str = ""
    is_private: bool = False
    user_name: str = ""
    # Typed options from slash commands ({"size": "16:9", "n": 2}); merged over parsed text.
    options: Mapping[str, Any] = field(default_factory=dict)
    references: tuple[ImageSource, ...] = ()
    # The platform's locale for the user ("zh-CN", "en"), if it says.
    locale: str | None = None
    message_id: str | None = None
    # When the command replies to one of the bot's results: that result's job id.
    reply_to_job: int | None = None
    # What DRAWBRIDGE_GROUPS names this chat by, when it is not the chat id: the QQ group
    # number, the Discord server id.
    space_id: str | None = None
    # The caller administers this group (QQ owner or admin, Telegram chat administrator,
    # Discord Manage Server), so may change its rules with /group. Adapters may leave it False
    # for other commands when finding out costs a request (Telegram's getChatMember).
    group_admin: bool = False
    # The answer can be shown to the caller alone though the chat is a group (a Discord
    # ephemeral reply): what a /link code needs.
    private_answer: bool = False

    @property
    def group_id(self) -> str | None:
        """The chat as a group key for per-group caps, or None in private chats."""
        return None if self.is_private else f"{self.platform}:{self.chat_id}"

    @property
    def space(self) -> str:
        """`platform:id` as DRAWBRIDGE_GROUPS names this chat."""
        return f"{self.platform.lower()}:{self.space_id or self.chat_id}"

    @property
    def answers_privately(self) -> bool:
        """Whether only the caller would see an answer (a private chat or an ephemeral reply)."""
        return self.is_private or self.private_answer


@dataclass(frozen=True, slots=True)
class MessageRef:
    """A platform's handle to a message the bot sent (an id the adapter understands)."""

    id: str
    extra: Mapping[str, Any] = field(default_factory=dict)


class Chat(Protocol):
    """How plugins and the job runner answer in one conversation.

    Methods that may fail because of the platform raise `DeliveryError` only for sending
    results; status and text updates are best effort and swallow platform errors.
    """

    @property
    def limits(self) -> ChatLimits: ...

    async def send_text(self, text: str, *, ephemeral: bool = False) -> MessageRef | None:
        """Answer the invocation. `ephemeral` asks that only the user sees it, where possible."""
        ...

    async def edit_text(self, ref: MessageRef, text: str) -> None:
        """Replace the text of a status message sent earlier (ignored where impossible)."""
        ...

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        """Show or replace a partial preview (JPEG) while a job runs; `ref` is the last one."""
        ...

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        """Deliver finished images the platform's way. Raises `DeliveryError` on failure.

        When some files are already in the chat before a later one fails, raise it with
        `delivered=<how many>` (`DeliveryError(detail, delivered=1)`): the job is then charged
        for those, not refunded.
        """
        ...

    async def delete_invocation(self) -> bool:
        """Delete the user's message that triggered this (a leaked key). True when deleted."""
        ...

    async def delete(self, ref: MessageRef) -> None:
        """Delete a message the bot sent (a status line), best effort."""
        ...


@runtime_checkable
class ConfirmPrompt(Protocol):
    """A Chat that can ask for a confirmation with a button (Telegram, Discord).

    Pressing the button must reach `dispatch` as the `confirm` command, from whoever pressed
    it, with `str(token)` as its text: the plugin checks that the presser is the one who
    asked. Chats without this capability say "reply /confirm" instead.
    """

    async def send_confirm(self, text: str, *, token: int, label: str) -> MessageRef | None:
        """Send `text` with one button labelled `label` that confirms request `token`."""
        ...
