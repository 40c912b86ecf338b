"""What the store holds and hands out: users, credits, jobs, and its errors.

Plain values with no database in them, shared by both engines and by every caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = frozenset({"user", "admin", "banned"})
JOB_KINDS = frozenset({"draw", "edit"})
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
INTERRUPTED = "interrupted"


class StoreError(Exception):
    """A caller broke the store's contract (a bug, not something a user did)."""


class NotFoundError(StoreError, LookupError):
    """No such user or job."""


class ReservationError(StoreError):
    """The job already has a reservation, or is not waiting to run."""


class LinkRefused(StoreError):
    """`/link` could not join the accounts; `reason` names why (an i18n key's last part)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LinkResult:
    """What `/link CODE` did: the joint account, its identities, what moved."""

    account_id: int
    identities: tuple[tuple[str, str], ...]
    moved: int = 0
    key: str = ""
    expired: bool = False


@dataclass(frozen=True, slots=True)
class User:
    """A person on one platform. `role` is effective: config admins read as "admin"."""

    id: int
    platform: str
    platform_user_id: str
    name: str
    role: str  # "user" | "admin" | "banned"
    lang: str | None
    granted: int  # granted balance, spent after the daily allowance
    has_key: bool
    # The row of this platform identity; `id` is its account's (the same unless /link
    # joined it to another). Money, key, language and jobs go by `id`; roles by identity.
    identity_id: int = 0
    # The account's own daily allowance (set in the console); None: the configured default.
    daily_allowance: int | None = None
    # The last probe of the account's key ({"ok", "kind", "balance", "at"}), None: never.
    key_probe: dict[str, Any] | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_banned(self) -> bool:
        return self.role == "banned"


@dataclass(frozen=True, slots=True)
class Credits:
    """What a user may still spend: today's free allowance first, then the granted balance."""

    daily_allowance: int
    daily_used: int
    balance: int

    @property
    def daily_left(self) -> int:
        return max(0, self.daily_allowance - self.daily_used)

    @property
    def total_left(self) -> int:
        return self.daily_left + self.balance


@dataclass(frozen=True, slots=True)
class Job:
    """One /draw or /edit request and its outcome.

    `cost` is what its reservation took (0 without one); `ledger_state` is that reservation's
    state: None (never reserved), "reserved", "committed" or "refunded"; `spent` is what it
    finally took (cost minus any refund); `charge` is what it was to be charged when its
    results were handed to the chat (None before that).
    """

    id: int
    user_id: int
    platform: str
    chat_id: str
    group_key: str | None
    kind: str  # "draw" | "edit"
    prompt: str
    options: dict[str, Any]
    ref_count: int
    provider: str | None
    own_key: bool
    status: str  # queued | running | succeeded | failed | cancelled
    error_kind: str | None
    error_detail: str | None
    cost: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    usage: dict[str, Any] | None
    revised_prompt: str | None
    outputs: list[dict[str, Any]]  # [{"width", "height", "bytes", "mime"}]
    ledger_state: str | None
    spent: int = 0
    charge: int | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


LINK_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
"""Link code characters: no 0/O, 1/I/L, which people misread when typing a code over."""
LINK_CODE_LENGTH = 8
LINK_CODE_TTL = 600.0
"""Seconds a link code is valid."""


def normalize_code(code: str) -> str:
    """A link code as stored: upper case, without spaces or dashes people add."""
    return "".join(ch for ch in code.upper() if ch.isalnum())
