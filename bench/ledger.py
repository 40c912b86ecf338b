"""Ledger throughput: reserve + commit pairs through Store, against raw sqlite3 as the ceiling.

    python bench/ledger.py            # 10 s of store pairs
    python bench/ledger.py --quick    # 2 s (whole run well under 10 s)

Each pair is what a finished job costs the store: create_job + reserve + commit, from 100
concurrent asyncio tasks over one SQLite file (WAL, one writer connection behind a lock,
BEGIN IMMEDIATE). The ceiling runs the same SQL statements on a plain synchronous sqlite3
connection in one thread, with no asyncio, no lock and no thread hop: the most this SQL can do
on this machine. At the end both files are audited: every user's balance and daily usage must
equal what the ledger says, and every job must be reserved and committed exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot import store as store_sql
from bot.secrets import KeyBox
from bot.store import Store

DAY = date(2025, 3, 1)
USERS = 100
ALLOWANCE = 5
COST = 1
START_BALANCE = 10_000_000


async def store_pairs(db_path: Path, tasks: int, seconds: float) -> tuple[int, float, list[float]]:
    """Run pairs through Store from `tasks` tasks for `seconds`; (pairs, elapsed, latencies)."""
    store = await Store.open(db_path, keybox=KeyBox.load(db_path.parent))
    users = [(await store.user("bench", str(n))).id for n in range(USERS)]
    for uid in users:
        await store.grant(uid, START_BALANCE)
    latencies: list[float] = []

    async def worker(n: int, deadline: float) -> None:
        uid = users[n % USERS]
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            job_id = await store.create_job(
                user_id=uid,
                platform="bench",
                chat_id="c",
                group_key=None,
                kind="draw",
                prompt="p",
                options={"n": 1},
                ref_count=0,
                own_key=False,
            )
            await store.reserve(job_id, user_id=uid, cost=COST, day=DAY, daily_allowance=ALLOWANCE)
            if not await store.commit(job_id):
                raise AssertionError(f"job #{job_id} could not be committed")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker(n, deadline) for n in range(tasks)))
    elapsed = time.perf_counter() - started
    await store.close()
    return len(latencies), elapsed, latencies


def raw_pairs(db_path: Path, pairs: int) -> float:
    """The same statements on one synchronous sqlite3 connection; returns elapsed seconds."""
    con = sqlite3.connect(db_path, isolation_level=None)
    for pragma in store_sql.PRAGMAS:
        con.execute(pragma).fetchall()
    now = time.time()
    users = []
    for n in range(USERS):
        con.execute(
            "INSERT INTO users (platform, platform_user_id, granted, created_at) "
            "VALUES ('bench', ?, ?, ?)",
            (str(n), START_BALANCE, now),
        )
        uid = con.execute("SELECT last_insert_rowid()").fetchone()[0]
        con.execute(
            store_sql.SQL_INSERT_LEDGER,
            (None, uid, "grant", 0, START_BALANCE, None, now, "", None),
        )
        users.append(uid)
    day = DAY.isoformat()
    started = time.perf_counter()
    for n in range(pairs):
        uid = users[n % USERS]
        job_id = con.execute(
            store_sql.SQL_INSERT_JOB,
            (uid, "bench", "c", None, "draw", "p", '{"n":1}', 0, 0, time.time()),
        ).lastrowid
        con.execute("BEGIN IMMEDIATE")
        _, _, _, used, _, _, _ = con.execute(
            store_sql.SQL_RESERVE_READ, (uid, day, None, day, uid, job_id)
        ).fetchone()
        daily = min(COST, max(0, ALLOWANCE - used))
        balance = COST - daily
        if balance:
            con.execute(store_sql.SQL_TAKE_BALANCE, (balance, uid, balance))
        if daily:
            con.execute(store_sql.SQL_TAKE_DAILY, (uid, day, daily, ALLOWANCE))
        con.execute(store_sql.SQL_INSERT_RESERVATION, (job_id, uid, daily, balance, day, None))
        con.execute(
            store_sql.SQL_INSERT_LEDGER,
            (job_id, uid, "reserve", daily, balance, day, time.time(), "", None),
        )
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        row = con.execute(store_sql.SQL_SETTLE, ("committed", job_id)).fetchone()
        con.execute(
            store_sql.SQL_INSERT_LEDGER,
            (job_id, uid, "commit", row[1], row[2], day, time.time(), "", None),
        )
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return elapsed


def audit(db_path: Path, pairs: int) -> list[str]:
    """Every way the ledger could be wrong, as messages (empty: exact)."""
    con = sqlite3.connect(db_path)
    problems: list[str] = []
    q = con.execute
    for uid, granted, ledger in q(
        """
        SELECT u.id, u.granted, COALESCE((SELECT SUM(CASE kind
                   WHEN 'grant' THEN balance_amount WHEN 'reserve' THEN -balance_amount
                   WHEN 'refund' THEN balance_amount ELSE 0 END)
               FROM ledger WHERE user_id = u.id), 0)
        FROM users AS u
        """
    ):
        if granted != ledger:
            problems.append(f"user #{uid}: balance {granted} but ledger says {ledger}")
    for uid, day, used, ledger in q(
        """
        SELECT d.user_id, d.day, d.used, COALESCE((SELECT SUM(CASE kind
                   WHEN 'reserve' THEN daily_amount WHEN 'refund' THEN -daily_amount ELSE 0 END)
               FROM ledger WHERE user_id = d.user_id AND day = d.day), 0)
        FROM daily_usage AS d
        """
    ):
        if used != ledger:
            problems.append(f"user #{uid} {day}: daily used {used} but ledger says {ledger}")
    jobs, reservations, committed = q(
        "SELECT (SELECT COUNT(*) FROM jobs), (SELECT COUNT(*) FROM reservations),"
        " (SELECT COUNT(*) FROM reservations WHERE state = 'committed')"
    ).fetchone()
    if not jobs == reservations == committed == pairs:
        problems.append(
            f"{pairs} pairs but {jobs} jobs, {reservations} reservations, {committed} committed"
        )
    bad = q(
        """
        SELECT COUNT(*) FROM reservations AS r WHERE
            (SELECT COUNT(*) FROM ledger WHERE job_id = r.job_id AND kind = 'reserve') <> 1
         OR (SELECT COUNT(*) FROM ledger WHERE job_id = r.job_id AND kind = 'commit') <> 1
         OR (SELECT COUNT(*) FROM ledger WHERE job_id = r.job_id AND kind = 'refund') <> 0
        """
    ).fetchone()[0]
    if bad:
        problems.append(f"{bad} jobs without exactly one reserve and one commit row")
    spent = q(
        "SELECT COALESCE(SUM(daily_amount + balance_amount), 0) FROM ledger WHERE kind = 'reserve'"
    ).fetchone()[0]
    if spent != pairs * COST:
        problems.append(f"{spent} credits reserved for {pairs} pairs of cost {COST}")
    con.close()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 10 s in all)")
    parser.add_argument("--seconds", type=float, help="how long the store runs (default 10, 2)")
    parser.add_argument("--tasks", type=int, default=100, help="concurrent tasks (100)")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 10.0)

    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp:
        ours_db, raw_db, one_db = (Path(tmp) / n for n in ("store.db", "raw.db", "one.db"))
        pairs, elapsed, latencies = asyncio.run(store_pairs(ours_db, args.tasks, seconds))
        one_pairs, one_elapsed, one_lat = asyncio.run(store_pairs(one_db, 1, seconds / 4))
        # Same schema for the ceiling, created by the store's own migrations.
        asyncio.run(_create_schema(raw_db))
        raw_elapsed = raw_pairs(raw_db, pairs)
        problems = audit(ours_db, pairs) + audit(one_db, one_pairs) + audit(raw_db, pairs)

    ours_rate, raw_rate = pairs / elapsed, pairs / raw_elapsed
    cut = statistics.quantiles(latencies, n=100)
    one_cut = statistics.quantiles(one_lat, n=100)
    print(
        f"reserve+commit pairs (create_job + reserve + commit), {USERS} users, SQLite "
        f"{sqlite3.sqlite_version}"
    )
    print(f"{'run':<34}{'pairs':>8}{'pairs/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    print(
        f"{f'store, {args.tasks} tasks':<34}{pairs:>8}{ours_rate:>10.0f}"
        f"{cut[49] * 1e3:>9.2f}{cut[98] * 1e3:>9.2f}"
    )
    print(
        f"{'store, 1 task':<34}{one_pairs:>8}{one_pairs / one_elapsed:>10.0f}"
        f"{one_cut[49] * 1e3:>9.2f}{one_cut[98] * 1e3:>9.2f}"
    )
    print(f"{'raw sqlite3, sync (ceiling)':<34}{pairs:>8}{raw_rate:>10.0f}{'-':>9}{'-':>9}")
    print(f"ours/raw: {ours_rate / raw_rate:.2f}")
    if problems:
        print("ledger NOT exact:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(f"ledger exact: yes ({pairs} + {one_pairs} store pairs and {pairs} raw pairs audited)")
    return 0


async def _create_schema(db_path: Path) -> None:
    await (await Store.open(db_path, keybox=KeyBox.load(db_path.parent))).close()


if __name__ == "__main__":
    sys.exit(main())
