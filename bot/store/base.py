"""What every part of the Store shares: its engine, its keys, how it writes and closes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Sequence, Set
from typing import Any, TypeVar

from bot.secrets import KeyBox
from bot.store.engine import Engine, Row, Rule
from bot.store.model import NotFoundError, StoreError, User

T = TypeVar("T")


class StoreBase:
    """The Store's internals; its public methods live in core, accounts, console, processes."""

    def __init__(self, engine: Engine, keybox: KeyBox, admins: Set[tuple[str, str]]) -> None:
        self._engine = engine
        self._keybox = keybox
        self._admins = frozenset((platform.lower(), uid) for platform, uid in admins)
        self._writes: set[asyncio.Task[Any]] = set()
        self._closed = False
        # This process's row in `processes` (`start_process`); None: jobs belong to no
        # process (tests, the CLI), and provider slots are this process's alone.
        self.process_id: str | None = None

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def for_update(self) -> str:
        return self._engine.dialect.for_update

    async def close(self) -> None:
        """Let transactions in flight finish, then close the connection(s)."""
        if self._closed:
            return
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._engine.close()

    async def __aenter__(self) -> StoreBase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def is_transient(self, error: BaseException) -> bool:
        """Whether a failed store call may succeed if tried again."""
        return self._engine.is_transient(error)

    # --- internals ---

    def _user(self, row: Row) -> User:
        role = row["role"]
        # Config admins are admins without a stored role, so removing them from the config
        # takes the power away; an explicit ban still wins.
        if role != "banned" and (row["platform"].lower(), row["platform_user_id"]) in self._admins:
            role = "admin"
        keys = list(row.keys())
        return User(
            id=row["id"],
            platform=row["platform"],
            platform_user_id=row["platform_user_id"],
            name=row["name"],
            role=role,
            lang=row["lang"],
            granted=row["granted"],
            has_key=row["api_key_enc"] is not None,
            # A plain users row (no USER_SELECT) is its own identity.
            identity_id=row["identity_id"] if "identity_id" in keys else row["id"],
            daily_allowance=row["daily_allowance"],
            key_probe=None if row["key_probe"] is None else json.loads(row["key_probe"]),
        )

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._engine.read(sql, params)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement on its own; returns the rows it changed."""
        if self._closed:
            raise StoreError("store is closed")
        return await self._engine.execute(sql, params)

    async def _fetch_write(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if self._closed:
            raise StoreError("store is closed")
        return await self._engine.fetch_write(sql, params)

    async def _update_user(self, user_id: int, sql: str, params: Sequence[Any]) -> None:
        if await self._execute(sql, params) != 1:
            raise NotFoundError(f"no user #{user_id}")

    async def _write(self, rule: Rule[T]) -> T:
        """Run `rule` in one transaction; what it raises reaches the caller unchanged.

        Shielded: the transaction runs to COMMIT or ROLLBACK whatever happens to the caller,
        and the shield keeps the task alive, so `close()` waits for it and its outcome is not
        lost when a caller is cancelled half-way (shutdown, a timeout).
        """
        if self._closed:
            raise StoreError("store is closed")
        return await self._shielded(self._engine.transaction(rule))

    async def _write_one(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """One write statement with RETURNING, shielded like `_write`; its rows."""
        if self._closed:
            raise StoreError("store is closed")
        return await self._shielded(self._engine.fetch_write(sql, params))

    async def _shielded(self, write: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(_forget_write(self._writes))
        return await asyncio.shield(task)


def _forget_write(writes: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        writes.discard(task)
        # Retrieve the outcome: if the caller was cancelled, nobody else will, and asyncio
        # would log "exception was never retrieved".
        if not task.cancelled():
            task.exception()

    return done
