"""The PostgreSQL engine (asyncpg): one database for several drawbridge processes.

Selected by `DRAWBRIDGE_DATABASE_URL=postgresql://user:pass@host/db`. Every rule runs in one
READ COMMITTED transaction on one pooled connection; rules lock the rows they decide on
(`Dialect.for_update`), and credits move only through guarded statements whose row counts
are checked, so reservations stay exact however many processes write at once.

The statements are the shared ones, written with `?`: they are numbered `$1, $2, ...` here
(`?N` keeps its number) once per statement text, and asyncpg prepares and caches each.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg

from bot.store.engine import Dialect, Row, Rule
from bot.store.migrations import POSTGRES_MIGRATIONS
from bot.store.model import StoreError

log = logging.getLogger("bot.store")

T = TypeVar("T")

DIALECT = Dialect(
    name="postgresql",
    json_member=lambda column, key: f"({column}::jsonb ->> '{key}')",
    json_length=lambda column: f"json_array_length({column}::json)",
    hour_of=lambda column: f"(FLOOR({column} / 3600) * 3600)::BIGINT",
    json_merge=lambda column, param: f"jsonb_strip_nulls({column}::jsonb || {param}::jsonb)::text",
    json_elements=lambda column, alias: f"json_array_elements({column}::json) AS {alias}(value)",
    # NO KEY UPDATE, not UPDATE: it serializes writers of the row just the same, but leaves
    # alone the KEY SHARE locks that inserting a ledger or reservation row takes on the
    # users row it refers to. With FOR UPDATE, a refund holding daily_usage and inserting its
    # ledger row would wait for a reservation holding the account, which waits for that
    # daily_usage row: a deadlock.
    for_update=" FOR NO KEY UPDATE",
    commit_whole="""
        WITH settled AS (
            UPDATE reservations SET state = 'committed'
            WHERE job_id = $1 AND state = 'reserved'
              AND ($2::bigint IS NULL OR daily_amount + balance_amount = $2::bigint)
            RETURNING user_id, daily_amount, balance_amount, day
        )
        INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day,
                            created_at, note, by_user_id)
        SELECT $1, user_id, 'commit', daily_amount, balance_amount, day, $3, $4, NULL
        FROM settled
        RETURNING 1
    """,
)

CALL_TIMEOUT = 60.0
"""Seconds one store call (a statement, or a whole transaction) may take."""

# Two processes starting at once take turns to migrate (pg_advisory_xact_lock's key).
MIGRATION_LOCK = 0x64726177  # "draw"

_PLACEHOLDER = re.compile(r"\?(\d*)|'(?:[^']|'')*'")


@lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$n` (string literals left alone)."""
    counter = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal counter
        if match.group(0).startswith("'"):
            return match.group(0)
        if match.group(1):
            return "$" + match.group(1)
        counter += 1
        return f"${counter}"

    return _PLACEHOLDER.sub(replace, sql)


@lru_cache(maxsize=256)
def fused(statements: tuple[tuple[str, int], ...]) -> str:
    """Write statements (each with its number of parameters) as one statement that runs them
    all and returns each one's row count: `WITH w0 AS (... RETURNING 1), ... SELECT ...`.

    Parameters follow on: the second statement's `?` (or `?1`) is the first one's last + 1.
    """
    parts = []
    offset = 0
    for index, (sql, count) in enumerate(statements):
        parts.append(f"w{index} AS ({_renumbered(sql.strip(), offset)} RETURNING 1)")
        offset += count
    counts = ", ".join(f"(SELECT COUNT(*) FROM w{index})" for index in range(len(statements)))
    return "WITH " + ",\n".join(parts) + "\nSELECT " + counts


def _renumbered(sql: str, offset: int) -> str:
    counter = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal counter
        if match.group(0).startswith("'"):
            return match.group(0)
        if match.group(1):
            return f"${offset + int(match.group(1))}"
        counter += 1
        return f"${offset + counter}"

    return _PLACEHOLDER.sub(replace, sql)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag: "UPDATE 1", "INSERT 0 1", "DELETE 3".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresTx:
    """`Tx` over one asyncpg connection."""

    __slots__ = ("con",)

    def __init__(self, con: asyncpg.Connection) -> None:
        self.con = con

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return list(await self.con.fetch(numbered(sql), *params))

    async def execute(self, sql: str, *params: Any) -> int:
        return _rowcount(await self.con.execute(numbered(sql), *params))

    async def writes(self, *statements: tuple[str, Sequence[Any]]) -> list[int]:
        if len(statements) == 1:
            return [await self.execute(statements[0][0], *statements[0][1])]
        sql = fused(tuple((text, len(params)) for text, params in statements))
        row = await self.con.fetchrow(sql, *(value for _, params in statements for value in params))
        return [int(count) for count in row] if row is not None else []


