"""What a command handler receives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bot.chat import Chat, Invocation, MessageRef
from bot.groups import GroupRules
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
    # The group's rules once read: dispatch's checks and the handler ask for them both, and a
    # burst of commands must not pay a store call twice for the same answer.
    _rules: list[GroupRules] = field(default_factory=list, compare=False, repr=False)

    async def group_rules(self) -> GroupRules | None:
        """The rules of the group the command came from (None in a private chat), read from
        the store once per command."""
        key = self.inv.group_id
        if key is None:
            return None
        if not self._rules:
            self._rules.append(await self.services.jobs.reads.group_rules(key))
        return self._rules[0]

    def t(self, key: str, **params: Any) -> str:
        """A message in the caller's language."""
        return self.services.t(self.lang, key, **params)

    async def reply(self, key: str, *, ephemeral: bool = False, **params: Any) -> MessageRef | None:
        """Answer with a translated message."""
        return await self.chat.send_text(self.t(key, **params), ephemeral=ephemeral)


Handler = Callable[[Context], Awaitable[None]]
