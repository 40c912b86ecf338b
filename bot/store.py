"""Users, personal keys, credits, the ledger and jobs, in one SQLite file.

Every platform shares this file, and many asyncio tasks write to it at once, so:

- one aiosqlite connection does all the work, on its one thread, which runs the trips queued
  to it one at a time and in order;
- every read-then-write runs in `BEGIN IMMEDIATE ... COMMIT`: a DEFERRED transaction that
  reads and then writes fails with SQLITE_BUSY at once, ignoring `busy_timeout`, when another
  process holds the write lock;
- each such transaction, BEGIN to COMMIT or ROLLBACK, is one plain synchronous function run on
  the connection's thread in a single trip (`Store._write`). A trip costs far more than the
  SQL, and since nothing else can run on that thread in the middle of a trip, statements from
  two tasks can never interleave inside one transaction, nor a transaction be left open. That
  is why there is no `asyncio.Lock` here: never start a transaction any other way (such as
  `BEGIN` through aiosqlite's own `execute`), or one will be needed again;
- WAL, so readers in other processes (backups, `sqlite3` at a shell) never block the bot.

Credits are moved only by guarded statements (`... WHERE granted >= ?`, `... WHERE state =
'reserved'`) whose row counts are checked, and every movement appends a row to `ledger`, which
triggers make append-only. A job has at most one reservation; it is settled exactly once:
refunded whole, or committed, whole or in part (`commit(job_id, amount)`: a job that delivered
fewer or cheaper images than it reserved for). A partial commit gives the rest back in the same
transaction, so such a job has a 'commit' row and a 'refund' row, and for every job

    reserve == commit + refund    (each of daily_amount and balance_amount; absent rows are 0)

The invariants, for every user and group:

    users.granted == sum(grant) - sum(reserve.balance_amount) + sum(refund.balance_amount)
                     + sum(transfer.balance_amount)
    daily_usage.used(day) == sum(reserve.daily_amount) - sum(refund.daily_amount)
                             + sum(transfer.daily_amount) for that day
    group_usage.used(day) == sum(reserve) - sum(refund) over the group's jobs of that day

Linked identities (/link) share one account: one users row holds the money, key and
language, and every identity's `account_id` points at it (NULL: the identity is its own).
Joining two accounts moves the balance and the day's used allowance in 'transfer' rows, a pair
per movement (out of one row, into the other: signed amounts that sum to 0), only while no
job of the joining account is in flight, so no reservation is ever settled against a row that
no longer holds the account.

A job whose results were handed to the chat carries `jobs.charge` (what it is to be charged),
written before the hand-off: should its commit never be written (the database locked for longer
than the runner retries, then a stop), `recover()` commits that amount instead of refunding.

Days are `datetime.date`s the caller computes in the configured timezone (stored as ISO
strings); instants are unix seconds (floats).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dt_time
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from cryptography.fernet import InvalidToken

from bot.errors import GroupCapReachedError, InsufficientCreditsError
from bot.groups import GroupRules, effective_cap
from bot.secrets import KeyBox

log = logging.getLogger(__name__)

T = TypeVar("T")

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


# --- schema -------------------------------------------------------------------------------

# Applied in order, each once, recorded in PRAGMA user_version. Append; never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        id               INTEGER PRIMARY KEY,
        platform         TEXT    NOT NULL,
        platform_user_id TEXT    NOT NULL,
        name             TEXT    NOT NULL DEFAULT '',
        role             TEXT    NOT NULL DEFAULT 'user'
                                 CHECK (role IN ('user', 'admin', 'banned')),
        lang             TEXT,
        api_key_enc      BLOB,
        granted          INTEGER NOT NULL DEFAULT 0 CHECK (granted >= 0),
        created_at       REAL    NOT NULL,
        UNIQUE (platform, platform_user_id)
    );

    CREATE TABLE daily_usage (
        user_id INTEGER NOT NULL REFERENCES users (id),
        day     TEXT    NOT NULL,
        used    INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (user_id, day)
    ) WITHOUT ROWID;

    CREATE TABLE group_usage (
        group_key TEXT    NOT NULL,
        day       TEXT    NOT NULL,
        used      INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (group_key, day)
    ) WITHOUT ROWID;

    CREATE TABLE jobs (
        id             INTEGER PRIMARY KEY,
        user_id        INTEGER NOT NULL REFERENCES users (id),
        platform       TEXT    NOT NULL,
        chat_id        TEXT    NOT NULL,
        group_key      TEXT,
        kind           TEXT    NOT NULL CHECK (kind IN ('draw', 'edit')),
        prompt         TEXT    NOT NULL,
        options        TEXT    NOT NULL DEFAULT '{}',
        ref_count      INTEGER NOT NULL DEFAULT 0,
        provider       TEXT,
        own_key        INTEGER NOT NULL DEFAULT 0,
        status         TEXT    NOT NULL DEFAULT 'queued'
                               CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                 'cancelled')),
        error_kind     TEXT,
        error_detail   TEXT,
        created_at     REAL    NOT NULL,
        started_at     REAL,
        finished_at    REAL,
        usage          TEXT,
        revised_prompt TEXT,
        outputs        TEXT    NOT NULL DEFAULT '[]'
    );
    CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('queued', 'running');
    CREATE INDEX jobs_user ON jobs (user_id, status);

    CREATE TABLE reservations (
        job_id         INTEGER PRIMARY KEY REFERENCES jobs (id),
        user_id        INTEGER NOT NULL REFERENCES users (id),
        daily_amount   INTEGER NOT NULL CHECK (daily_amount >= 0),
        balance_amount INTEGER NOT NULL CHECK (balance_amount >= 0),
        day            TEXT    NOT NULL,
        group_key      TEXT,
        state          TEXT    NOT NULL CHECK (state IN ('reserved', 'committed', 'refunded'))
    );
    CREATE INDEX reservations_day ON reservations (day);
    CREATE INDEX reservations_open ON reservations (state) WHERE state = 'reserved';

    -- A settled reservation is final: a refunded job can never be committed, nor the reverse.
    CREATE TRIGGER reservations_settled_is_final
    BEFORE UPDATE OF state ON reservations WHEN OLD.state <> 'reserved'
    BEGIN
        SELECT RAISE(ABORT, 'reservation already settled');
    END;

    CREATE TABLE ledger (
        id             INTEGER PRIMARY KEY,
        job_id         INTEGER REFERENCES jobs (id),
        user_id        INTEGER NOT NULL REFERENCES users (id),
        kind           TEXT    NOT NULL CHECK (kind IN ('reserve', 'commit', 'refund', 'grant')),
        daily_amount   INTEGER NOT NULL DEFAULT 0,
        balance_amount INTEGER NOT NULL DEFAULT 0,
        day            TEXT,
        created_at     REAL    NOT NULL,
        note           TEXT    NOT NULL DEFAULT '',
        by_user_id     INTEGER REFERENCES users (id),
        CHECK ((job_id IS NULL) = (kind = 'grant'))
    );
    CREATE UNIQUE INDEX ledger_one_per_job_and_kind ON ledger (job_id, kind)
        WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_user ON ledger (user_id);
    CREATE INDEX ledger_day ON ledger (day);

    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    """,
    # 2: which sent message shows which job's result (replies to a result, result buttons).
    """
    CREATE TABLE messages (
        platform   TEXT    NOT NULL,
        chat_id    TEXT    NOT NULL,
        message_id TEXT    NOT NULL,
        job_id     INTEGER NOT NULL REFERENCES jobs (id),
        created_at REAL    NOT NULL,
        PRIMARY KEY (platform, chat_id, message_id)
    ) WITHOUT ROWID;
    """,
    # 3: what each provider (relay) was found to support: streaming, edits, 4K, its balance.
    """
    CREATE TABLE provider_capabilities (
        provider   TEXT NOT NULL PRIMARY KEY,
        data       TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: what a job whose results went to the chat is to be charged (NULL: they never did), so
    # recovery commits a delivered job whose commit could not be written, instead of refunding.
    """
    ALTER TABLE jobs ADD COLUMN charge INTEGER CHECK (charge >= 0);
    """,
    # 5: when the upstream answered (queue wait and upstream time apart) and the job's class
    # for the ETA ("provider|tier|quality|kind"), so estimates come from similar jobs only.
    """
    ALTER TABLE jobs ADD COLUMN upstream_done_at REAL;
    ALTER TABLE jobs ADD COLUMN eta_class TEXT;
    CREATE INDEX jobs_eta ON jobs (eta_class, id) WHERE eta_class IS NOT NULL;
    """,
    # 6: the operator console: who did what (grants, bans, refunds, logins), and the time
    # index its overview and jobs pages read by (the last 24 h / 7 d / 30 d).
    """
    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        created_at REAL    NOT NULL,
        actor      TEXT    NOT NULL,
        action     TEXT    NOT NULL,
        target     TEXT    NOT NULL DEFAULT '',
        detail     TEXT    NOT NULL DEFAULT '{}',
        job_id     INTEGER REFERENCES jobs (id)
    );
    -- A succeeded job is refunded by an operator at most once.
    CREATE UNIQUE INDEX audit_one_refund_per_job ON audit (job_id) WHERE action = 'refund';
    CREATE INDEX jobs_created ON jobs (created_at);
    """,
    # 7: each group's own rules, set by its admins with /group (keyed like group_usage).
    """
    CREATE TABLE group_rules (
        group_key  TEXT    NOT NULL PRIMARY KEY,
        enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        size       TEXT,
        quality    TEXT,
        cap        INTEGER CHECK (cap > 0),
        cooldown   INTEGER NOT NULL DEFAULT 0 CHECK (cooldown >= 0),
        updated_at REAL    NOT NULL,
        updated_by INTEGER REFERENCES users (id)
    ) WITHOUT ROWID;
    """,
    # 8: linked accounts (/link): an identity's account (NULL: its own row), when its key was
    # bound (of two keys the newer is kept), one-time link codes, and the ledger rebuilt so a
    # merge is recorded as 'transfer' rows (SQLite cannot alter a CHECK): every row, index and
    # append-only trigger kept.
    """
    ALTER TABLE users ADD COLUMN account_id INTEGER REFERENCES users (id);
    ALTER TABLE users ADD COLUMN key_set_at REAL;
    CREATE INDEX users_account ON users (account_id) WHERE account_id IS NOT NULL;

    CREATE TABLE link_codes (
        code       TEXT    NOT NULL PRIMARY KEY,
        user_id    INTEGER NOT NULL UNIQUE REFERENCES users (id),
        expires_at REAL    NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE ledger_new (
        id             INTEGER PRIMARY KEY,
        job_id         INTEGER REFERENCES jobs (id),
        user_id        INTEGER NOT NULL REFERENCES users (id),
        kind           TEXT    NOT NULL
                               CHECK (kind IN ('reserve', 'commit', 'refund', 'grant',
                                               'transfer')),
        daily_amount   INTEGER NOT NULL DEFAULT 0,
        balance_amount INTEGER NOT NULL DEFAULT 0,
        day            TEXT,
        created_at     REAL    NOT NULL,
        note           TEXT    NOT NULL DEFAULT '',
        by_user_id     INTEGER REFERENCES users (id),
        CHECK ((job_id IS NULL) = (kind IN ('grant', 'transfer')))
    );
    INSERT INTO ledger_new (id, job_id, user_id, kind, daily_amount, balance_amount, day,
                            created_at, note, by_user_id)
        SELECT id, job_id, user_id, kind, daily_amount, balance_amount, day, created_at, note,
               by_user_id
        FROM ledger;
    -- DROP TABLE fires no trigger; the append-only ones go with the old table.
    DROP TABLE ledger;
    ALTER TABLE ledger_new RENAME TO ledger;
    CREATE UNIQUE INDEX ledger_one_per_job_and_kind ON ledger (job_id, kind)
        WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_user ON ledger (user_id);
    CREATE INDEX ledger_day ON ledger (day);
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'ledger is append-only');
    END;
    """,
    # 9: the operator console's per-user settings: a daily allowance of the user's own (NULL:
    # DRAWBRIDGE_DAILY_CREDITS) and the last probe of the user's key (JSON: ok, kind, balance,
    # at), shown masked beside the key.
    """
    ALTER TABLE users ADD COLUMN daily_allowance INTEGER CHECK (daily_allowance >= 0);
    ALTER TABLE users ADD COLUMN key_probe TEXT;
    """,
)

_GROUP_RULES = frozenset({"enabled", "size", "quality", "cap", "cooldown"})

LINK_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
"""Link code characters: no 0/O, 1/I/L, which people misread when typing a code over."""
LINK_CODE_LENGTH = 8
LINK_CODE_TTL = 600.0
"""Seconds a link code is valid."""

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
)

# --- statements shared with bench/ledger.py (its raw-sqlite3 ceiling runs these same ones) ---

SQL_INSERT_JOB = """
    INSERT INTO jobs (user_id, platform, chat_id, group_key, kind, prompt, options, ref_count,
                      own_key, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# params: user_id, day, group_key, day, user_id, job_id
SQL_RESERVE_READ = """
    SELECT j.user_id, j.status, r.state,
           COALESCE((SELECT used FROM daily_usage WHERE user_id = ? AND day = ?), 0),
           u.granted,
           COALESCE((SELECT used FROM group_usage WHERE group_key = ? AND day = ?), 0),
           u.daily_allowance
    FROM jobs AS j
    JOIN users AS u ON u.id = ?
    LEFT JOIN reservations AS r ON r.job_id = j.id
    WHERE j.id = ?
"""
# params: amount, user_id, amount
SQL_TAKE_BALANCE = "UPDATE users SET granted = granted - ? WHERE id = ? AND granted >= ?"
# params: user_id, day, amount, allowance
SQL_TAKE_DAILY = """
    INSERT INTO daily_usage (user_id, day, used) VALUES (?, ?, ?)
    ON CONFLICT (user_id, day) DO UPDATE SET used = used + excluded.used
    WHERE used + excluded.used <= ?
"""
# params: group_key, day, amount, cap (0 = no cap)
SQL_TAKE_GROUP = """
    INSERT INTO group_usage (group_key, day, used) VALUES (?, ?, ?)
    ON CONFLICT (group_key, day) DO UPDATE SET used = used + excluded.used
    WHERE ?4 <= 0 OR used + excluded.used <= ?4
"""
SQL_INSERT_RESERVATION = """
    INSERT INTO reservations (job_id, user_id, daily_amount, balance_amount, day, group_key, state)
    VALUES (?, ?, ?, ?, ?, ?, 'reserved')
"""
SQL_INSERT_LEDGER = """
    INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day, created_at,
                        note, by_user_id)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# params: new state, job_id
SQL_SETTLE = """
    UPDATE reservations SET state = ? WHERE job_id = ? AND state = 'reserved'
    RETURNING user_id, daily_amount, balance_amount, day, group_key
"""

# An identity with its account's money, key and language: `store.user` and `find_user` read
# users through this, so every identity of one account charges the same row.
_USER_SELECT = """
    SELECT i.id AS identity_id, i.platform, i.platform_user_id, i.name, i.role,
           a.id AS id, a.lang, a.granted, a.api_key_enc, a.daily_allowance, a.key_probe
    FROM users AS i JOIN users AS a ON a.id = COALESCE(i.account_id, i.id)
"""

_JOB_SELECT = """
    SELECT j.*, r.state AS ledger_state,
           COALESCE(r.daily_amount + r.balance_amount, 0) AS cost,
           COALESCE(r.daily_amount + r.balance_amount, 0) - COALESCE((
               SELECT l.daily_amount + l.balance_amount FROM ledger AS l
               WHERE l.job_id = j.id AND l.kind = 'refund'), 0) AS spent
    FROM jobs AS j
    LEFT JOIN reservations AS r ON r.job_id = j.id
"""


class Store:
    """Async access to drawbridge's SQLite file (see the module docstring for the rules)."""

    def __init__(
        self, db: aiosqlite.Connection, keybox: KeyBox, admins: Set[tuple[str, str]]
    ) -> None:
        self._db = db
        self._keybox = keybox
        self._admins = frozenset((platform.lower(), uid) for platform, uid in admins)
        self._writes: set[asyncio.Task[Any]] = set()
        self._closed = False

    # --- lifecycle ---

    @classmethod
    async def open(
        cls, path: Path, *, keybox: KeyBox, admins: Set[tuple[str, str]] = frozenset()
    ) -> Store:
        """Open (creating if needed) the database at `path` and bring its schema up to date."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the sqlite3 module must not open transactions behind our back;
        # every transaction here is an explicit BEGIN IMMEDIATE.
        db = await aiosqlite.connect(path, isolation_level=None)
        store = cls(db, keybox, admins)
        try:
            db.row_factory = aiosqlite.Row
            await store._call(_prepare)
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        """Let transactions in flight finish, then close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        # Reads and single writes already queued run first: the thread takes trips in order.
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- users ---

    async def user(self, platform: str, platform_user_id: str, name: str = "") -> User:
        """Get or create the user; refresh the stored display name when `name` differs."""

        def get_or_create(con: sqlite3.Connection) -> sqlite3.Row:
            rows: list[sqlite3.Row] = con.execute(
                _USER_SELECT + " WHERE i.platform = ? AND i.platform_user_id = ?",
                (platform, platform_user_id),
            ).fetchall()
            if rows and (not name or rows[0]["name"] == name):
                return rows[0]
            if self._closed:  # like every write: refused once close() has begun
                raise StoreError("store is closed")
            # One statement, so atomic without a transaction; also right when another process
            # created the same user a moment ago. fetchall: a RETURNING statement's write is
            # final only once the statement has run to its end.
            rows = con.execute(
                """
                INSERT INTO users (platform, platform_user_id, name, created_at)
                VALUES (?, ?, ?, ?)
                ON CONFLICT (platform, platform_user_id) DO UPDATE
                SET name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE users.name END
                RETURNING id
                """,
                (platform, platform_user_id, name, time.time()),
            ).fetchall()
            # Read back with its account (a linked identity whose name changed).
            found: sqlite3.Row = con.execute(
                _USER_SELECT + " WHERE i.id = ?", (rows[0][0],)
            ).fetchall()[0]
            return found

        # Every command starts here, and a new user (or a new name) would otherwise cost a
        # second trip to the connection's thread.
        return self._user(await self._call(get_or_create))

    async def find_user(self, platform: str, ref: str) -> User | None:
        """Find a user by `ref`: an id on `platform`, `"platform:id"`, or the internal `"#id"`."""
        ref = ref.strip()
        if ref.startswith("#") and ref[1:].isdigit():
            rows = await self._read(_USER_SELECT + " WHERE i.id = ?", (int(ref[1:]),))
            return self._user(rows[0]) if rows else None
        other, sep, uid = ref.partition(":")
        candidates = [(platform, ref)]
        if sep and other and uid:
            candidates.insert(0, (other.strip().lower(), uid.strip()))
        for candidate in candidates:
            rows = await self._read(
                _USER_SELECT + " WHERE i.platform = ? AND i.platform_user_id = ?", candidate
            )
            if rows:
                return self._user(rows[0])
        return None

    async def set_role(self, user_id: int, role: str) -> None:
        """Store "user", "admin" or "banned" for one identity (`User.identity_id`: roles do
        not travel with /link). Config admins stay admin unless banned."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        await self._update_user(user_id, "UPDATE users SET role = ? WHERE id = ?", (role, user_id))

    async def set_daily_allowance(self, user_id: int, allowance: int | None) -> None:
        """Give the account a daily allowance of its own; None goes back to the configured
        one (`credits` and `reserve` use it in place of the `daily_allowance` they are given).
        """
        if allowance is not None and allowance < 0:
            raise ValueError("daily allowance must not be negative")
        await self._update_user(
            user_id, "UPDATE users SET daily_allowance = ? WHERE id = ?", (allowance, user_id)
        )

    async def set_key_probe(self, user_id: int, result: dict[str, Any] | None) -> None:
        """Remember the last probe of the account's key (None forgets it)."""
        await self._update_user(
            user_id,
            "UPDATE users SET key_probe = ? WHERE id = ?",
            (None if result is None else _dumps(result), user_id),
        )

    async def set_lang(self, user_id: int, lang: str | None) -> None:
        """Remember the user's language; None goes back to the default."""
        await self._update_user(user_id, "UPDATE users SET lang = ? WHERE id = ?", (lang, user_id))

    # --- personal keys ---

    async def set_api_key(self, user_id: int, api_key: str) -> None:
        """Store the user's own API key, encrypted."""
        token = self._keybox.encrypt(api_key)
        # When it was bound: of two linked accounts' keys, the newer is kept.
        await self._update_user(
            user_id,
            "UPDATE users SET api_key_enc = ?, key_set_at = ? WHERE id = ?",
            (token, time.time(), user_id),
        )

    async def get_api_key(self, user_id: int) -> str | None:
        """The user's own API key, or None (none set, or not readable with this secret)."""
        rows = await self._read("SELECT api_key_enc FROM users WHERE id = ?", (user_id,))
        if not rows or rows[0][0] is None:
            return None
        try:
            return self._keybox.decrypt(rows[0][0])
        except InvalidToken:
            log.warning(
                "user #%d has a stored API key this secret cannot decrypt "
                "(DRAWBRIDGE_SECRET_KEY or secret.key changed?)",
                user_id,
            )
            return None

    async def clear_api_key(self, user_id: int) -> bool:
        """Forget the user's own key; False if there was none."""
        cursor = await self._write_one(
            "UPDATE users SET api_key_enc = NULL WHERE id = ? AND api_key_enc IS NOT NULL",
            (user_id,),
        )
        return cursor.rowcount == 1

    # --- credits ---

    async def credits(self, user_id: int, day: date, daily_allowance: int) -> Credits:
        """The user's allowance used on `day` and granted balance."""
        rows = await self._read(
            """
            SELECT u.granted,
                   COALESCE((SELECT used FROM daily_usage WHERE user_id = u.id AND day = ?), 0),
                   u.daily_allowance
            FROM users AS u WHERE u.id = ?
            """,
            (day.isoformat(), user_id),
        )
        if not rows:
            raise NotFoundError(f"no user #{user_id}")
        own = rows[0][2]
        return Credits(
            daily_allowance=max(0, daily_allowance if own is None else own),
            daily_used=rows[0][1],
            balance=rows[0][0],
        )

    async def group_used(self, group_key: str, day: date) -> int:
        """Credits the group's jobs hold on `day` (reserved or spent), for the group cap."""
        rows = await self._read(
            "SELECT used FROM group_usage WHERE group_key = ? AND day = ?",
            (group_key, day.isoformat()),
        )
        return int(rows[0][0]) if rows else 0

    async def grant(
        self, user_id: int, amount: int, *, by_user_id: int | None = None, note: str = ""
    ) -> int:
        """Add `amount` (may be negative) to the granted balance; returns the new balance.

        The balance never goes below 0: a larger negative grant is clamped, and the ledger
        records the amount actually taken.
        """

        def apply(con: sqlite3.Connection) -> int:
            # A linked identity's own row holds nothing: the grant goes to its account.
            account = _account_of(con, user_id)
            rows = con.execute("SELECT granted FROM users WHERE id = ?", (account,)).fetchall()
            before: int = rows[0][0]
            after = max(0, before + amount)
            con.execute("UPDATE users SET granted = ? WHERE id = ?", (after, account))
            con.execute(
                SQL_INSERT_LEDGER,
                (None, account, "grant", 0, after - before, None, time.time(), note, by_user_id),
            )
            return after

        return await self._write(apply)

    # --- jobs and the ledger ---

    async def create_job(
        self,
        *,
        user_id: int,
        platform: str,
        chat_id: str,
        group_key: str | None,
        kind: str,
        prompt: str,
        options: dict[str, Any],
        ref_count: int,
        own_key: bool,
    ) -> int:
        """Record a new queued job; returns its id."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        params = (
            user_id,
            platform,
            chat_id,
            group_key,
            kind,
            prompt,
            _dumps(options),
            ref_count,
            int(own_key),
            time.time(),
        )

        job_id = (await self._write_one(SQL_INSERT_JOB, params)).lastrowid
        assert job_id is not None
        return job_id

    async def reserve(
        self,
        job_id: int,
        *,
        user_id: int,
        cost: int,
        day: date,
        daily_allowance: int,
        group_key: str | None = None,
        group_cap: int = 0,
    ) -> None:
        """Take `cost` credits for the job: today's free allowance first, then the balance.

        All or nothing, in one transaction. With `group_key`, `cost` also counts against the
        group's usage for `day`, and `group_cap > 0` (or the group's own lower cap, set with
        /group) refuses beyond it. Raises
        `GroupCapReachedError` or `InsufficientCreditsError` (charging nothing), and
        `ReservationError` if the job was already reserved (charging nothing again). A cost of
        0 (the user's own key) still records a reservation, so the job settles like any other.
        """
        if cost < 0:
            raise ValueError("cost must not be negative")
        iso_day = day.isoformat()

        def take(con: sqlite3.Connection) -> None:
            rows = con.execute(
                SQL_RESERVE_READ, (user_id, iso_day, group_key, iso_day, user_id, job_id)
            ).fetchall()
            if not rows:
                raise NotFoundError(f"no job #{job_id} or no user #{user_id}")
            owner, status, state, daily_used, balance, group_used, own_allowance = rows[0]
            # The account's own allowance (set in the console) replaces the configured one.
            allowance = max(0, daily_allowance if own_allowance is None else own_allowance)
            linked = con.execute("SELECT account_id FROM users WHERE id = ?", (user_id,)).fetchall()
            if linked and linked[0][0] is not None:
                # /link moved this row's account elsewhere after the caller read the user:
                # charging it would hand out a second daily allowance.
                raise ReservationError(f"user #{user_id} was linked into another account")
            if owner != user_id:
                raise ReservationError(f"job #{job_id} belongs to user #{owner}")
            if state is not None:
                raise ReservationError(f"job #{job_id} is already reserved ({state})")
            if status != "queued":
                raise ReservationError(f"job #{job_id} is {status}, not queued")
            cap = group_cap
            if group_key:
                # The group's own cap (/group cap), read in this transaction: never above
                # the global one, which the caller passes.
                own = con.execute(
                    "SELECT cap FROM group_rules WHERE group_key = ?", (group_key,)
                ).fetchall()
                cap = effective_cap(group_cap, own[0][0] if own else None)
            if group_key and cap > 0 and group_used + cost > cap:
                raise GroupCapReachedError(cap=cap)

            credits = Credits(allowance, daily_used, balance)
            if cost > credits.total_left:
                raise InsufficientCreditsError(needed=cost, left=credits.total_left)
            daily_part = min(cost, credits.daily_left)
            balance_part = cost - daily_part

            # The guards repeat the checks above inside the statements themselves, so the
            # charge is safe even if something else ever wrote between the read and here.
            if balance_part:
                cursor = con.execute(SQL_TAKE_BALANCE, (balance_part, user_id, balance_part))
                if cursor.rowcount != 1:
                    raise InsufficientCreditsError(needed=cost, left=credits.total_left)
            if daily_part:
                cursor = con.execute(SQL_TAKE_DAILY, (user_id, iso_day, daily_part, allowance))
                if cursor.rowcount != 1:
                    raise InsufficientCreditsError(needed=cost, left=credits.total_left)
            if group_key and cost:
                cursor = con.execute(SQL_TAKE_GROUP, (group_key, iso_day, cost, cap))
                if cursor.rowcount != 1:
                    raise GroupCapReachedError(cap=cap)
            con.execute(
                SQL_INSERT_RESERVATION,
                (job_id, user_id, daily_part, balance_part, iso_day, group_key),
            )
            con.execute(
                SQL_INSERT_LEDGER,
                (
                    job_id,
                    user_id,
                    "reserve",
                    daily_part,
                    balance_part,
                    iso_day,
                    time.time(),
                    "",
                    None,
                ),
            )

        await self._write(take)

    async def commit(self, job_id: int, amount: int | None = None) -> bool:
        """Make the job's reservation final (spent); False if it is not reserved.

        With `amount` (0 <= amount <= what was reserved), only that much is spent and the rest
        is refunded in the same transaction, as if the job had reserved `amount` from the
        start: the spent part is the daily allowance first, so the balance is what comes back
        first. Safe to call again (a settled reservation is final), so a caller may retry it.
        Raises `ValueError` (changing nothing) for an amount outside that range.
        """
        if amount is not None and amount < 0:
            raise ValueError("amount must not be negative")
        return await self._write(lambda con: _commit(con, job_id, "", amount))

    async def refund(self, job_id: int, reason: str) -> bool:
        """Give back everything the job's reservation took; False if it is not reserved.

        The daily part goes back to the reservation's day (so it only helps the user if that
        day is still today), the balance part to the granted balance, and the group usage to
        the group. Never twice: a refunded or committed reservation is final.
        """

        return await self._write(lambda con: _refund(con, job_id, reason))

    async def mark_delivering(self, job_id: int, charge: int) -> None:
        """Record what the job is to be charged, just before its results go to the chat.

        If the process stops before the commit is written, `recover()` commits `charge`
        rather than refunding: the user most likely has the images.
        """
        if charge < 0:
            raise ValueError("charge must not be negative")
        await self._write_one(
            "UPDATE jobs SET charge = ? WHERE id = ? AND status IN ('queued', 'running')",
            (charge, job_id),
        )

    async def mark_running(self, job_id: int, provider: str) -> None:
        """The job was handed to `provider` (again, when falling back to another one)."""
        await self._write_one(
            """
            UPDATE jobs SET status = 'running', provider = ?,
                            started_at = COALESCE(started_at, ?)
            WHERE id = ? AND status IN ('queued', 'running')
            """,
            (provider, time.time(), job_id),
        )

    async def finish_job(
        self,
        job_id: int,
        *,
        status: str,
        error_kind: str | None = None,
        error_detail: str | None = None,
        usage: dict[str, Any] | None = None,
        revised_prompt: str | None = None,
        outputs: list[dict[str, Any]] | None = None,
        provider: str | None = None,
    ) -> None:
        """Record the job's outcome; does nothing unless it is still queued or running."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final job status")
        await self._write_one(
            """
            UPDATE jobs SET status = ?, error_kind = ?, error_detail = ?, usage = ?,
                            revised_prompt = ?, outputs = ?, provider = COALESCE(?, provider),
                            finished_at = ?
            WHERE id = ? AND status IN ('queued', 'running')
            """,
            (
                status,
                error_kind,
                error_detail,
                None if usage is None else _dumps(usage),
                revised_prompt,
                _dumps(outputs or []),
                provider,
                time.time(),
                job_id,
            ),
        )

    async def job(self, job_id: int) -> Job | None:
        """The job, or None."""
        rows = await self._read(_JOB_SELECT + " WHERE j.id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    async def active_jobs(self, user_id: int) -> list[Job]:
        """The user's queued and running jobs, oldest first."""
        rows = await self._read(
            _JOB_SELECT + " WHERE j.user_id = ? AND j.status IN ('queued', 'running')"
            " ORDER BY j.id",
            (user_id,),
        )
        return [_job(row) for row in rows]

    async def recover(self) -> list[int]:
        """Settle what a crash left behind; returns the ids of the interrupted jobs.

        A queued or running job whose results were handed to the chat (`mark_delivering`)
        becomes succeeded and is charged what it recorded. Every other queued or running job
        becomes failed ("interrupted") and its reservation is refunded. A finished job whose
        reservation was never settled is settled by its outcome: committed if it succeeded
        (its recorded charge, if any), refunded otherwise.
        """

        def settle(con: sqlite3.Connection) -> list[int]:
            delivered = con.execute(
                """
                UPDATE jobs SET status = 'succeeded', finished_at = ?
                WHERE status IN ('queued', 'running') AND charge IS NOT NULL RETURNING id
                """,
                (time.time(),),
            ).fetchall()
            if delivered:
                log.warning(
                    "job(s) %s delivered their results but were never settled: committing",
                    ", ".join(str(row[0]) for row in delivered),
                )
            rows = con.execute(
                """
                UPDATE jobs SET status = 'failed', error_kind = ?, finished_at = ?
                WHERE status IN ('queued', 'running') RETURNING id
                """,
                (INTERRUPTED, time.time()),
            ).fetchall()
            interrupted = sorted(row[0] for row in rows)
            open_rows = con.execute(
                """
                SELECT r.job_id, j.status, j.charge, r.daily_amount + r.balance_amount
                FROM reservations AS r JOIN jobs AS j ON j.id = r.job_id
                WHERE r.state = 'reserved' ORDER BY r.job_id
                """
            ).fetchall()
            for job_id, status, charge, reserved in open_rows:
                if status == "succeeded":
                    amount = None if charge is None else min(charge, reserved)
                    _commit(con, job_id, "recovered", amount)
                else:
                    _refund(con, job_id, INTERRUPTED)
            return interrupted

        interrupted = await self._write(settle)
        if interrupted:
            log.info("recovered %d interrupted job(s)", len(interrupted))
        return interrupted

    # --- result messages ---

    async def remember_message(
        self, platform: str, chat_id: str, message_id: str, job_id: int
    ) -> None:
        """Record that a sent message shows the job's result."""
        await self._write_one(
            """
            INSERT INTO messages (platform, chat_id, message_id, job_id, created_at)
            VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (platform, chat_id, message_id) DO UPDATE SET job_id = excluded.job_id
            """,
            (platform, str(chat_id), str(message_id), job_id, time.time()),
        )

    async def message_job(self, platform: str, chat_id: str, message_id: str) -> int | None:
        """The job whose result the message shows, or None if it is not one of ours."""
        rows = await self._read(
            "SELECT job_id FROM messages WHERE platform = ? AND chat_id = ? AND message_id = ?",
            (platform, str(chat_id), str(message_id)),
        )
        return int(rows[0][0]) if rows else None

    # --- provider capabilities ---

    async def provider_capabilities(self, provider: str) -> dict[str, Any]:
        """What was learned about a provider (a JSON object; empty when nothing is known)."""
        rows = await self._read(
            "SELECT data FROM provider_capabilities WHERE provider = ?", (provider,)
        )
        if not rows:
            return {}
        value = json.loads(rows[0][0])
        return value if isinstance(value, dict) else {}

    async def update_provider_capabilities(
        self, provider: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge `changes` into a provider's learned capabilities; returns the whole object.

        One statement (json_patch), so two processes learning at once cannot lose an update.
        A key whose value is None is removed.
        """
        rows = await self._write_one(
            """
            INSERT INTO provider_capabilities (provider, data, updated_at)
            VALUES (?1, json_patch('{}', ?2), ?3)
            ON CONFLICT (provider) DO UPDATE
                SET data = json_patch(data, ?2), updated_at = ?3
            RETURNING data
            """,
            (provider, _dumps(changes), time.time()),
        )
        row = await rows.fetchone()
        value = json.loads(row[0]) if row is not None else {}
        return value if isinstance(value, dict) else {}

    # --- numbers ---

    async def stats(self, day: date, *, tz: tzinfo | None = None) -> dict[str, Any]:
        """Numbers for the admin about `day` (a date in `tz`, UTC if None).

        Keys: `users`; `jobs_today` (all jobs created that day, refused ones included) with
        `jobs_by_status`, `succeeded_today` and `failed_today`; `images_today` (delivered
        by jobs created that day); `credits_today` (committed for reservations of that day)
        and `credits_reserved_today` (still in flight); `jobs_running`, `jobs_queued` (now).
        """
        start = datetime.combine(day, dt_time(0), tz or UTC).timestamp()
        end = datetime.combine(day + timedelta(days=1), dt_time(0), tz or UTC).timestamp()
        rows = await self._read(
            """
            SELECT status, COUNT(*),
                   SUM(CASE WHEN status = 'succeeded' THEN json_array_length(outputs) END)
            FROM jobs WHERE created_at >= ? AND created_at < ? GROUP BY status
            """,
            (start, end),
        )
        by_status: dict[str, int] = {row[0]: row[1] for row in rows}
        # Committed credits come from the commit rows: a partial commit spent less than it
        # reserved.
        credit_rows = await self._read(
            """
            SELECT 'committed', SUM(daily_amount + balance_amount)
            FROM ledger WHERE kind = 'commit' AND day = ?
            UNION ALL
            SELECT 'reserved', SUM(daily_amount + balance_amount)
            FROM reservations WHERE state = 'reserved' AND day = ?
            """,
            (day.isoformat(), day.isoformat()),
        )
        by_state: dict[str, int] = {row[0]: row[1] or 0 for row in credit_rows}
        counts = await self._read(
            """
            SELECT (SELECT COUNT(*) FROM users),
                   (SELECT COUNT(*) FROM jobs WHERE status = 'running'),
                   (SELECT COUNT(*) FROM jobs WHERE status = 'queued')
            """,
            (),
        )
        users, running, queued = counts[0]
        return {
            "day": day.isoformat(),
            "users": users,
            "jobs_today": sum(by_status.values()),
            "jobs_by_status": by_status,
            "succeeded_today": by_status.get("succeeded", 0),
            "failed_today": by_status.get("failed", 0),
            "images_today": sum(row[2] or 0 for row in rows),
            "credits_today": by_state.get("committed", 0),
            "credits_reserved_today": by_state.get("reserved", 0),
            "jobs_running": running,
            "jobs_queued": queued,
        }

    async def ledger_sum(self, user_id: int) -> int:
        """Net credits the user's jobs hold: reserved minus refunded (committed or in flight)."""
        rows = await self._read(
            """
            SELECT COALESCE(SUM(CASE kind WHEN 'reserve' THEN daily_amount + balance_amount
                                          WHEN 'refund' THEN -(daily_amount + balance_amount)
                                          ELSE 0 END), 0)
            FROM ledger WHERE user_id = ?
            """,
            (user_id,),
        )
        return int(rows[0][0])

    # --- ETA: upstream timings per job class (issue 14, "An honest ETA") ---

    async def mark_upstream_done(self, job_id: int, eta_class: str) -> None:
        """The upstream answered this job now; `eta_class` names the jobs it is like."""
        await self._write_one(
            "UPDATE jobs SET upstream_done_at = ?, eta_class = ? WHERE id = ?",
            (time.time(), eta_class, job_id),
        )

    async def upstream_durations(self, eta_class: str, limit: int) -> list[float]:
        """Upstream seconds of the last `limit` successful jobs of a class, oldest first."""
        rows = await self._read(
            """
            SELECT upstream_done_at - started_at FROM jobs
            WHERE eta_class = ? AND status = 'succeeded'
              AND upstream_done_at IS NOT NULL AND started_at IS NOT NULL
            ORDER BY id DESC LIMIT ?
            """,
            (eta_class, limit),
        )
        return [max(0.0, float(row[0])) for row in reversed(rows)]

    # ==== groups (/group) and linked accounts (/link): issue 14 ==============================

    async def group_rules(self, group_key: str) -> GroupRules:
        """The group's own rules (the defaults when its admins never set any)."""
        rows = await self._read("SELECT * FROM group_rules WHERE group_key = ?", (group_key,))
        if not rows:
            return GroupRules()
        row = rows[0]
        return GroupRules(
            enabled=bool(row["enabled"]),
            size=row["size"],
            quality=row["quality"],
            cap=row["cap"],
            cooldown=row["cooldown"],
        )

    async def set_group_rule(
        self, group_key: str, name: str, value: Any, *, by_user_id: int | None = None
    ) -> GroupRules:
        """Set one rule (`enabled`, `size`, `quality`, `cap`, `cooldown`); returns them all.

        None clears `size`, `quality` and `cap`. One statement: two admins at once each
        change only their own rule.
        """
        if name not in _GROUP_RULES:
            raise ValueError(f"unknown group rule {name!r}")
        if name == "enabled":
            value = int(bool(value))
        elif name == "cooldown":
            value = int(value or 0)
        # The column name comes from the fixed set above, never from the caller's text.
        await self._write_one(
            f"""
            INSERT INTO group_rules (group_key, {name}, updated_at, updated_by)
            VALUES (?1, ?2, ?3, ?4)
            ON CONFLICT (group_key) DO UPDATE
                SET {name} = ?2, updated_at = ?3, updated_by = ?4
            """,
            (group_key, value, time.time(), by_user_id),
        )
        return await self.group_rules(group_key)

    async def last_group_job_at(self, user_id: int, group_key: str) -> float | None:
        """When the user last started a job in the group that was not refunded (cooldown)."""
        rows = await self._read(
            """
            SELECT MAX(j.created_at) FROM jobs AS j JOIN reservations AS r ON r.job_id = j.id
            WHERE j.user_id = ? AND j.group_key = ? AND r.state <> 'refunded'
            """,
            (user_id, group_key),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    async def create_link_code(self, identity_id: int, *, ttl: float = LINK_CODE_TTL) -> str:
        """A new one-time code for joining another identity to this one's account.

        It replaces the identity's earlier code and is valid `ttl` seconds.
        """

        def create(con: sqlite3.Connection) -> str:
            con.execute("DELETE FROM link_codes WHERE expires_at < ?", (time.time(),))
            while True:
                code = "".join(secrets.choice(LINK_CODE_ALPHABET) for _ in range(LINK_CODE_LENGTH))
                try:
                    con.execute(
                        """
                        INSERT INTO link_codes (code, user_id, expires_at) VALUES (?, ?, ?)
                        ON CONFLICT (user_id) DO UPDATE
                            SET code = excluded.code, expires_at = excluded.expires_at
                        """,
                        (code, identity_id, time.time() + ttl),
                    )
                except sqlite3.IntegrityError:
                    continue  # another identity holds this very code: draw again
                return code

        return await self._write(create)

    async def burn_link_code(self, code: str) -> None:
        """Forget a code that was shown where others could read it."""
        await self._write_one("DELETE FROM link_codes WHERE code = ?", (normalize_code(code),))

    async def link(self, code: str, identity_id: int, day: date) -> LinkResult:
        """Join the identity (and its account) to the account of the code's owner.

        In one transaction: the joining account's balance, its allowance used on `day`, key,
        language and jobs move to the other account (the credits as 'transfer' ledger rows,
        out of one and into the other), and each of its identities points there. Of two keys
        the newer is kept. Raises `LinkRefused` (nothing changed) for an unknown, expired or
        own code, a banned identity on either side, two identities of one platform, accounts
        already one, or a job of the joining account still running.
        """
        wanted = normalize_code(code)

        def join(con: sqlite3.Connection) -> LinkResult:
            rows = con.execute(
                "SELECT user_id, expires_at FROM link_codes WHERE code = ?", (wanted,)
            ).fetchall()
            if not rows:
                raise LinkRefused("bad_code")
            owner, expires_at = rows[0]
            if expires_at < time.time():
                con.execute("DELETE FROM link_codes WHERE code = ?", (wanted,))
                return LinkResult(0, (), expired=True)
            if owner == identity_id:
                raise LinkRefused("own_code")
            dst = _account_of(con, owner)
            src = _account_of(con, identity_id)
            if dst == src:
                raise LinkRefused("already")
            members = con.execute(
                """
                SELECT platform, role FROM users
                WHERE COALESCE(account_id, id) IN (?, ?)
                """,
                (dst, src),
            ).fetchall()
            if any(role == "banned" for _, role in members):
                raise LinkRefused("banned")
            platforms = [platform.lower() for platform, _ in members]
            if len(platforms) != len(set(platforms)):
                raise LinkRefused("same_platform")
            if _has_jobs_in_flight(con, src):
                raise LinkRefused("busy")
            moved, key = _move_account(con, src, dst, day, note=f"link #{src} -> #{dst}")
            con.execute(
                "UPDATE users SET account_id = ? WHERE account_id = ? OR id = ?", (dst, src, src)
            )
            con.execute("DELETE FROM link_codes WHERE code = ?", (wanted,))
            return LinkResult(dst, _identities(con, dst), moved=moved, key=key)

        result = await self._write(join)
        if result.expired:
            raise LinkRefused("expired")
        return result

    async def unlink(self, identity_id: int, day: date) -> bool:
        """Detach the identity from its account; False if it shares its account with none.

        The credits, key, language and jobs stay with the account: when the identity was the
        account's own row, they move (as 'transfer' rows) to the oldest other identity, which
        then holds the account. Raises `LinkRefused("busy")` while one of its jobs runs.
        """

        def detach(con: sqlite3.Connection) -> bool:
            account = _account_of(con, identity_id)
            others = [
                row[0]
                for row in con.execute(
                    "SELECT id FROM users WHERE COALESCE(account_id, id) = ? AND id <> ?"
                    " ORDER BY id",
                    (account, identity_id),
                )
            ]
            if not others:
                return False
            if account == identity_id:
                # The account lives in this row: hand it to the next identity first.
                if _has_jobs_in_flight(con, identity_id):
                    raise LinkRefused("busy")
                heir = others[0]
                _move_account(con, identity_id, heir, day, note=f"unlink #{identity_id}")
                con.execute(
                    "UPDATE users SET account_id = ? WHERE account_id = ?", (heir, identity_id)
                )
                con.execute("UPDATE users SET account_id = NULL WHERE id = ?", (heir,))
            else:
                con.execute("UPDATE users SET account_id = NULL WHERE id = ?", (identity_id,))
            return True

        return await self._write(detach)

    async def identities(self, account_id: int) -> list[tuple[str, str, str]]:
        """(platform, platform user id, name) of each identity sharing the account."""
        rows = await self._read(
            "SELECT platform, platform_user_id, name FROM users"
            " WHERE COALESCE(account_id, id) = ? ORDER BY id",
            (account_id,),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    # ==== end of issue 14's section ===========================================================

    # --- internals ---

    def _user(self, row: sqlite3.Row) -> User:
        role = row["role"]
        # Config admins are admins without a stored role, so removing them from the config
        # takes the power away; an explicit ban still wins.
        if role != "banned" and (row["platform"].lower(), row["platform_user_id"]) in self._admins:
            role = "admin"
        keys = row.keys()
        return User(
            id=row["id"],
            platform=row["platform"],
            platform_user_id=row["platform_user_id"],
            name=row["name"],
            role=role,
            lang=row["lang"],
            granted=row["granted"],
            has_key=row["api_key_enc"] is not None,
            # A plain users row (no _USER_SELECT) is its own identity.
            identity_id=row["identity_id"] if "identity_id" in keys else row["id"],
            daily_allowance=row["daily_allowance"],
            key_probe=None if row["key_probe"] is None else json.loads(row["key_probe"]),
        )

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        # One statement, in autocommit mode: consistent by itself, no transaction needed. It
        # cannot run inside another task's transaction: each of those is one trip of its own.
        return list(await self._db.execute_fetchall(sql, params))

    async def _write_one(self, sql: str, params: tuple[Any, ...]) -> aiosqlite.Cursor:
        """Run one write statement (read `rowcount` or `lastrowid` on the result).

        A single statement is atomic on its own, and SQLite takes the write lock for it at
        once (waiting up to busy_timeout), so no explicit transaction is needed: that is
        for read-then-write sequences (`_write`).
        """
        if self._closed:
            raise StoreError("store is closed")
        return await self._db.execute(sql, params)

    async def _update_user(self, user_id: int, sql: str, params: tuple[Any, ...]) -> None:
        if (await self._write_one(sql, params)).rowcount != 1:
            raise NotFoundError(f"no user #{user_id}")

    async def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run `body` in one BEGIN IMMEDIATE transaction, in one trip to the connection's thread.

        `body` is plain synchronous code over the sqlite3 connection; what it raises (after
        the ROLLBACK) reaches the caller unchanged. Shielded: the trip runs to COMMIT or
        ROLLBACK on the thread whatever happens to the caller, and the shield keeps the task
        that awaits it alive, so `close()` waits for it and its outcome is not lost when a
        caller is cancelled half-way (shutdown, a timeout).
        """
        if self._closed:
            raise StoreError("store is closed")
        task = asyncio.ensure_future(self._call(lambda con: _in_transaction(con, body)))
        self._writes.add(task)
        task.add_done_callback(_forget_write(self._writes))
        return await asyncio.shield(task)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread, in one hand-off whatever it does.

        aiosqlite makes every statement its own trip to that thread, and each trip (a thread
        wake-up and a loop wake-up) costs far more than the SQL. `Connection._execute` is
        aiosqlite's private, long-stable way to queue a callable onto its thread (its own
        `execute`, `commit` and `close` are built on it) and `_conn` is the sqlite3 connection
        that thread owns; this is the one place that touches either. Every test in
        tests/test_store.py comes through here (open() does), so an aiosqlite release that
        changes them fails there at once.
        """
        # aiosqlite leaves its private method unannotated.
        result: T = await self._db._execute(fn, self._db._conn)  # type: ignore[no-untyped-call]
        return result

    # ==== operator console (adapters/console): what its pages read and do ====================
    # Kept together so the console never reaches the database any other way.

    async def console_now(self) -> dict[str, int]:
        """Jobs queued and running right now."""
        rows = await self._read(
            "SELECT status, COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
            " GROUP BY status",
            (),
        )
        counts = {row[0]: int(row[1]) for row in rows}
        return {"queued": counts.get("queued", 0), "running": counts.get("running", 0)}

    async def console_overview(self, since: float) -> dict[str, Any]:
        """Numbers about the jobs created since `since` (unix seconds), by platform.

        Keys: `per_hour` [(hour start, platform, jobs)], `platforms` {platform: {jobs,
        succeeded, failed, spent}}, `durations` [(provider, size, seconds queued to finished)]
        of succeeded jobs, `failures` {error kind: jobs}, `top_users` and `top_groups`
        [(label, jobs, spent)].
        """

        return await self._call(lambda con: console_overview_sql(con, since))

    async def console_jobs(
        self, filters: dict[str, str], *, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """Jobs matching `filters`, newest first, and how many match in all.

        Filters (each optional): platform, chat, user (`#id` or a platform user id), status,
        error_kind, provider, since and until (unix seconds, on the creation time).
        """
        return await self._call(lambda con: console_jobs_sql(con, filters, limit, offset))

    async def console_users(
        self, search: str, day: date, *, limit: int = 50
    ) -> list[tuple[User, int, int]]:
        """Users whose platform id or name contains `search`: (user, used today, jobs)."""
        like = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self._db.execute_fetchall(
            r"""
            SELECT u.*,
                   COALESCE((SELECT used FROM daily_usage WHERE user_id = u.id AND day = :day), 0)
                       AS used_today,
                   (SELECT COUNT(*) FROM jobs WHERE user_id = u.id) AS job_count
            FROM users AS u
            WHERE u.platform_user_id LIKE :like ESCAPE '\' OR u.name LIKE :like ESCAPE '\'
               OR u.platform || ':' || u.platform_user_id LIKE :like ESCAPE '\'
            ORDER BY u.id DESC LIMIT :limit
            """,
            {"day": day.isoformat(), "like": f"%{like}%", "limit": limit},
        )
        return [(self._user(row), int(row["used_today"]), int(row["job_count"])) for row in rows]

    async def console_ledger(
        self, filters: dict[str, str], *, limit: int | None = 200
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Ledger rows matching `filters` (user `#id`, kind, job, since, until), newest first,
        and their totals by kind (daily + balance amounts), summed by SQLite over all matches.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if user := filters.get("user", "").strip().lstrip("#"):
            clauses.append("l.user_id = ?")
            params.append(int(user) if user.isdigit() else -1)
        if kind := filters.get("kind", "").strip():
            clauses.append("l.kind = ?")
            params.append(kind)
        if job := filters.get("job", "").strip().lstrip("#"):
            clauses.append("l.job_id = ?")
            params.append(int(job) if job.isdigit() else -1)
        for name, op in (("since", ">="), ("until", "<")):
            if value := filters.get(name, "").strip():
                clauses.append(f"l.created_at {op} ?")
                params.append(float(value))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = await self._read(
            "SELECT l.*, u.platform || ':' || u.platform_user_id AS who FROM ledger AS l"
            " JOIN users AS u ON u.id = l.user_id"
            + where
            + " ORDER BY l.id DESC"
            + (" LIMIT ?" if limit is not None else ""),
            (*params, *(() if limit is None else (limit,))),
        )
        sums = await self._read(
            "SELECT l.kind, SUM(l.daily_amount + l.balance_amount), COUNT(*) FROM ledger AS l"
            + where
            + " GROUP BY l.kind",
            tuple(params),
        )
        totals = {row[0]: int(row[1] or 0) for row in sums}
        totals["rows"] = sum(int(row[2]) for row in sums)
        return [dict(row) for row in rows], totals

    async def console_provider_health(self, since: float) -> dict[str, dict[str, Any]]:
        """Per provider since `since`: jobs, succeeded, latencies (seconds), the last error."""

        def read(con: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            health: dict[str, dict[str, Any]] = {}
            for provider, status, seconds, kind, detail in con.execute(
                """
                SELECT provider, status, finished_at - COALESCE(started_at, created_at),
                       error_kind, error_detail
                FROM jobs WHERE provider IS NOT NULL AND created_at >= ? ORDER BY id
                """,
                (since,),
            ):
                entry = health.setdefault(
                    provider, {"jobs": 0, "succeeded": 0, "latencies": [], "last_error": None}
                )
                entry["jobs"] += 1
                if status == "succeeded":
                    entry["succeeded"] += 1
                    if seconds is not None:
                        entry["latencies"].append(float(seconds))
                elif status == "failed":
                    entry["last_error"] = f"{kind}: {detail or ''}".strip()
            return health

        return await self._call(read)

    async def console_providers_known(self) -> list[str]:
        """Providers with learned capabilities."""
        rows = await self._read("SELECT provider FROM provider_capabilities ORDER BY 1", ())
        return [row[0] for row in rows]

    async def console_metrics(self) -> dict[str, Any]:
        """Totals for /metrics: jobs by (platform, status, error kind) and by (provider,
        status), durations of finished jobs, and credits by ledger kind and reserved now."""

        def read(con: sqlite3.Connection) -> dict[str, Any]:
            return {
                "jobs": con.execute(
                    "SELECT platform, status, COALESCE(error_kind, ''), COUNT(*) FROM jobs"
                    " GROUP BY 1, 2, 3"
                ).fetchall(),
                "providers": con.execute(
                    "SELECT provider, status, COUNT(*) FROM jobs WHERE provider IS NOT NULL"
                    " GROUP BY 1, 2"
                ).fetchall(),
                "durations": con.execute(
                    "SELECT platform, finished_at - created_at FROM jobs"
                    " WHERE status = 'succeeded' AND finished_at IS NOT NULL"
                ).fetchall(),
                "credits": con.execute(
                    "SELECT kind, SUM(daily_amount + balance_amount) FROM ledger GROUP BY kind"
                ).fetchall(),
                "reserved_now": con.execute(
                    "SELECT COALESCE(SUM(daily_amount + balance_amount), 0) FROM reservations"
                    " WHERE state = 'reserved'"
                ).fetchall()[0][0],
            }

        return await self._call(read)

    async def console_refund(self, job_id: int, *, actor: str, by_user_id: int | None) -> int:
        """Give back what a succeeded job was charged, as a grant to its user's balance.

        The reservation stays committed (settled is final); the ledger gets a 'grant' row
        noting the job, and the audit table a 'refund' row that makes a second refund of the
        same job fail. Returns the credits given back. Raises `NotFoundError`, or
        `StoreError` when the job did not succeed, was not charged, or was refunded already.
        """

        def apply(con: sqlite3.Connection) -> int:
            rows = con.execute(_JOB_SELECT + " WHERE j.id = ?", (job_id,)).fetchall()
            if not rows:
                raise NotFoundError(f"no job #{job_id}")
            job = _job(rows[0])
            if job.status != "succeeded" or job.ledger_state != "committed" or job.spent <= 0:
                raise StoreError(f"job #{job_id} has no charge to refund")
            try:
                con.execute(
                    "INSERT INTO audit (created_at, actor, action, target, detail, job_id)"
                    " VALUES (?, ?, 'refund', ?, ?, ?)",
                    (time.time(), actor, f"#{job.user_id}", _dumps({"credits": job.spent}), job_id),
                )
            except sqlite3.IntegrityError:
                raise StoreError(f"job #{job_id} was refunded already") from None
            con.execute(
                "UPDATE users SET granted = granted + ? WHERE id = ?", (job.spent, job.user_id)
            )
            con.execute(
                SQL_INSERT_LEDGER,
                (
                    None,
                    job.user_id,
                    "grant",
                    0,
                    job.spent,
                    None,
                    time.time(),
                    f"refund of job #{job_id} by {actor}",
                    by_user_id,
                ),
            )
            return job.spent

        return await self._write(apply)

    async def audit(
        self, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None
    ) -> None:
        """Record an operator's action (who, what, on whom)."""
        await self._write_one(
            "INSERT INTO audit (created_at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, _dumps(detail or {})),
        )

    async def audit_entries(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest operator actions, newest first."""
        rows = await self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(row) for row in rows]

    async def console_groups(self, since: float, day: date) -> list[dict[str, Any]]:
        """Each group with jobs since `since` or rules of its own: jobs, credits spent (since
        `since`), used on `day`, and its rules (`group_rules` columns, None when never set)."""
        rows = await self._read(
            """
            WITH seen AS (
                SELECT j.group_key, COUNT(*) AS jobs,
                       SUM(COALESCE(c.daily_amount + c.balance_amount, 0)) AS spent
                FROM jobs AS j LEFT JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
                WHERE j.created_at >= ? AND j.group_key IS NOT NULL GROUP BY j.group_key
            ),
            keys AS (SELECT group_key FROM seen UNION SELECT group_key FROM group_rules)
            SELECT k.group_key, COALESCE(s.jobs, 0) AS jobs, COALESCE(s.spent, 0) AS spent,
                   COALESCE((SELECT used FROM group_usage AS g
                             WHERE g.group_key = k.group_key AND g.day = ?), 0) AS used_today,
                   r.enabled, r.size, r.quality, r.cap, r.cooldown
            FROM keys AS k
            LEFT JOIN seen AS s ON s.group_key = k.group_key
            LEFT JOIN group_rules AS r ON r.group_key = k.group_key
            ORDER BY jobs DESC, k.group_key LIMIT 500
            """,
            (since, day.isoformat()),
        )
        return [dict(row) for row in rows]

    async def console_upstream_done(self, job_ids: list[int]) -> dict[int, float]:
        """When the upstream answered each of these jobs (those it did), to tell the time
        spent running upstream from the time delivering."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = await self._read(
            f"SELECT id, upstream_done_at FROM jobs WHERE id IN ({marks})"
            " AND upstream_done_at IS NOT NULL",
            tuple(job_ids),
        )
        return {int(row[0]): float(row[1]) for row in rows}

    # ==== end of the operator console's section ===============================================


def is_transient(error: BaseException) -> bool:
    """Whether a failed store call may succeed if tried again.

    True for the file locked by another writer past busy_timeout, a full disk, an I/O error;
    False for contract errors (`StoreError`), constraint violations and anything else.
    """
    return isinstance(error, sqlite3.OperationalError)


def _forget_write(writes: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        writes.discard(task)
        # Retrieve the outcome: if the caller was cancelled, nobody else will, and asyncio
        # would log "exception was never retrieved".
        if not task.cancelled():
            task.exception()

    return done


def _in_transaction(con: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    # Runs on the connection's thread: BEGIN, body and COMMIT or ROLLBACK in the same call,
    # so no other statement can run inside the transaction and none is ever left open.
    con.execute("BEGIN IMMEDIATE")
    try:
        result = body(con)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    return result


def normalize_code(code: str) -> str:
    """A link code as stored: upper case, without spaces or dashes people add."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def _account_of(con: sqlite3.Connection, identity_id: int) -> int:
    rows = con.execute(
        "SELECT COALESCE(account_id, id) FROM users WHERE id = ?", (identity_id,)
    ).fetchall()
    if not rows:
        raise NotFoundError(f"no user #{identity_id}")
    return int(rows[0][0])


def _identities(con: sqlite3.Connection, account_id: int) -> tuple[tuple[str, str], ...]:
    rows = con.execute(
        "SELECT platform, platform_user_id FROM users WHERE COALESCE(account_id, id) = ?"
        " ORDER BY id",
        (account_id,),
    ).fetchall()
    return tuple((row[0], row[1]) for row in rows)


def _has_jobs_in_flight(con: sqlite3.Connection, account_id: int) -> bool:
    # A queued job may not have reserved yet: it would reserve against the old row.
    rows = con.execute(
        """
        SELECT EXISTS (SELECT 1 FROM jobs WHERE user_id = ? AND status IN ('queued', 'running'))
            OR EXISTS (SELECT 1 FROM reservations WHERE user_id = ? AND state = 'reserved')
        """,
        (account_id, account_id),
    ).fetchall()
    return bool(rows[0][0])


def _transfer(
    con: sqlite3.Connection, src: int, dst: int, daily: int, balance: int, day: str, note: str
) -> None:
    # A pair of rows that sum to zero: out of one account, into the other.
    for user_id, sign in ((src, -1), (dst, 1)):
        con.execute(
            SQL_INSERT_LEDGER,
            (None, user_id, "transfer", sign * daily, sign * balance, day, time.time(), note, None),
        )


def _move_account(
    con: sqlite3.Connection, src: int, dst: int, day: date, note: str
) -> tuple[int, str]:
    """Move what account row `src` holds into `dst` (no job of `src` may be in flight).

    Returns (balance moved, what became of the keys: "" none moved, "moved", "kept_newer"
    when both had one and `dst`'s was newer, "took_newer" when `src`'s was).
    """
    iso_day = day.isoformat()
    src_row = con.execute(
        "SELECT granted, api_key_enc, key_set_at, lang FROM users WHERE id = ?", (src,)
    ).fetchall()[0]
    dst_row = con.execute(
        "SELECT api_key_enc, key_set_at FROM users WHERE id = ?", (dst,)
    ).fetchall()[0]
    granted = int(src_row[0])
    used_rows = con.execute(
        "SELECT used FROM daily_usage WHERE user_id = ? AND day = ?", (src, iso_day)
    ).fetchall()
    used = int(used_rows[0][0]) if used_rows else 0
    if granted:
        con.execute(
            "UPDATE users SET granted = granted - ? WHERE id = ? AND granted >= ?",
            (granted, src, granted),
        )
        con.execute("UPDATE users SET granted = granted + ? WHERE id = ?", (granted, dst))
    if used:
        # One allowance a day: what the joining account used today counts for the joint one.
        con.execute(
            "UPDATE daily_usage SET used = used - ? WHERE user_id = ? AND day = ?",
            (used, src, iso_day),
        )
        con.execute(
            """
            INSERT INTO daily_usage (user_id, day, used) VALUES (?, ?, ?)
            ON CONFLICT (user_id, day) DO UPDATE SET used = used + excluded.used
            """,
            (dst, iso_day, used),
        )
    if granted or used:
        _transfer(con, src, dst, used, granted, iso_day, note)
    key = ""
    if src_row[1] is not None:
        src_newer = dst_row[0] is None or (src_row[2] or 0.0) > (dst_row[1] or 0.0)
        if src_newer:
            con.execute(
                "UPDATE users SET api_key_enc = ?, key_set_at = ? WHERE id = ?",
                (src_row[1], src_row[2], dst),
            )
        key = "moved" if dst_row[0] is None else ("took_newer" if src_newer else "kept_newer")
        con.execute("UPDATE users SET api_key_enc = NULL, key_set_at = NULL WHERE id = ?", (src,))
    con.execute("UPDATE users SET lang = COALESCE(lang, ?) WHERE id = ?", (src_row[3], dst))
    con.execute("UPDATE users SET lang = NULL WHERE id = ?", (src,))
    con.execute("UPDATE jobs SET user_id = ? WHERE user_id = ?", (dst, src))
    return granted, key


def _settle(con: sqlite3.Connection, job_id: int, state: str) -> sqlite3.Row | None:
    # fetchall, never fetchone: a RETURNING statement has done all its writes only once it
    # has run to its end, and COMMIT refuses while a write statement is still in progress.
    rows = con.execute(SQL_SETTLE, (state, job_id)).fetchall()
    return rows[0] if rows else None


def _commit(con: sqlite3.Connection, job_id: int, note: str, amount: int | None = None) -> bool:
    row = _settle(con, job_id, "committed")
    if row is None:
        return False
    user_id, daily, balance, day, group_key = row
    back = 0 if amount is None else daily + balance - amount
    if back < 0 or back > daily + balance:
        # Raised inside the transaction: the state change above is rolled back with it.
        raise ValueError(f"job #{job_id}: cannot commit {amount} of {daily + balance}")
    # What is kept is spent the way the reservation spent: the daily allowance first. So the
    # balance comes back first, which also suits the user (the allowance lapses at midnight).
    back_balance = min(back, balance)
    back_daily = back - back_balance
    # The commit row records what was spent; the invariants count only reserve, refund and
    # grant rows, and reserve == commit + refund for every settled job.
    con.execute(
        SQL_INSERT_LEDGER,
        (
            job_id,
            user_id,
            "commit",
            daily - back_daily,
            balance - back_balance,
            day,
            time.time(),
            note,
            None,
        ),
    )
    if back:
        _give_back(con, user_id, back_daily, back_balance, day, group_key)
        con.execute(
            SQL_INSERT_LEDGER,
            (
                job_id,
                user_id,
                "refund",
                back_daily,
                back_balance,
                day,
                time.time(),
                "partial",
                None,
            ),
        )
    return True


def _refund(con: sqlite3.Connection, job_id: int, reason: str) -> bool:
    row = _settle(con, job_id, "refunded")
    if row is None:
        return False
    user_id, daily, balance, day, group_key = row
    _give_back(con, user_id, daily, balance, day, group_key)
    con.execute(
        SQL_INSERT_LEDGER,
        (job_id, user_id, "refund", daily, balance, day, time.time(), reason, None),
    )
    return True


def _give_back(
    con: sqlite3.Connection,
    user_id: int,
    daily: int,
    balance: int,
    day: str,
    group_key: str | None,
) -> None:
    # The daily part goes back to the reservation's day, the balance part to the balance and
    # the whole to the group's usage of that day: each to where the reservation took it from.
    if balance:
        con.execute("UPDATE users SET granted = granted + ? WHERE id = ?", (balance, user_id))
    if daily:
        con.execute(
            "UPDATE daily_usage SET used = used - ? WHERE user_id = ? AND day = ?",
            (daily, user_id, day),
        )
    if group_key and daily + balance:
        con.execute(
            "UPDATE group_usage SET used = used - ? WHERE group_key = ? AND day = ?",
            (daily + balance, group_key, day),
        )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        user_id=row["user_id"],
        platform=row["platform"],
        chat_id=row["chat_id"],
        group_key=row["group_key"],
        kind=row["kind"],
        prompt=row["prompt"],
        options=json.loads(row["options"]),
        ref_count=row["ref_count"],
        provider=row["provider"],
        own_key=bool(row["own_key"]),
        status=row["status"],
        error_kind=row["error_kind"],
        error_detail=row["error_detail"],
        cost=row["cost"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        usage=None if row["usage"] is None else json.loads(row["usage"]),
        revised_prompt=row["revised_prompt"],
        outputs=json.loads(row["outputs"]),
        ledger_state=row["ledger_state"],
        spent=row["spent"],
        charge=row["charge"],
    )


def console_overview_sql(con: sqlite3.Connection, since: float) -> dict[str, Any]:
    """`Store.console_overview` on a plain sqlite3 connection (bench/console.py times it raw).

    Every query reads the window through `jobs_created`; what a job spent is its commit row.
    """
    per_hour = []
    platforms: dict[str, dict[str, int]] = {}
    # Per hour and platform in one pass; the platform totals are its sums.
    for hour, platform, jobs, succeeded, failed in con.execute(
        """
        SELECT CAST(created_at / 3600 AS INTEGER) * 3600, platform, COUNT(*),
               SUM(status = 'succeeded'), SUM(status = 'failed')
        FROM jobs WHERE created_at >= ? GROUP BY 1, 2 ORDER BY 1
        """,
        (since,),
    ):
        per_hour.append((hour, platform, jobs))
        totals = platforms.setdefault(
            platform, {"jobs": 0, "succeeded": 0, "failed": 0, "spent": 0}
        )
        totals["jobs"] += jobs
        totals["succeeded"] += succeeded or 0
        totals["failed"] += failed or 0
    for platform, spent in con.execute(
        """
        SELECT j.platform, SUM(c.daily_amount + c.balance_amount)
        FROM jobs AS j JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
        WHERE j.created_at >= ? GROUP BY j.platform
        """,
        (since,),
    ):
        platforms.setdefault(platform, {"jobs": 0, "succeeded": 0, "failed": 0, "spent": 0})[
            "spent"
        ] = spent or 0
    durations = con.execute(
        """
        SELECT COALESCE(provider, '?'), COALESCE(json_extract(options, '$.size'), ''),
               finished_at - created_at
        FROM jobs
        WHERE created_at >= ? AND status = 'succeeded' AND finished_at IS NOT NULL
        """,
        (since,),
    ).fetchall()
    failures = con.execute(
        """
        SELECT COALESCE(error_kind, '?'), COUNT(*) FROM jobs
        WHERE created_at >= ? AND status = 'failed' GROUP BY 1 ORDER BY 2 DESC
        """,
        (since,),
    ).fetchall()
    # `+j.user_id`: grouping by the bare column makes SQLite walk all of jobs_user (every job
    # ever) to skip a sort, instead of the window through jobs_created.
    top_users = con.execute(
        """
        SELECT u.platform || ':' || u.platform_user_id
               || CASE WHEN u.name <> '' THEN ' (' || u.name || ')' ELSE '' END,
               t.jobs, t.spent
        FROM (
            SELECT +j.user_id AS user_id, COUNT(*) AS jobs,
                   SUM(COALESCE(c.daily_amount + c.balance_amount, 0)) AS spent
            FROM jobs AS j LEFT JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
            WHERE j.created_at >= ? GROUP BY 1 ORDER BY 2 DESC, 3 DESC LIMIT 10
        ) AS t JOIN users AS u ON u.id = t.user_id
        ORDER BY t.jobs DESC, t.spent DESC
        """,
        (since,),
    ).fetchall()
    top_groups = con.execute(
        """
        SELECT j.group_key, COUNT(*), SUM(COALESCE(c.daily_amount + c.balance_amount, 0))
        FROM jobs AS j LEFT JOIN ledger AS c ON c.job_id = j.id AND c.kind = 'commit'
        WHERE j.created_at >= ? AND j.group_key IS NOT NULL
        GROUP BY j.group_key ORDER BY 2 DESC, 3 DESC LIMIT 10
        """,
        (since,),
    ).fetchall()
    return {
        "per_hour": per_hour,
        "platforms": platforms,
        "durations": [tuple(row) for row in durations],
        "failures": {row[0]: row[1] for row in failures},
        "top_users": [tuple(row) for row in top_users],
        "top_groups": [tuple(row) for row in top_groups],
    }


def console_jobs_sql(
    con: sqlite3.Connection, filters: dict[str, str], limit: int, offset: int
) -> tuple[list[Job], int]:
    """`Store.console_jobs` on a plain sqlite3 connection (bench/console.py times it raw)."""
    where, params = _console_job_filters(filters)
    rows = con.execute(
        _JOB_SELECT + where + " ORDER BY j.id DESC LIMIT ? OFFSET ?", (*params, limit, offset)
    ).fetchall()
    count = con.execute("SELECT COUNT(*) FROM jobs AS j" + where, params).fetchall()
    return [_job(row) for row in rows], int(count[0][0])


def _console_job_filters(filters: dict[str, str]) -> tuple[str, tuple[Any, ...]]:
    """The console's job filters as a WHERE clause over `jobs AS j`."""
    clauses: list[str] = []
    params: list[Any] = []
    for name, column in (
        ("platform", "j.platform"),
        ("chat", "j.chat_id"),
        ("status", "j.status"),
        ("error_kind", "j.error_kind"),
        ("provider", "j.provider"),
    ):
        if value := filters.get(name, "").strip():
            clauses.append(f"{column} = ?")
            params.append(value)
    if user := filters.get("user", "").strip():
        if user.startswith("#") and user[1:].isdigit():
            clauses.append("j.user_id = ?")
            params.append(int(user[1:]))
        else:
            platform, sep, uid = user.partition(":")
            clauses.append(
                "j.user_id IN (SELECT id FROM users WHERE platform_user_id = ?"
                + (" AND platform = ?)" if sep else ")")
            )
            params.extend((uid, platform) if sep else (user,))
    for name, op in (("since", ">="), ("until", "<")):
        if value := filters.get(name, "").strip():
            clauses.append(f"j.created_at {op} ?")
            params.append(float(value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (trigger bodies keep their inner `;`)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in migration: {current.strip()[:60]!r}")
    return statements


def _prepare(con: sqlite3.Connection) -> None:
    # The pragmas first: journal_mode cannot change inside a transaction.
    for pragma in PRAGMAS:
        con.execute(pragma).fetchall()
    _in_transaction(con, _migrate)


def _migrate(con: sqlite3.Connection) -> None:
    # Run in one transaction for all pending migrations, version check included: two processes
    # starting at once cannot both apply the same script, and a failing script leaves the
    # file exactly as it was (DDL and user_version are transactional in SQLite).
    version: int = con.execute("PRAGMA user_version").fetchall()[0][0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this drawbridge "
            f"({len(MIGRATIONS)}); upgrade drawbridge"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in _statements(script):
            con.execute(statement)
        con.execute(f"PRAGMA user_version = {number:d}")
        log.info("applied database migration %d", number)
