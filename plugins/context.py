"""What a command handler receives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.chat import Chat, Invocation, MessageRef
from bot.services import Services
from bot.store import User


@dataclass(frozen=True, slots=True)
class Context:
    """One invocation with the caller resolved: who, in which language, answering where."""

    inv: Invocation
    chat: Chat
    services: Services
    user: User
    lang: str

    def t(self, key: str, **params: Any) -> str:
        """A message in the caller's language."""
        return self.services.t(self.lang, key, **params)

    async def reply(self, key: str, *, ephemeral: bool = False, **params: Any) -> MessageRef | None:
        """Answer with a translated message."""
        return await self.chat.send_text(self.t(key, **params), ephemeral=ephemeral)


Handler = Callable[[Context], Awaitable[None]]
