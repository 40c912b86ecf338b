"""The two store engines for tests: a SQLite file in tmp_path, or a fresh PostgreSQL schema.

PostgreSQL comes from DRAWBRIDGE_TEST_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test). Each test gets a schema of its own
(`drawbridge_t<run>_<n>`, dropped after it), so tests never see each other's rows. Where no
server answers, PostgreSQL tests skip saying so, unless DRAWBRIDGE_REQUIRE_POSTGRES=1 (CI),
which makes them fail instead.

`Raw` reads either database with no drawbridge code in between (sqlite3, or asyncpg on a
thread of its own), so the tests' ledger checks cannot share a bug with the store.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest

from bot.store.postgres import numbered

T = TypeVar("T")

POSTGRES_URL = os.environ.get(
    "DRAWBRIDGE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("DRAWBRIDGE_REQUIRE_POSTGRES", "") not in ("", "0")
ENGINES = ("sqlite", "postgresql")

_RUN = uuid.uuid4().hex[:8]
_SCHEMAS = itertools.count(1)
_unavailable: list[str] = []  # the reason, once found out


async def postgres_or_skip() -> None:
    """Skip (or fail, under DRAWBRIDGE_REQUIRE_POSTGRES=1) when no PostgreSQL answers."""
    if not _unavailable:
        try:
            con = await asyncpg.connect(POSTGRES_URL, timeout=5)
            await con.close()
            _unavailable.append("")
        except Exception as exc:  # refused, no such database, auth...
            where = urlsplit(POSTGRES_URL)._replace(netloc=urlsplit(POSTGRES_URL).hostname or "")
            _unavailable.append(f"no PostgreSQL at {where.geturl()} ({exc!r})")
    reason = _unavailable[0]
    if reason:
        if REQUIRE_POSTGRES:
            pytest.fail(reason + "; DRAWBRIDGE_REQUIRE_POSTGRES=1 requires one")
        pytest.skip(reason + " (set DRAWBRIDGE_TEST_DATABASE_URL)")


def with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}search_path={schema}"


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A fresh, empty schema on the test server; yields a URL whose connections use it."""
    await postgres_or_skip()
    schema = f"drawbridge_t{_RUN}_{next(_SCHEMAS)}"
    con = await asyncpg.connect(POSTGRES_URL)
    try:
        await con.execute(f"CREATE SCHEMA {schema}")
    finally:
        await con.close()
    try:
        yield with_search_path(POSTGRES_URL, schema)
    finally:
        con = await asyncpg.connect(POSTGRES_URL)
        try:
            await con.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            await con.close()


@asynccontextmanager
async def database_url(engine: str, tmp_path: Path) -> AsyncIterator[str]:
    """A new, empty database of `engine` ("sqlite" or "postgresql")."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'drawbridge.sqlite3'}"
    else:
        async with postgres_schema() as url:
            yield url


class Raw:
    """Plain, synchronous access to a test database, with no drawbridge code in between.

    `query` takes `?` placeholders on both engines.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = "postgresql" if url.startswith("postgresql") else "sqlite"
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.engine == "sqlite":
            self._sqlite = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        else:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True).start()
            self._pg: asyncpg.Connection = self._run(asyncpg.connect(url))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.engine == "sqlite":
            return [tuple(row) for row in self._sqlite.execute(sql, params).fetchall()]
        return [tuple(row) for row in self._run(self._pg.fetch(numbered(sql), *params))]

    def value(self, sql: str, *params: Any) -> Any:
        rows = self.query(sql, *params)
        return rows[0][0] if rows else None

    def execute(self, sql: str, *params: Any) -> None:
        if self.engine == "sqlite":
            self._sqlite.execute(sql, params)
        else:
            self._run(self._pg.execute(numbered(sql), *params))

    def close(self) -> None:
        if self.engine == "sqlite":
            self._sqlite.close()
        else:
            self._run(self._pg.close())
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._loop.stop)
