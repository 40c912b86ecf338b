"""The SQLite engine: drawbridge's embedded default, one file in DRAWBRIDGE_DATA_DIR.

- One aiosqlite connection does all the work, on its one thread, which runs the trips queued
  to it one at a time and in order.
- Every read-then-write runs in `BEGIN IMMEDIATE ... COMMIT`: a DEFERRED transaction that
  reads and then writes fails with SQLITE_BUSY at once, ignoring `busy_timeout`, when another
  process holds the write lock.
- Each such transaction, BEGIN to COMMIT or ROLLBACK, runs as one synchronous call on the
  connection's thread (`engine.run_now`), in a single trip. Every call queued while a trip
  runs, reads included, goes in the next one, in order (group commit): consecutive writes in
  one transaction, each rule in a SAVEPOINT of its own (a single statement needs none: SQLite
  undoes a failed statement alone), so one that fails rolls back alone; reads outside any
  transaction. A burst of 500 commands costs a handful of trips and commits instead of
  thousands. Never start a transaction any other way (such as `BEGIN` through aiosqlite's own
  `execute`).
- WAL, so readers in other processes (backups, `sqlite3` at a shell) never block the bot.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bot.store.engine import Dialect, Ready, Row, Rule, Tx, run_now
from bot.store.migrations import SQLITE_MIGRATIONS
from bot.store.model import StoreError

log = logging.getLogger("bot.store")

T = TypeVar("T")

PRAGMAS = (
    # busy_timeout first: switching a new file to WAL needs its lock, which another process
    # opening (and migrating) the same file at that moment may hold.
    "PRAGMA busy_timeout = 5000",
    "PRAGMA journal_mode = WAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
)

DIALECT = Dialect(
    name="sqlite",
    json_member=lambda column, key: f"json_extract({column}, '$.{key}')",
    json_length=lambda column: f"json_array_length({column})",
    hour_of=lambda column: f"CAST({column} / 3600 AS INTEGER) * 3600",
    json_merge=lambda column, param: f"json_patch({column}, {param})",
    json_elements=lambda column, alias: f"json_each({column}) AS {alias}",
    json_ints="(SELECT value FROM json_each(?))",
    json_texts="(SELECT value FROM json_each(?))",
    json_int_pairs="(SELECT x.value AS a, y.value AS b"
    " FROM json_each(?) AS x JOIN json_each(?) AS y ON y.key = x.key)",
    for_update="",
)

MAX_BATCH = 256
"""Writes run together in one trip at most (a trip holds the write lock while it runs)."""


class SqliteTx:
    """`Tx` over the sqlite3 connection, on its thread: every result is ready at once."""

    __slots__ = ("con",)

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def fetch(self, sql: str, *params: Any) -> Ready:
        # fetchall, never fetchone: a RETURNING statement has done all its writes only once it
        # has run to its end, and COMMIT refuses while a write statement is still in progress.
        return Ready(self.con.execute(sql, params).fetchall())

    def execute(self, sql: str, *params: Any) -> Ready:
        return Ready(self.con.execute(sql, params).rowcount)

    def fetch_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Ready:
        return Ready([self.con.execute(sql, tuple(params)).fetchall() for params in rows])

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Ready:
        if rows:
            self.con.executemany(sql, rows)
        return Ready(None)

    def writes_many(self, *steps: tuple[str, Sequence[Sequence[Any]]]) -> Ready:
        for sql, rows in steps:
            if rows:
                self.con.executemany(sql, rows)
        return Ready(None)

    def writes(self, *statements: tuple[str, Sequence[Any]]) -> Ready:
        return Ready([self.con.execute(sql, tuple(params)).rowcount for sql, params in statements])


class _Pending:
    """A queued call: a `rule` to run in the batch's transaction, or (rule None) a function
    of the connection to run on its own, outside any transaction (a read, a session)."""

    __slots__ = ("fn", "future", "read", "rule", "single")

    def __init__(
        self,
        future: asyncio.Future[Any],
        rule: Rule[Any] | None = None,
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        read: tuple[str, tuple[Any, ...]] | None = None,
        single: bool = False,
    ) -> None:
        self.rule = rule
        # A rule of one statement, atomic by itself: it needs no savepoint (SQLite undoes a
        # failed statement alone, the transaction going on).
        self.single = single
        self.fn = fn
        # A read's statement and parameters: the same read queued again before any write
        # runs is answered from the first (a burst asks each user's credits several times).
        self.read = read
        self.future = future


class SqliteEngine:
    """Drawbridge's SQLite file (see the module docstring for the rules)."""

    dialect = DIALECT

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self.url = f"sqlite:///{path}"
        self._queue: list[_Pending] = []
        self._flushing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, migrate: bool = True) -> SqliteEngine:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the sqlite3 module must not open transactions behind our back;
        # every transaction here is an explicit BEGIN IMMEDIATE.
        db = await aiosqlite.connect(path, isolation_level=None)
        engine = cls(db, path)
        try:
            db.row_factory = aiosqlite.Row
            await engine.call(_pragmas)
            if migrate:
                await engine.migrate()
            else:
                await engine.check_version()
        except BaseException:
            await db.close()
            raise
        return engine

    # --- the Engine port ---

    # Every call is queued, reads too: the next trip runs all that was queued by then, in
    # order, so 500 commands arriving together cost a handful of trips instead of thousands.

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        # One statement outside any transaction: consistent by itself.
        key = (sql, tuple(params))
        rows: list[Row] = await self._queued(
            fn=partial(_fetchall, sql=sql, params=key[1]), read=key
        )
        return list(rows)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        # A single statement is atomic on its own: it joins the batch's transaction in a
        # savepoint of its own, like a rule.
        changed: int = await self._queued(
            rule=partial(_tx_execute, sql=sql, params=tuple(params)), single=True
        )
        return changed

    async def fetch_write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows: list[Row] = await self._queued(
            rule=partial(_tx_fetch, sql=sql, params=tuple(params)), single=True
        )
        return rows

    async def transaction(self, rule: Rule[T]) -> T:
        """Queue `rule`; the next trip runs it with every other write queued by then."""
        result: T = await self._queued(rule=rule)
        return result

    async def session(self, rule: Rule[T]) -> T:
        result: T = await self._queued(fn=lambda con: run_now(rule(SqliteTx(con))))
        return result

    async def schema_version(self) -> int:
        rows = await self.read("PRAGMA user_version")
        return int(rows[0][0])

    async def check_version(self) -> int:
        version = await self.schema_version()
        if version > len(SQLITE_MIGRATIONS):
            raise StoreError(
                f"database schema version {version} is newer than this drawbridge "
                f"({len(SQLITE_MIGRATIONS)}); upgrade drawbridge"
            )
        return version

    async def migrate(self) -> list[int]:
        return await self.call(lambda con: _in_transaction(con, _migrate))

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    async def close(self) -> None:
        while self._flushing is not None:
            await asyncio.shield(self._flushing)
        # Reads and single writes already queued run first: the thread takes trips in order.
        await self._db.close()

    # --- internals ---

    async def _queued(
        self,
        *,
        rule: Rule[Any] | None = None,
        fn: Callable[[sqlite3.Connection], Any] | None = None,
        read: tuple[str, tuple[Any, ...]] | None = None,
        single: bool = False,
    ) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(future, rule, fn, read, single))
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    outcomes = await self.call(partial(_run_batch, batch=batch))
                except BaseException as error:  # the trip itself failed (closed, I/O)
                    outcomes = [(False, error)] * len(batch)
                for pending, (ok, value) in zip(batch, outcomes, strict=True):
                    if pending.future.done():
                        continue
                    if ok:
                        pending.future.set_result(value)
                    else:
                        pending.future.set_exception(value)
        finally:
            self._flushing = None

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread, in one hand-off whatever it does.

        aiosqlite makes every statement its own trip to that thread, and each trip (a thread
        wake-up and a loop wake-up) costs far more than the SQL. `Connection._execute` is
        aiosqlite's private, long-stable way to queue a callable onto its thread (its own
        `execute`, `commit` and `close` are built on it) and `_conn` is the sqlite3 connection
        that thread owns; this is the one place that touches either. Every store test comes
        through here (open() does), so an aiosqlite release that changes them fails at once.
        """
        result: T = await self._db._execute(fn, self._db._conn)  # type: ignore[no-untyped-call]
        return result


def _fetchall(con: sqlite3.Connection, *, sql: str, params: tuple[Any, ...]) -> list[Row]:
    return con.execute(sql, params).fetchall()


async def _tx_execute(tx: Tx, *, sql: str, params: tuple[Any, ...]) -> int:
    return await tx.execute(sql, *params)


async def _tx_fetch(tx: Tx, *, sql: str, params: tuple[Any, ...]) -> list[Row]:
    return await tx.fetch(sql, *params)


def _run_batch(con: sqlite3.Connection, *, batch: list[_Pending]) -> list[tuple[bool, Any]]:
    """Run a trip's queued calls in order (on the thread): each run of consecutive rules in
    one transaction, each rule in its own savepoint; the other calls on their own."""
    outcomes: list[tuple[bool, Any]] = []
    reads: dict[tuple[str, tuple[Any, ...]], tuple[bool, Any]] = {}
    start = 0
    while start < len(batch):
        end = start
        while end < len(batch) and batch[end].rule is not None:
            end += 1
        if end > start:
            reads.clear()
            try:
                outcomes += _run_rules(con, batch[start:end])
            except Exception as error:  # BEGIN IMMEDIATE refused (busy past busy_timeout)
                outcomes += [(False, error)] * (end - start)
            start = end
            continue
        pending = batch[start]
        start += 1
        if pending.read is not None and pending.read in reads:
            outcomes.append(reads[pending.read])
            continue
        if pending.read is None:
            reads.clear()  # a session may write
        assert pending.fn is not None
        try:
            outcome: tuple[bool, Any] = (True, pending.fn(con))
        except Exception as error:
            outcome = (False, error)
        if pending.read is not None:
            reads[pending.read] = outcome
        outcomes.append(outcome)
    return outcomes


def _run_rules(con: sqlite3.Connection, batch: list[_Pending]) -> list[tuple[bool, Any]]:
    """Run queued rules in one transaction, each in its own savepoint."""
    if len(batch) == 1:
        rule = batch[0].rule
        assert rule is not None
        try:
            if batch[0].single:
                return [(True, run_now(rule(SqliteTx(con))))]
            return [(True, _in_transaction(con, lambda c: run_now(rule(SqliteTx(c)))))]
        except Exception as error:
            return [(False, error)]
    outcomes: list[tuple[bool, Any]] = []
    con.execute("BEGIN IMMEDIATE")
    try:
        for pending in batch:
            if pending.single:
                assert pending.rule is not None
                try:
                    outcomes.append((True, run_now(pending.rule(SqliteTx(con)))))
                except Exception as error:
                    if not con.in_transaction:
                        # SQLite gave the whole transaction up (a full disk, an I/O error):
                        # nothing of the batch was written.
                        return [(False, error)] * len(batch)
                    outcomes.append((False, error))
                continue
            con.execute("SAVEPOINT rule")
            try:
                assert pending.rule is not None
                value = run_now(pending.rule(SqliteTx(con)))
            except Exception as error:
                con.execute("ROLLBACK TO rule")
                con.execute("RELEASE rule")
                outcomes.append((False, error))
            else:
                con.execute("RELEASE rule")
                outcomes.append((True, value))
        con.execute("COMMIT")
    except BaseException as error:
        # COMMIT itself failed (disk full, I/O): nothing of the batch was written.
        if con.in_transaction:
            con.execute("ROLLBACK")
        return [(False, error)] * len(batch)
    return outcomes


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


def is_transient(error: BaseException) -> bool:
    """The file locked by another writer past busy_timeout, a full disk, an I/O error."""
    return isinstance(error, sqlite3.OperationalError)


PRAGMA_RETRY_SECONDS = 5.0
"""How long opening keeps asking for a file another process is switching to WAL."""


def _pragmas(con: sqlite3.Connection) -> None:
    # journal_mode cannot change inside a transaction. Switching a new file to WAL while
    # another process does the same can fail "database is locked" at once, busy_timeout or
    # not (SQLite does not wait where waiting could deadlock): ask again for a while.
    deadline = time.monotonic() + PRAGMA_RETRY_SECONDS
    for pragma in PRAGMAS:
        while True:
            try:
                con.execute(pragma).fetchall()
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def statements(script: str) -> list[str]:
    """Split a migration script into statements (trigger bodies keep their inner `;`)."""
    found: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            found.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in migration: {current.strip()[:60]!r}")
    return found


def _migrate(con: sqlite3.Connection) -> list[int]:
    # One transaction for all pending migrations, version check included: two processes
    # starting at once cannot both apply the same script, and a failing script leaves the
    # file exactly as it was (DDL and user_version are transactional in SQLite).
    version: int = con.execute("PRAGMA user_version").fetchall()[0][0]
    if version > len(SQLITE_MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this drawbridge "
            f"({len(SQLITE_MIGRATIONS)}); upgrade drawbridge"
        )
    applied = []
    for number, script in enumerate(SQLITE_MIGRATIONS[version:], start=version + 1):
        for statement in statements(script):
            con.execute(statement)
        con.execute(f"PRAGMA user_version = {number:d}")
        log.info("applied database migration %d", number)
        applied.append(number)
    return applied
