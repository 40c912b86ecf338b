"""What the store needs of a database engine, and how one set of rules runs on two engines.

The store's rules (reserve, commit, refund, link, recovery...) are written once, as
`async def rule(tx, ...)` functions that talk to the database only through `Tx.fetch` and
`Tx.execute`, with `?` placeholders. Each engine runs them its own way:

- PostgreSQL (asyncpg) awaits each statement on one pooled connection inside one transaction;
- SQLite runs the whole rule synchronously, BEGIN to COMMIT, in one trip to the connection's
  thread (`run_now`): its `Tx` hands back statements' results as already-finished awaitables,
  so the rule's coroutine never suspends and completes within one `send(None)`. A trip costs
  far more than the SQL, and nothing else can run on that thread in the middle of one, so
  statements of two tasks never interleave inside a transaction.

So both engines share every read-then-write decision; they differ only in connections,
transactions, the schema's DDL and the few SQL functions named in `Dialect`. One exception:
PostgreSQL runs a lone reservation as `drawbridge_reserve`, a server-side copy of
`ledger.reserve` (`Dialect.reserve_call`), because there a round trip costs more than the
rule's SQL does; and for the same reason a batch of reservations asked together (with the
new jobs they are for) as `drawbridge_open_many` (`Dialect.open_many_call`), a server-side copy
of `ledger.reserve_many`, which SQLite runs in one transaction. The store tests check all of
them decide alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

Row = Any
"""A result row: `sqlite3.Row` or `asyncpg.Record`. Both index by position and by column
name, have `keys()`, and turn into a dict with `dict(row)`."""


class Tx(Protocol):
    """One open transaction (or, for `Engine.session`, one connection in autocommit)."""

    def fetch(self, sql: str, *params: Any) -> Awaitable[list[Row]]:
        """Run a statement and return all its rows (RETURNING rows for a write)."""
        ...

    def execute(self, sql: str, *params: Any) -> Awaitable[int]:
        """Run a write statement; returns how many rows it changed."""
        ...

    def fetch_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Awaitable[list[list[Row]]]:
        """`fetch` once per row of parameters (a RETURNING write), as one step where the
        engine can (PostgreSQL's BATCHED forms); each row's result, in order."""
        ...

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> Awaitable[None]:
        """Run one write statement once per row of parameters, in one step (nothing when
        there are no rows). No row counts: for writes whose rows the rule has locked."""
        ...

    def writes_many(self, *steps: tuple[str, Sequence[Sequence[Any]]]) -> Awaitable[None]:
        """`execute_many` for each `(statement, rows)`, in order, as one step: PostgreSQL
        sends them in one round trip where it has each one's many-row form, as one statement
        of data-modifying CTEs (each sees the database as it was before the step, so no two
        may touch the same row)."""
        ...

    def writes(self, *statements: tuple[str, Sequence[Any]]) -> Awaitable[list[int]]:
        """Run these write statements (no RETURNING) as one step; how many rows each changed.

        PostgreSQL sends them in one round trip, as one statement of data-modifying CTEs: each
        sees the database as it was before the step, none another's effect, and no two may
        touch the same row. Where the caller raises on a row count, the transaction rolls back
        with every write of the step.
        """
        ...


Rule = Callable[[Tx], Coroutine[Any, Any, T]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """The SQL that differs between the engines, as fragments the shared statements use."""

    name: str
    # A JSON text column's top-level string member: `json_member("options", "size")`.
    json_member: Callable[[str, str], str]
    # The length of a JSON array held in a text column.
    json_length: Callable[[str], str]
    # The unix-seconds column's hour, as unix seconds of the hour's start.
    hour_of: Callable[[str], str]
    # Merge a JSON object parameter into a JSON text column, dropping members set to null.
    json_merge: Callable[[str, str], str]
    # The elements of a JSON array held in a text column, as a FROM item named `alias` whose
    # column `value` is each element: `json_elements("j.outputs", "o")`, then
    # `json_member("o.value", "width")`.
    json_elements: Callable[[str, str], str]
    # The values of a JSON array parameter, as a subquery for `IN`: `id IN {json_ints}`
    # with `json.dumps([1, 2])` as its parameter (one statement text however many values).
    json_ints: str
    json_texts: str
    # Two JSON arrays of integers (parameters, in this order) paired by position, as a FROM
    # item with columns `a` and `b` (a null element is NULL): one statement text for any
    # number of pairs, so a batch of any size reuses the statement prepared for the last.
    json_int_pairs: str
    # Appended to a SELECT that reads rows it will change (no-op where BEGIN IMMEDIATE
    # already holds the one write lock).
    for_update: str
    # The commit of a whole reservation (`ledger.commit` when nothing comes back) as one
    # statement that settles it and appends its ledger row, where the engine can write in a
    # CTE; params: job_id, amount (or None), created_at, note. Returns a row if it committed;
    # none when the reservation is not 'reserved' or `amount` is not all of it.
    commit_whole: str | None = None
    # `ledger.reserve` as one statement, where the engine runs it server-side; params: job_id,
    # user_id, cost, day, daily_allowance, group_key, group_cap, created_at. Its one row is
    # (outcome, number, detail) for `ledger.refusal` ("ok": reserved).
    reserve_call: str | None = None
    # What a refusal `reserve_call` raised (to roll back its writes) says, as that row; None
    # for any other error.
    reserve_refused: Callable[[BaseException], tuple[str, int | None, str | None] | None] = (
        lambda error: None
    )
    # `ledger.reserve_many` after writing the asks' new jobs, as one statement where the
    # engine runs it server-side (`Store.open_job`'s batches); params: one array per `Ask`
    # field (job 0: write the ask's job), then created_at, then one array per new-job column
    # after user_id (None where the ask's job exists). Its rows are (n, job id, outcome,
    # number, detail), n the ask's 1-based place.
    open_many_call: str | None = None
    # The most reservations made together (`Store.reserve`'s batches). One server-side call
    # decides a burst's 500 in ~15 ms of the server's time, off the event loop; SQLite's rule
    # runs in Python on its writer thread, holding the GIL against the loop a batch long.
    reserve_batch: int = 256


class Engine(Protocol):
    """One database: SQLite in a file, or a PostgreSQL server."""

    dialect: Dialect
    url: str

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One read statement, outside any transaction."""
        ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement on its own (atomic by itself); returns the rows changed."""
        ...

    async def fetch_write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One write statement with RETURNING; its rows."""
        ...

    async def transaction(self, rule: Rule[T]) -> T:
        """Run `rule` in one transaction that holds what it reads until it commits."""
        ...

    async def session(self, rule: Rule[T]) -> T:
        """Run `rule` on one connection without a transaction (each statement commits)."""
        ...

    async def schema_version(self) -> int:
        """The migration the database is at."""
        ...

    async def migrate(self) -> list[int]:
        """Apply the pending migrations; returns their numbers."""
        ...

    def is_transient(self, error: BaseException) -> bool:
        """Whether the call that raised `error` may succeed if tried again."""
        ...

    async def close(self) -> None:
        """Close the connection(s); calls in flight finish first."""
        ...


class Ready:
    """An awaitable that is already done: `await Ready(x)` is `x`, without suspending."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # a generator that returns at once


def run_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a rule's coroutine to its end in this call (SQLite's `Tx` never suspends it)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("a store rule awaited something other than its transaction")
