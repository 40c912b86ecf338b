"""Store reads that many commands ask at the same moment, asked together.

A burst of commands (issue 15: 500 at the same instant) asks the store the same few things
for each command: who the user is, the group's rules, and (an /edit before its downloads, a
dry run or a costly job for its price) the credits left. On
PostgreSQL each is a round trip through a pool of a few connections, so the last command
waits for thousands of trips. Here every such read made while the previous batch is being
answered waits for the next one, which asks them all at once: one statement for the users,
one for the credits, one for the groups. A lone command costs one loop iteration
more than a direct read.

Every read is queued after whatever its command wrote before and
answered by a statement that starts after it was queued, so it sees those writes: batching
never makes a read staler than a direct one.
"""

from __future__ import annotations

import asyncio
from datetime import date
from typing import cast

from bot.batching import Batcher, InFlight
from bot.groups import GroupRules
from bot.store import Credits, NotFoundError, StorePort, User


class BatchedReads:
    """The reads of a command's intake, batched across commands (see the module docstring)."""

    def __init__(self, store: StorePort) -> None:
        self.store = store
        self._users: Batcher[tuple[str, str], User] = Batcher(store.users_found)
        self._rules: Batcher[str, GroupRules] = Batcher(self._group_rules)
        self._credits: Batcher[tuple[int, date, int], Credits] = Batcher(self._credits_of)
        # Users to create (or rename) now: a burst's new users in one write, each once.
        self._made: Batcher[tuple[str, str, str], User] = Batcher(store.users_made)
        # Those asked and not yet written: a user's later commands, whose read found nothing
        # either (it ran before the write), wait for that write instead of writing again.
        self._making: InFlight[tuple[str, str, str], User | None] = InFlight()

    async def user(self, platform: str, platform_user_id: str, name: str = "") -> User:
        """`Store.user`: get or create the user, refreshing its display name."""
        found = await self._users.get((platform, platform_user_id))
        if found is not None and (not name or found.name == name):
            return found
        key = (platform, platform_user_id, name)
        made = await self._making.run(key, lambda: self._made.ask(key))
        if made is None:  # cannot be: the write makes every user it is asked for
            raise NotFoundError(f"no user {platform}:{platform_user_id} after creating it")
        return made

    async def group_rules(self, group_key: str) -> GroupRules:
        """`Store.group_rules`."""
        return await self.ask_group_rules(group_key)

    def ask_group_rules(self, group_key: str) -> asyncio.Future[GroupRules]:
        """`group_rules`, asked now: the future answers it (see `Batcher.ask`)."""
        return cast("asyncio.Future[GroupRules]", self._rules.ask(group_key))

    async def credits(self, user_id: int, day: date, daily_allowance: int) -> Credits:
        """`Store.credits` (raises `NotFoundError` for a user that does not exist)."""
        credits = await self._credits.get((user_id, day, daily_allowance))
        if credits is None:
            raise NotFoundError(f"no user #{user_id}")
        return credits

    async def _group_rules(self, keys: list[str]) -> dict[str, GroupRules]:
        # A burst comes from a few groups: one statement for all of them. A group without
        # rules of its own has the defaults.
        found = await self.store.group_rules_of(keys)
        return {key: found.get(key) or GroupRules() for key in keys}

    async def _credits_of(
        self, keys: list[tuple[int, date, int]]
    ) -> dict[tuple[int, date, int], Credits]:
        found: dict[tuple[int, date, int], Credits] = {}
        # One read per day and allowance asked (one, unless the batch straddles midnight).
        for day, allowance in dict.fromkeys((day, allowance) for _, day, allowance in keys):
            ids = [user_id for user_id, d, a in keys if (d, a) == (day, allowance)]
            credits = await self.store.credits_of(ids, day, allowance)
            found.update({(user_id, day, allowance): c for user_id, c in credits.items()})
        return found
