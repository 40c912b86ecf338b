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
)

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
            dsn, min_size=min_size, max_size=max_size, command_timeout=60
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

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(await self._pool.fetch(numbered(sql), *params))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return _rowcount(await self._pool.execute(numbered(sql), *params))

    async def fetch_write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(await self._pool.fetch(numbered(sql), *params))

    async def transaction(self, rule: Rule[T]) -> T:
        async with self._pool.acquire() as con, con.transaction():
            return await rule(PostgresTx(con))

    async def session(self, rule: Rule[T]) -> T:
        async with self._pool.acquire() as con:
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
