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
from bot.store.sql import (
    SQL_FINISH_JOB,
    SQL_INSERT_JOB,
    SQL_MAKE_USER,
    SQL_MARK_CHARGE,
    SQL_MARK_RUNNING,
    SQL_RELEASE_SLOT,
)

log = logging.getLogger("bot.store")

T = TypeVar("T")

# SQLSTATEs `drawbridge_reserve` raises when a guard refuses after a write (migration 11).
_REFUSALS = {"DBR01": "insufficient", "DBR02": "group_cap"}


def _reserve_refused(error: BaseException) -> tuple[str, int | None, str | None] | None:
    if not isinstance(error, asyncpg.PostgresError):
        return None
    outcome = _REFUSALS.get(getattr(error, "sqlstate", None) or "")
    if outcome is None:
        return None
    return outcome, int(getattr(error, "detail", None) or 0), None


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
    json_ints="(SELECT value::bigint FROM json_array_elements_text(?::json))",
    json_texts="(SELECT value FROM json_array_elements_text(?::json))",
    json_int_pairs="(SELECT x.a::bigint AS a, y.b::bigint AS b"
    " FROM json_array_elements_text(?::json) WITH ORDINALITY AS x(a, k)"
    " JOIN json_array_elements_text(?::json) WITH ORDINALITY AS y(b, k) ON y.k = x.k)",
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
    # One round trip, no BEGIN/COMMIT around it: a function call is atomic by itself.
    reserve_call="SELECT outcome, number, detail"
    " FROM drawbridge_reserve($1, $2, $3, $4, $5, $6, $7, $8)",
    reserve_refused=_reserve_refused,
    # Migration 13; one round trip for a burst's batch of commands instead of seven.
    open_many_call="SELECT n, job_id, outcome, number, detail FROM drawbridge_open_many("
    + ", ".join(f"${k}" for k in range(1, 19))
    + ")",
    # A burst of 500 decided in one call: in batches of 256 the last commands waited for a
    # second call behind the first (the same accounts' rows), ~35 ms more.
    reserve_batch=1024,
)


def _job_update(columns: str, assignments: str, *, active_only: bool) -> str:
    """The batched form of `UPDATE jobs SET ... WHERE id = ?` (the id the last parameter):
    `columns` are the other parameters' names and types, in order; one row back per job
    changed."""
    names = [column.split()[0] for column in columns.split(", ")]
    types = [column.split(maxsplit=1)[1] for column in columns.split(", ")]
    arrays = ", ".join(f"${k}::{kind}[]" for k, kind in enumerate([*types, "bigint"], start=1))
    active = " AND j.status IN ('queued', 'running')" if active_only else ""
    return f"""
        WITH i AS (
            SELECT * FROM unnest({arrays}) WITH ORDINALITY AS i({", ".join(names)}, id, n)
        ), locked AS (
            SELECT id FROM jobs WHERE id IN (SELECT id FROM i) ORDER BY id FOR NO KEY UPDATE
        )
        UPDATE jobs AS j SET {assignments}
        FROM i
        WHERE j.id = i.id AND j.id IN (SELECT id FROM locked){active}
        RETURNING i.n, 1
    """


