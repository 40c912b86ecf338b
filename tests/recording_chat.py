"""A Chat that records what the bot says, for driving commands without a platform."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.chat import ChatLimits, Invocation, MessageRef, OutFile, ResultMeta
from bot.errors import DeliveryError
from bot.jobs import today
from bot.services import Services
from plugins.dispatch import dispatch

_ids = itertools.count(1)


@dataclass
class Sent:
    """One thing the bot did in the chat."""

    kind: str  # "text" | "edit" | "preview" | "results" | "delete" | "delete_invocation"
    text: str = ""
    files: list[OutFile] = field(default_factory=list)
    meta: ResultMeta | None = None
    ephemeral: bool = False
    ref: MessageRef | None = None


class RecordingChat:
    """Implements the Chat port in memory; `fail_delivery` makes result uploads fail."""

    def __init__(
        self,
        limits: ChatLimits | None = None,
        *,
        can_delete: bool = True,
        fail_delivery: bool = False,
    ) -> None:
        self._limits = limits or ChatLimits(can_preview=True)
        self.can_delete = can_delete
        self.fail_delivery = fail_delivery
        self.log: list[Sent] = []

    @property
    def limits(self) -> ChatLimits:
        return self._limits

    async def send_text(self, text: str, *, ephemeral: bool = False) -> MessageRef | None:
        ref = MessageRef(str(next(_ids)))
        self.log.append(Sent("text", text, ephemeral=ephemeral, ref=ref))
        return ref

    async def edit_text(self, ref: MessageRef, text: str) -> None:
        self.log.append(Sent("edit", text, ref=ref))

    async def send_preview(self, ref: MessageRef | None, image: bytes) -> MessageRef | None:
        new = ref or MessageRef(str(next(_ids)))
        self.log.append(
            Sent("preview", files=[OutFile(image, "preview.jpg", "image/jpeg")], ref=new)
        )
        return new

    async def send_results(self, files: Sequence[OutFile], meta: ResultMeta) -> None:
        if self.fail_delivery:
            raise DeliveryError("upload refused by the test")
        self.log.append(Sent("results", meta.caption, files=list(files), meta=meta))

    async def delete_invocation(self) -> bool:
        self.log.append(Sent("delete_invocation"))
        return self.can_delete

    async def delete(self, ref: MessageRef) -> None:
        self.log.append(Sent("delete", ref=ref))

    # --- assertions helpers ---

    def texts(self) -> list[str]:
        """Every text sent or edited in, in order."""
        return [s.text for s in self.log if s.kind in ("text", "edit")]

    def last_text(self) -> str:
        texts = self.texts()
        return texts[-1] if texts else ""

    def results(self) -> list[Sent]:
        return [s for s in self.log if s.kind == "results"]

    def everything(self) -> str:
        """All text the chat ever showed (for secret-leak checks)."""
        parts: list[Any] = [s.text for s in self.log]
        return "\n".join(parts)


def invocation(command: str, text: str = "", **fields: Any) -> Invocation:
    """A command from user u1 in private chat c1 (English), with `fields` overriding."""
    values: dict[str, Any] = {
        "platform": "test",
        "user_id": "u1",
        "chat_id": "c1",
        "is_private": True,
        "locale": "en",
    }
    values.update(fields)
    return Invocation(command=command, text=text, **values)


async def run_command(
    services: Services, inv: Invocation, chat: RecordingChat | None = None
) -> RecordingChat:
    """Dispatch `inv` and wait until every job it started has finished."""
    chat = chat or RecordingChat()
    await dispatch(inv, chat, services)
    await services.jobs.wait_idle()
    return chat


async def left(services: Services, user_id: str = "u1") -> int:
    """Credits the test user has left today."""
    user = await services.store.user("test", user_id)
    credits = await services.store.credits(
        user.id, today(services.settings), services.settings.daily_credits
    )
    return credits.total_left


def job_count(services: Services) -> int:
    """Job rows in the store's file, read with plain sqlite3."""
    with sqlite3.connect(services.settings.data_dir / "drawbridge.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