class PostgresEngine:
    """A PostgreSQL database through an asyncpg pool."""

    dialect = DIALECT

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self.url = url

    @classmethod
    async def open(
        cls, url: str, *, migrate: bool = True, min_size: int = 2, max_size: int = 10
    ) -> PostgresEngine:
        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, reset=_keep_session
        )
        engine = cls(pool, url)
        try:
            if migrate:
                await engine.migrate()
            else:
                await engine.check_version()
        except BaseException:
            await pool.close()
            raise
        return engine

    # Every call has one deadline, CALL_TIMEOUT, for all its statements: asyncpg's own
    # `command_timeout` arms and cancels a timer for each statement, about a tenth of the
    # client's work under load.

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with asyncio.timeout(CALL_TIMEOUT):
            return list(await self._pool.fetch(numbered(sql), *params))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with asyncio.timeout(CALL_TIMEOUT):
            return _rowcount(await self._pool.execute(numbered(sql), *params))

    async def fetch_write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with asyncio.timeout(CALL_TIMEOUT):
            return list(await self._pool.fetch(numbered(sql), *params))

    async def transaction(self, rule: Rule[T]) -> T:
        async with (
            asyncio.timeout(CALL_TIMEOUT),
            self._pool.acquire() as con,
            con.transaction(),
        ):
            return await rule(PostgresTx(con))

    async def session(self, rule: Rule[T]) -> T:
        async with asyncio.timeout(CALL_TIMEOUT), self._pool.acquire() as con:
            return await rule(PostgresTx(con))

    async def schema_version(self) -> int:
        async with self._pool.acquire() as con:
            return await _version(con)

    async def check_version(self) -> int:
        version = await self.schema_version()
        if version > len(POSTGRES_MIGRATIONS):
            raise StoreError(
                f"database schema version {version} is newer than this drawbridge "
                f"({len(POSTGRES_MIGRATIONS)}); upgrade drawbridge"
            )
        return version

    async def migrate(self) -> list[int]:
        # One transaction for all pending migrations (PostgreSQL's DDL is transactional),
        # under an advisory lock so two processes starting at once do not both apply one.
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            version = await _version(con)
            if version > len(POSTGRES_MIGRATIONS):
                raise StoreError(
                    f"database schema version {version} is newer than this drawbridge "
                    f"({len(POSTGRES_MIGRATIONS)}); upgrade drawbridge"
                )
            applied = []
            for number, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
                await con.execute(script)
                applied.append(number)
                log.info("applied database migration %d", number)
            if applied:
                await con.execute("DELETE FROM schema_version")
                await con.execute("INSERT INTO schema_version VALUES ($1)", applied[-1])
            return applied

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    async def close(self) -> None:
        await self._pool.close()


async def _keep_session(con: asyncpg.Connection) -> None:
    """The pool's reset between two borrowers: nothing beyond asyncpg's own rollback of a
    transaction left open. Its default (`RESET ALL`, `UNLISTEN *`, unlocking session advisory
    locks...) is one more round trip on every release, doubling what a one-statement call
    costs, to clear session state the store never sets: it uses transaction-level locks only,
    and no LISTEN, SET or cursors."""


async def _version(con: asyncpg.Connection) -> int:
    exists = await con.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    value = await con.fetchval("SELECT MAX(version) FROM schema_version")
    return int(value or 0)


def is_transient(error: BaseException) -> bool:
    """A lost or refused connection, a deadlock or serialization failure, a timeout."""
    return isinstance(
        error,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.DeadlockDetectedError
        | asyncpg.SerializationError
        | asyncpg.TooManyConnectionsError
        | asyncpg.CannotConnectNowError
        | asyncio.TimeoutError
        | OSError,
    )
