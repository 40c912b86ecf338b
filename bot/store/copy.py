"""`drawbridge db upgrade` and `drawbridge db copy`: bring a database's schema up to date, and
move an install from one database to another (SQLite to PostgreSQL, usually).

A copy moves every table row for row, ids included (the ledger, the jobs and the encrypted
keys as they are: the target must use the same DRAWBRIDGE_SECRET_KEY or secret.key to read
the keys), into an empty database at the same schema version, in one transaction, and then
compares the two: row counts of every table, the ledger's sums by kind, balances and usage.
Any difference fails the copy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.store.core import open_engine
from bot.store.engine import Engine, Tx
from bot.store.migrations import TABLES
from bot.store.processes import DEFAULT_PROCESS_TIMEOUT

Say = Callable[[str], None]


class CopyRefused(Exception):
    """The copy cannot start (the target is not empty, the source is in use...)."""


@dataclass
class CopyReport:
    rows: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)


def redact(url: str) -> str:
    """A database URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


async def upgrade(url: str, say: Say) -> list[int]:
    """Apply the pending migrations to the database `url` names; returns their numbers."""
    engine = await open_engine(url, migrate=False)
    try:
        before = await engine.schema_version()
        applied = await engine.migrate()
        after = await engine.schema_version()
    finally:
        await engine.close()
    if applied:
        say(
            f"{redact(url)}: schema version {before} -> {after} "
            f"(applied {', '.join(map(str, applied))})"
        )
    else:
        say(f"{redact(url)}: schema version {after}, up to date")
    return applied


# What `db copy` compares between the two databases, beside every table's row count.
TOTALS = {
    "ledger.daily": "SELECT COALESCE(SUM(daily_amount), 0) FROM ledger",
    "ledger.balance": "SELECT COALESCE(SUM(balance_amount), 0) FROM ledger",
    "ledger.grant": "SELECT COALESCE(SUM(balance_amount), 0) FROM ledger WHERE kind = 'grant'",
    "ledger.reserve": (
        "SELECT COALESCE(SUM(daily_amount + balance_amount), 0) FROM ledger WHERE kind = 'reserve'"
    ),
    "ledger.commit": (
        "SELECT COALESCE(SUM(daily_amount + balance_amount), 0) FROM ledger WHERE kind = 'commit'"
    ),
    "ledger.refund": (
        "SELECT COALESCE(SUM(daily_amount + balance_amount), 0) FROM ledger WHERE kind = 'refund'"
    ),
    "users.granted": "SELECT COALESCE(SUM(granted), 0) FROM users",
    "users.keys": "SELECT COUNT(*) FROM users WHERE api_key_enc IS NOT NULL",
    "daily_usage.used": "SELECT COALESCE(SUM(used), 0) FROM daily_usage",
    "group_usage.used": "SELECT COALESCE(SUM(used), 0) FROM group_usage",
    "reservations.open": "SELECT COUNT(*) FROM reservations WHERE state = 'reserved'",
}


async def copy_database(source_url: str, target_url: str, say: Say) -> CopyReport:
    """Copy everything from `source_url` into the empty database `target_url`, then check."""
    if source_url == target_url:
        raise CopyRefused("--from and --to name the same database")
    if source_url.startswith("sqlite:///"):
        path = Path(source_url.removeprefix("sqlite:///"))
        if not await asyncio.to_thread(path.is_file):
            # Opening it would create an empty database, and the copy "succeed" with nothing.
            raise CopyRefused(
                f"{path}: no such SQLite file (an absolute path takes four slashes: "
                "sqlite:////var/lib/drawbridge/drawbridge.sqlite3)"
            )
    source = await open_engine(source_url)
    try:
        target = await open_engine(target_url)
        try:
            await _check_copyable(source, target)
            say(f"copying {redact(source_url)} -> {redact(target_url)}")
            started = time.monotonic()
            report = CopyReport()
            # Read everything first: a SQLite target runs its transaction in one synchronous
            # trip, which cannot wait for the source in between.
            tables = {table: await _read_table(source, table) for table in TABLES}
            links = await source.read(
                "SELECT id, account_id FROM users WHERE account_id IS NOT NULL"
            )

            async def load(tx: Tx) -> None:
                for table, (names, rows) in tables.items():
                    insert = (
                        f"INSERT INTO {table} ({', '.join(names)})"
                        f" VALUES ({', '.join('?' * len(names))})"
                    )
                    for row in rows:
                        await tx.execute(insert, *row)
                    report.rows[table] = len(rows)
                # users.account_id points at other users rows, later ones too: set after all.
                for user_id, account_id in links:
                    await tx.execute(
                        "UPDATE users SET account_id = ? WHERE id = ?", account_id, user_id
                    )

            await target.transaction(load)
            await _after_copy(target)
            for table in TABLES:
                say(f"  {table}: {report.rows[table]:,} rows")
            report.mismatches = await _compare(source, target, report)
            say(f"copied in {time.monotonic() - started:.1f}s")
        finally:
            await target.close()
    finally:
        await source.close()
    return report