# Statements the engine runs for many calls at once (see `PostgresEngine.fetch_write`): each
# one's form over arrays, one array per parameter, whose rows start with the 1-based ordinal of
# the call they belong to. Their rows are the same as the statement's own, call by call.
BATCHED: dict[str, str] = {
    SQL_INSERT_JOB: """
        WITH input AS (
            SELECT i.*, nextval(pg_get_serial_sequence('jobs', 'id')) AS id
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::text[], $8::integer[], $9::integer[],
                        $10::double precision[], $11::text[])
                 WITH ORDINALITY AS i(user_id, platform, chat_id, group_key, kind, prompt,
                                      options, ref_count, own_key, created_at, process_id, n)
        ), inserted AS (
            INSERT INTO jobs (id, user_id, platform, chat_id, group_key, kind, prompt, options,
                              ref_count, own_key, created_at, process_id)
            SELECT id, user_id, platform, chat_id, group_key, kind, prompt, options, ref_count,
                   own_key, created_at, process_id
            FROM input ORDER BY n
        )
        SELECT n, id FROM input
    """,
    DIALECT.commit_whole or "": """
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::double precision[], $4::text[])
                 WITH ORDINALITY AS i(job_id, amount, created_at, note, n)
        ), locked AS (
            -- In job order: two batches settling the same jobs (a retried commit) take
            -- their rows in one order, so neither holds one the other waits for.
            SELECT job_id FROM reservations
            WHERE job_id IN (SELECT job_id FROM input) AND state = 'reserved'
            ORDER BY job_id FOR NO KEY UPDATE
        ), settled AS (
            UPDATE reservations AS r SET state = 'committed'
            FROM input
            WHERE r.job_id = input.job_id AND r.state = 'reserved'
              AND r.job_id IN (SELECT job_id FROM locked)
              AND (input.amount IS NULL OR r.daily_amount + r.balance_amount = input.amount)
            RETURNING input.n, r.job_id, r.user_id, r.daily_amount, r.balance_amount, r.day,
                      input.created_at, input.note
        ), written AS (
            INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day,
                                created_at, note, by_user_id)
            SELECT job_id, user_id, 'commit', daily_amount, balance_amount, day, created_at,
                   note, NULL
            FROM settled
        )
        SELECT n, 1 FROM settled
    """,
    # A job's row through its life: each update locks its rows in id order first, so two
    # batches touching the same jobs (a job's charge and its upstream time, written side by
    # side) never hold one the other waits for.
    SQL_MARK_RUNNING: _job_update(
        "provider text, started_at double precision",
        "status = 'running', provider = i.provider,"
        " started_at = COALESCE(j.started_at, i.started_at)",
        active_only=True,
    ),
    SQL_MARK_CHARGE: _job_update(
        "charge integer, upstream_done_at double precision, eta_class text",
        "charge = i.charge,"
        " upstream_done_at = COALESCE(i.upstream_done_at, j.upstream_done_at),"
        " eta_class = COALESCE(i.eta_class, j.eta_class)",
        active_only=True,
    ),
    SQL_FINISH_JOB: _job_update(
        "status text, error_kind text, error_detail text, usage text, revised_prompt text,"
        " outputs text, provider text, finished_at double precision",
        "status = i.status, error_kind = i.error_kind, error_detail = i.error_detail,"
        " usage = i.usage, revised_prompt = i.revised_prompt, outputs = i.outputs,"
        " provider = COALESCE(i.provider, j.provider), finished_at = i.finished_at",
        active_only=True,
    ),
    SQL_RELEASE_SLOT: """
        DELETE FROM provider_slots AS s
        USING unnest($1::text[], $2::integer[], $3::text[])
              WITH ORDINALITY AS i(provider, slot, process_id, n)
        WHERE s.provider = i.provider AND s.slot = i.slot AND s.process_id = i.process_id
        RETURNING i.n, 1
    """,
}
# Statements `Tx.execute_many` runs for many rows as one statement over arrays (one array per
# parameter) instead of one execution per row: a burst's new users in one upsert.
MANY: dict[str, str] = {
    # Rows unique by (platform, platform_user_id): one statement may not upsert a row twice.
    SQL_MAKE_USER: """
        INSERT INTO users (platform, platform_user_id, name, created_at)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::double precision[])
        ON CONFLICT (platform, platform_user_id) DO UPDATE
        SET name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE users.name END
    """,
}

COUNTED = frozenset({SQL_MARK_RUNNING, SQL_MARK_CHARGE, SQL_FINISH_JOB, SQL_RELEASE_SLOT})
"""BATCHED statements run through `execute`: the rows their batched form returns count the
rows each call changed (a lone call runs the plain statement and counts its own)."""
POOL_SIZE = 10
"""Connections one process's pool holds at most."""
BATCHES_IN_FLIGHT = 2
"""Batches of one statement running at once; calls made meanwhile wait for the next one."""
BATCH_SIZE = 256


