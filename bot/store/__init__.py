"""The store: users, personal keys, credits, the ledger, jobs, and what processes share.

SQLite in DRAWBRIDGE_DATA_DIR by default; PostgreSQL when DRAWBRIDGE_DATABASE_URL names one,
for several processes sharing one wallet. The package:

- `port`: `StorePort`, what the job runner, plugins and adapters call;
- `core` (`Store`) with its parts `accounts` (/group, /link), `console` (the operator
  console's queries) and `processes` (heartbeats, recovery, shared provider slots), written
  once for both engines;
- `ledger`: how credits move (reserve, commit, refund, transfers), the rules both engines share;
- `engine`: what an engine is; `sqlite` and `postgres`: the two engines;
- `migrations`: the versioned schema, the same numbers on both engines; `sql`: shared SQL;
- `copy`: `drawbridge db copy` between engines.
"""

from bot.store.core import Store, open_engine
from bot.store.engine import Engine
from bot.store.migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from bot.store.model import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    INTERRUPTED,
    JOB_KINDS,
    LINK_CODE_ALPHABET,
    LINK_CODE_LENGTH,
    LINK_CODE_TTL,
    ROLES,
    Credits,
    Job,
    LinkRefused,
    LinkResult,
    NotFoundError,
    ReservationError,
    StoreError,
    User,
    normalize_code,
)
from bot.store.port import StorePort

MIGRATIONS = SQLITE_MIGRATIONS


def is_transient(error: BaseException) -> bool:
    """Whether a failed store call may succeed if tried again (either engine).

    True for the SQLite file locked by another writer past busy_timeout, a full disk, an I/O
    error, and for a lost PostgreSQL connection, a deadlock or a serialization failure; False
    for contract errors (`StoreError`), constraint violations and anything else.
    """
    from bot.store import postgres, sqlite

    return sqlite.is_transient(error) or postgres.is_transient(error)


__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "INTERRUPTED",
    "JOB_KINDS",
    "LINK_CODE_ALPHABET",
    "LINK_CODE_LENGTH",
    "LINK_CODE_TTL",
    "MIGRATIONS",
    "POSTGRES_MIGRATIONS",
    "ROLES",
    "SQLITE_MIGRATIONS",
    "Credits",
    "Engine",
    "Job",
    "LinkRefused",
    "LinkResult",
    "NotFoundError",
    "ReservationError",
    "Store",
    "StoreError",
    "StorePort",
    "User",
    "is_transient",
    "normalize_code",
    "open_engine",
]