async def _check_copyable(source: Engine, target: Engine) -> None:
    for table in ("users", "jobs", "ledger"):
        rows = await target.read(f"SELECT COUNT(*) FROM {table}")
        if int(rows[0][0]):
            raise CopyRefused(
                f"the target database already holds {table} rows: copy into an empty one "
                "(a copy never merges two wallets)"
            )
    fresh = time.time() - DEFAULT_PROCESS_TIMEOUT
    live = await source.read(
        "SELECT id, host, pid FROM processes WHERE stopped_at IS NULL AND heartbeat_at >= ?",
        (fresh,),
    )
    if live:
        where = ", ".join(f"{row[1]} pid {row[2]}" for row in live)
        raise CopyRefused(
            f"drawbridge is running on the source database ({where}): stop it first, "
            "so nothing changes while it is copied"
        )


async def _columns(engine: Engine, table: str) -> list[str]:
    if engine.dialect.name == "sqlite":
        rows = await engine.read(f"PRAGMA table_info({table})")
        return [str(row[1]) for row in rows]
    rows = await engine.read(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = ? AND table_schema = current_schema() ORDER BY ordinal_position",
        (table,),
    )
    return [str(row[0]) for row in rows]


async def _read_table(source: Engine, table: str) -> tuple[list[str], list[list[Any]]]:
    """Every row of `table` (but users.account_id, set once every user is in), in id order."""
    names = [
        c for c in await _columns(source, table) if not (table == "users" and c == "account_id")
    ]
    order = "id" if "id" in names else ", ".join(names[:2])
    floats = _FLOAT_COLUMNS.get(table, frozenset())
    rows: list[list[Any]] = []
    while True:
        page = await source.read(
            f"SELECT {', '.join(names)} FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
            (_PAGE, len(rows)),
        )
        rows.extend(_convert(names, row, floats) for row in page)
        if len(page) < _PAGE:
            return names, rows


_PAGE = 5000

# REAL columns: SQLite may hold a whole number there as an integer; PostgreSQL's DOUBLE
# PRECISION wants a float.
_FLOAT_COLUMNS: dict[str, frozenset[str]] = {
    "users": frozenset({"created_at", "key_set_at"}),
    "jobs": frozenset({"created_at", "started_at", "finished_at", "upstream_done_at"}),
    "ledger": frozenset({"created_at"}),
    "messages": frozenset({"created_at"}),
    "provider_capabilities": frozenset({"updated_at"}),
    "audit": frozenset({"created_at"}),
    "group_rules": frozenset({"updated_at"}),
    "link_codes": frozenset({"expires_at"}),
    "processes": frozenset({"started_at", "heartbeat_at", "stopped_at"}),
    "provider_slots": frozenset({"taken_at"}),
}


def _convert(names: list[str], row: Any, floats: frozenset[str]) -> list[Any]:
    values = []
    for name, value in zip(names, row, strict=True):
        if value is not None and name in floats:
            value = float(value)
        elif isinstance(value, memoryview):
            value = bytes(value)
        values.append(value)
    return values


async def _after_copy(target: Engine) -> None:
    if target.dialect.name != "postgresql":
        return
    # Identities go on from the copied ids, not from 1.
    for table in ("users", "jobs", "ledger", "audit"):
        await target.read(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
            f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
        )


async def _compare(source: Engine, target: Engine, report: CopyReport) -> list[str]:
    mismatches = []
    for table in TABLES:
        counts = [
            int((await db.read(f"SELECT COUNT(*) FROM {table}"))[0][0]) for db in (source, target)
        ]
        if counts[0] != counts[1]:
            mismatches.append(f"{table}: {counts[0]} rows in the source, {counts[1]} copied")
    for name, sql in TOTALS.items():
        values = [int((await db.read(sql))[0][0]) for db in (source, target)]
        report.totals[name] = values[1]
        if values[0] != values[1]:
            mismatches.append(f"{name}: {values[0]} in the source, {values[1]} in the target")
    return mismatches