CALL_TIMEOUT = 60.0
"""Seconds one store call (a statement, or a whole transaction) may take."""

# Two processes starting at once take turns to migrate (pg_advisory_xact_lock's key).
MIGRATION_LOCK = 0x64726177  # "draw"

_PLACEHOLDER = re.compile(r"\?(\d*)|'(?:[^']|'')*'")


@lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$n` (string literals left alone)."""
    return _renumbered(sql, 0)


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


@lru_cache(maxsize=64)
def _renumbered(sql: str, offset: int) -> str:
    """`?` as `$offset+1, $offset+2, ...` and `?N` as `$offset+N` (string literals left alone)."""
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

    async def fetch_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[list[Row]]:
        if sql not in BATCHED or len(rows) < 2:
            return [await self.fetch(sql, *params) for params in rows]
        results: list[list[Row]] = [[] for _ in rows]
        columns = [list(column) for column in zip(*rows, strict=True)]
        for row in await self.con.fetch(BATCHED[sql], *columns):
            results[row[0] - 1].append(tuple(row)[1:])
        return results

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        many = MANY.get(sql)
        if many is None or len(rows) == 1:
            await self.con.executemany(numbered(sql), rows)
        else:
            await self.con.execute(many, *(list(column) for column in zip(*rows, strict=True)))

    async def writes_many(self, *steps: tuple[str, Sequence[Sequence[Any]]]) -> None:
        # `ledger.reserve_many`'s writes, which only SQLite runs: a batch of reservations is
        # one server-side call here (`Dialect.open_many_call`).
        for sql, rows in steps:
            await self.execute_many(sql, rows)

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
        # BATCHED statements: the calls waiting for a batch, and the batches running.
        self._waiting: dict[str, list[tuple[Sequence[Any], asyncio.Future[list[Row]]]]] = {}
        self._batches: dict[str, int] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        migrate: bool = True,
        min_size: int = 2,
        max_size: int = POOL_SIZE,
        full: bool = False,
    ) -> PostgresEngine:
        """A pool of `min_size` connections growing to `max_size`; `full` opens them all now
        (a running bot: a burst's first statements then wait for no connect, each ~3 ms of
        round trips and a codec lookup, `_warm`)."""
        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        if full:
            min_size = max_size
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, reset=_keep_session, init=_warm
        )
        engine = cls(pool, url)
        try:
            if migrate:
                if await engine.migrate():
                    await engine._warm_all()
            else:
                await engine.check_version()
        except BaseException:
            await pool.close()
            raise
        return engine

    async def _warm_all(self) -> None:
        """`_warm` every pooled connection again (the schema changed since they were made)."""
        held = [await self._pool.acquire() for _ in range(self._pool.get_size())]
        try:
            for con in held:
                await _warm(con)
        finally:
            for con in held:
                await self._pool.release(con)

    # Every call has one deadline, CALL_TIMEOUT, for all its statements: asyncpg's own
    # `command_timeout` arms and cancels a timer for each statement, about a tenth of the
    # client's work under load.

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with asyncio.timeout(CALL_TIMEOUT):
            return list(await self._pool.fetch(numbered(sql), *params))

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        if sql in BATCHED:
            # The rows it changed: one row back per row changed.
            return len(await self._batched(sql, params))
        async with asyncio.timeout(CALL_TIMEOUT):
            return _rowcount(await self._pool.execute(numbered(sql), *params))

    async def fetch_write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if sql in BATCHED:
            return await self._batched(sql, params)
        async with asyncio.timeout(CALL_TIMEOUT):
            return list(await self._pool.fetch(numbered(sql), *params))

    # A BATCHED statement's calls share round trips: a call joins the calls waiting for a
    # batch, and a batch starts at once unless BATCHES_IN_FLIGHT are running already, when
    # the first to finish takes the waiting calls. So calls made together (one loop iteration,
    # or while a batch is on the wire) cost one statement, one commit and one round trip, and
    # a lone call costs what it did alone. A batch that fails is run again call by call, so a
    # call's error is its own, as if it had run alone.

    async def _batched(self, sql: str, params: Sequence[Any]) -> list[Row]:
        done: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(sql, []).append((params, done))
        if self._batches.get(sql, 0) < BATCHES_IN_FLIGHT:
            self._batches[sql] = self._batches.get(sql, 0) + 1
            task = asyncio.get_running_loop().create_task(self._run_batches(sql))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
        async with asyncio.timeout(CALL_TIMEOUT):
            return await done

    async def _run_batches(self, sql: str) -> None:
        try:
            while waiting := self._waiting.get(sql):
                calls = [call for call in waiting[:BATCH_SIZE] if not call[1].done()]
                del waiting[:BATCH_SIZE]
                if calls:
                    await self._run_batch(sql, calls)
        finally:
            self._batches[sql] -= 1

    async def _run_batch(
        self, sql: str, calls: list[tuple[Sequence[Any], asyncio.Future[list[Row]]]]
    ) -> None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                if len(calls) == 1 and sql in COUNTED:
                    # Alone: the plain statement (no arrays to unpack, no lock step).
                    changed = _rowcount(await self._pool.execute(numbered(sql), *calls[0][0]))
                    results = [[(1,)] * changed]
                elif len(calls) == 1:
                    results = [list(await self._pool.fetch(numbered(sql), *calls[0][0]))]
                else:
                    columns = [list(column) for column in zip(*(p for p, _ in calls), strict=True)]
                    results = [[] for _ in calls]
                    for row in await self._pool.fetch(BATCHED[sql], *columns):
                        results[row[0] - 1].append(tuple(row)[1:])
        except Exception as error:
            if len(calls) > 1:
                for call in calls:
                    await self._run_batch(sql, [call])
            elif not calls[0][1].done():
                calls[0][1].set_exception(error)
            return
        except BaseException:
            # Cancelled (the loop closing): its callers must not wait for it.
            for _, done in calls:
                done.cancel()
            raise
        for (_, done), rows in zip(calls, results, strict=True):
            if not done.done():
                done.set_result(rows)

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
        if self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        await self._pool.close()


def _array_types(*texts: str) -> tuple[str, ...]:
    """The array types (`$n::bigint[]`) these statements bind, each once."""
    return tuple(sorted(set(re.findall(r"::([a-z][a-z ]*?)\[\]", " ".join(texts)))))


WARM_CODECS = "SELECT " + ", ".join(
    f"${n}::{name}[]"
    for n, name in enumerate(_array_types(*BATCHED.values(), *MANY.values()), start=1)
)
"""One statement binding every array type the batched statements use (see `_warm`)."""


EMPTY_BATCH: tuple[Any, ...] = ([],) * 7 + (0.0,) + ([],) * 10
"""`open_many_call`'s parameters for no ask at all: it writes nothing."""


async def _warm(con: asyncpg.Connection) -> None:
    """Each new connection learns what a burst's first statements need before it is lent.

    asyncpg looks up a type it has no codec for with a query of its own (the pg_type
    catalogue), once per connection and type: 8 ms for the first array type, 3-4 ms for each
    after it, paid by the first statement using them, which is a burst's first batch of jobs
    and charges. Preparing one statement that binds them all pays that once, in one lookup.
    And the server compiles a PL/pgSQL function, and plans its statements, at its first call
    in each session: `drawbridge_open_many` (migration 13) costs ~4 ms more there than after.
    Called for no ask, it writes nothing. Both when the connection is made (at start, for the
    pool's first connections) or, for a schema that had no such function yet, after
    migrating (`PostgresEngine.open`)."""
    await con.prepare(WARM_CODECS)
    if await con.fetchval("SELECT to_regproc('drawbridge_open_many') IS NOT NULL"):
        assert DIALECT.open_many_call is not None
        await con.fetch(DIALECT.open_many_call, *EMPTY_BATCH)


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
