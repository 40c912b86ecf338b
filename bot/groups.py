"""Where the bot answers at all, and each group's own rules.

`DRAWBRIDGE_GROUPS` names the groups and channels the bot answers in (`qq:<group number>`,
`telegram:<chat id>`, `discord:<server id>`), empty for everywhere; `DRAWBRIDGE_PRIVATE=false`
turns private chats off. A group's admins then set its rules with `/group`; those are kept in
the store under the group's key (`Invocation.group_id`, the key its daily cap counts under).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

GROUPS_FORM: Final = (
    "comma-separated platform:id entries, such as "
    "qq:123456,telegram:-1001234567890,discord:987654321098765432 (empty: everywhere)"
)
_ENTRY: Final = re.compile(r"([A-Za-z][A-Za-z0-9_]*):(-?[0-9]+)")

MAX_COOLDOWN: Final = 86_400
"""The longest `/group cooldown` (a day): beyond it the daily cap is the better tool."""


@functools.lru_cache(maxsize=8)
def parse_groups(value: str) -> frozenset[str]:
    """`qq:1, telegram:-100` -> {"qq:1", "telegram:-100"} (platform lower-cased).

    Raises `ValueError` naming the entries (by position, never by value) that are not
    `platform:id`: a typo must not silently leave a group unanswered or the bot everywhere.
    """
    entries = [item.strip() for item in value.split(",") if item.strip()]
    found: set[str] = set()
    bad: list[str] = []
    for number, item in enumerate(entries, 1):
        match = _ENTRY.fullmatch(item.replace(" ", ""))
        if match is None:
            bad.append(str(number))
            continue
        found.add(f"{match.group(1).lower()}:{match.group(2)}")
    if bad:
        which = ("entry " if len(bad) == 1 else "entries ") + ", ".join(bad)
        raise ValueError(f"{which} is not platform:id; must be {GROUPS_FORM}")
    return frozenset(found)


def answers_here(
    allowed: frozenset[str], private: bool, platform: str, space_id: str | None, is_private: bool
) -> bool:
    """Whether the bot answers a command in this chat at all (else it stays silent).

    `space_id` is what `DRAWBRIDGE_GROUPS` names the chat by (`Invocation.space_id`).
    """
    if is_private:
        return private
    if not allowed:
        return True
    return space_id is not None and f"{platform.lower()}:{space_id}" in allowed


@dataclass(frozen=True, slots=True)
class GroupRules:
    """One group's own settings, as its admins set them with `/group`.

    `cap` is the group's own daily credit cap (None: only `DRAWBRIDGE_GROUP_DAILY_CAP`);
    `size` and `quality` are the defaults for /draw and /edit there (None: the bot's).
    """

    enabled: bool = True
    size: str | None = None
    quality: str | None = None
    cap: int | None = None
    cooldown: int = 0

    def effective_cap(self, global_cap: int) -> int:
        """The cap that applies (0: none): the lower of the group's own and the global one."""
        return effective_cap(global_cap, self.cap)


def effective_cap(global_cap: int, own: int | None) -> int:
    """The lower of two caps where 0 or None means "no cap"; 0 when neither is set."""
    caps = [cap for cap in (global_cap, own or 0) if cap > 0]
    return min(caps) if caps else 0
