"""Ledger throughput: reserve + commit pairs through Store, against the same SQL run raw.

    python bench/ledger.py                                   # SQLite, 10 s of store pairs
    python bench/ledger.py --quick                           # SQLite, 2 s
    python bench/ledger.py --database-url postgresql://postgres@127.0.0.1:5432/test \
        [--processes N] [--kill] [--quick]

Each pair is what a finished job costs the store: create_job + reserve + commit, from 100
concurrent asyncio tasks (`--tasks`) in each of N worker processes (`--processes`, real OS
processes started with multiprocessing's spawn), all on one wallet of 100 users, every worker
registered as a drawbridge process (`start_process`). The workers start together at one
instant (process start-up and connecting are not timed) and stop by themselves.

Baselines, in the same run:

- SQLite: the same statements on one plain synchronous sqlite3 connection in one thread, no
  asyncio and no thread hop (the most this SQL can do here);
- PostgreSQL (a fresh database on that server for each run, dropped at the end; the URL's own
  database is only used to create them): the same N processes x tasks on raw asyncpg pools of
  the store's size, (a) running the store's statements for a pair with no store around them,
  and (b) bare guarded `UPDATE`s, two a pair (a take and a give-back of one credit).

`--kill` SIGKILLs the first worker half-way through; each survivor runs recovery once its
pairs are done (with one worker, a new process does, as the next start would), which must
settle the dead worker's jobs. At the end every database is audited with plain SQL: each
user's balance and daily usage equal what the ledger says, every reservation is settled with
exactly one reserve row and one commit (or, for the dead worker's, one refund), the credits
spent equal the commits, and each surviving worker committed exactly the pairs it counted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
if os.environ.get(BEFORE_CODE := "DRAWBRIDGE_BENCH_CODE"):
    # A `--before REV` worker: the bot's code from REV's worktree goes first.
    sys.path.insert(0, os.environ[BEFORE_CODE])

from _common import machine, percentile, table

from bot.secrets import KeyBox
from bot.store import Store
from bot.store import postgres as _postgres
from bot.store.sql import (
    SQL_INSERT_JOB,
    SQL_INSERT_LEDGER,
    SQL_INSERT_RESERVATION,
    SQL_RESERVE_READ,
    SQL_SETTLE,
    SQL_TAKE_BALANCE,
    SQL_TAKE_DAILY,
)
from bot.store.sqlite import PRAGMAS

DAY = date(2025, 3, 1)
USERS = 100
ALLOWANCE = 5
COST = 1
START_BALANCE = 10_000_000
LOOP_ENV = "DRAWBRIDGE_BENCH_LOOP"
"""`--uvloop`: every worker runs its event loop on uvloop (drawbridge itself does not, yet)."""
PROCESS_TIMEOUT = 1.0
"""DRAWBRIDGE_PROCESS_TIMEOUT for the workers (60 s in production): a worker that stops
beating for this long is dead, and a survivor's recovery timer settles its jobs."""
GOALS = {1: 2000.0, 2: 3000.0}
"""PostgreSQL: store pairs/s to reach with this many processes (issue 15)."""


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://"))


# --- the workers (each one a spawned process) ---


@dataclass
class WorkerResult:
    """What one worker process reports."""

    pairs: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    process_id: str | None = None
    recovered: int = 0
    error: str = ""


def worker_main(mode: str, url: str, keydir: str, tasks: int, seconds: float, pipe: Any) -> None:
    """Entry point of a worker: mode is "store", "raw" (store SQL on asyncpg) or "bare"."""
    run: Any = asyncio.run
    if os.environ.get(LOOP_ENV) == "uvloop":
        import uvloop

        run = uvloop.run
    try:
        run(_worker(mode, url, Path(keydir), tasks, seconds, pipe))
    except BaseException as error:  # report it instead of dying silently
        pipe.send(WorkerResult(error=f"{type(error).__name__}: {error}"))
        raise


async def _worker(mode: str, url: str, keydir: Path, tasks: int, seconds: float, pipe: Any) -> None:
    run: Callable[[int], Any]
    store: Store | None = None
    pool: Any = None
    if mode == "store":
        store = await Store.connect(url, keybox=KeyBox.load(keydir))
        await store.start_process("bench", timeout=PROCESS_TIMEOUT)
        users = [(await store.user("bench", str(n))).id for n in range(USERS)]
        run = _store_pair(store)
    else:
        import asyncpg

        # The store's pool, reset included (see bot/store/postgres.py).
        reset = getattr(_postgres, "_keep_session", None)
        pool = await asyncpg.create_pool(url, min_size=10, max_size=10, reset=reset)
        users = [row[0] for row in await pool.fetch("SELECT id FROM users ORDER BY id")][:USERS]
        run = _raw_pair(pool) if mode == "raw" else _bare_pair(pool)
    latencies: list[float] = []

    async def task(n: int, deadline: float) -> None:
        uid = users[n % USERS]
        while time.time() < deadline:
            started = time.perf_counter()
            await run(uid)
            latencies.append(time.perf_counter() - started)

    pipe.send("ready")
    start_at: float = pipe.recv()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    # What `drawbridge run` does beside its jobs (bot/runner.py keep_alive), on a short
    # timeout: beat, and recover the jobs of processes that stopped beating.
    timer = asyncio.create_task(_keep_alive(store)) if store is not None else None
    started = time.perf_counter()
    await asyncio.gather(*(task(n, start_at + seconds) for n in range(tasks)))
    elapsed = time.perf_counter() - started
    result = WorkerResult(pairs=len(latencies), elapsed=elapsed, latencies=latencies)
    if store is not None and timer is not None:
        # Long enough for a worker killed at the very end to be seen dead and recovered.
        await asyncio.sleep(PROCESS_TIMEOUT * 1.5)
        timer.cancel()
        result.process_id = store.process_id
        result.recovered = len(await store.recover())
        await store.stop_process()
        await store.close()
    if pool is not None:
        await pool.close()
    pipe.send(result)


async def _keep_alive(store: Store) -> None:
    while True:
        await asyncio.sleep(PROCESS_TIMEOUT / 3)
        await store.heartbeat()
        await store.recover()


def _store_pair(store: Store) -> Callable[[int], Any]:
    async def pair(uid: int) -> None:
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

    return pair


def _pg(sql: str) -> str:
    from bot.store.postgres import numbered

    return numbered(sql)


def _raw_pair(pool: Any) -> Callable[[int], Any]:
    """The store's statements for one pair, one by one on asyncpg (no store, no batches)."""
    dialect = _postgres.DIALECT
    # The store's PostgreSQL reservation is one function call (migration 11), its whole
    # commit one statement; a `--before` checkout never runs this mode.
    reserve, commit = getattr(dialect, "reserve_call", None), dialect.commit_whole
    insert_job = _pg(SQL_INSERT_JOB)
    day = DAY.isoformat()

    async def pair(uid: int) -> None:
        async with pool.acquire() as con:
            job_id = await con.fetchval(
                insert_job, uid, "bench", "c", None, "draw", "p", '{"n":1}', 0, 0, time.time(), None
            )
            row = await con.fetchrow(reserve, job_id, uid, COST, day, ALLOWANCE, None, 0, 0.0)
            if row[0] != "ok" or not await con.fetch(commit, job_id, None, time.time(), ""):
                raise AssertionError(f"job #{job_id}: {row[0]}")

    return pair


def _bare_pair(pool: Any) -> Callable[[int], Any]:
    """Two guarded UPDATEs: take one credit, give it back (what a pair minimally writes)."""
    take = "UPDATE users SET granted = granted - 1 WHERE id = $1 AND granted >= 1"
    give = "UPDATE users SET granted = granted + 1 WHERE id = $1"

    async def pair(uid: int) -> None:
        if await pool.execute(take, uid) != "UPDATE 1":
            raise AssertionError("no credit to take")
        await pool.execute(give, uid)

    return pair


@dataclass
class Run:
    """N workers of one mode, started together."""

    name: str
    results: list[WorkerResult]
    killed: set[int]

    @property
    def pairs(self) -> int:
        return sum(r.pairs for r in self.results if r)

    @property
    def rate(self) -> float:
        # Pairs of every surviving worker over the longest of their runs.
        alive = [r for r in self.results if r.elapsed]
        return self.pairs / max(r.elapsed for r in alive) if alive else 0.0

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r.latencies]


def run_workers(
    mode: str, url: str, keydir: Path, processes: int, tasks: int, seconds: float, kill: bool
) -> Run:
    """Start `processes` workers, let them run `seconds` together, SIGKILL the first
    half-way if `kill`; returns their reports (an empty one for a killed worker)."""
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    workers = []
    for _ in range(processes):
        ours, theirs = ctx.Pipe()
        worker = ctx.Process(
            target=worker_main, args=(mode, url, str(keydir), tasks, seconds, theirs)
        )
        worker.start()
        theirs.close()
        pipes.append(ours)
        workers.append(worker)
    results: list[WorkerResult] = [WorkerResult() for _ in workers]
    killed: set[int] = set()
    try:
        for n, pipe in enumerate(pipes):
            message = pipe.recv()
            if message != "ready":
                raise RuntimeError(f"{mode} worker {n} failed to start: {message.error}")
        start_at = time.time() + 0.3
        for pipe in pipes:
            pipe.send(start_at)
        if kill:
            time.sleep(max(0.0, start_at + seconds / 2 - time.time()))
            os.kill(workers[0].pid or 0, signal.SIGKILL)
            # Reaped at once, as a supervisor would: a zombie's pid still answers kill(pid, 0),
            # so recovery would take it for alive until its heartbeat goes stale.
            workers[0].join()
            killed.add(0)
        for n, pipe in enumerate(pipes):
            if n in killed:
                continue
            result = pipe.recv()
            if result.error:
                raise RuntimeError(f"{mode} worker {n}: {result.error}")
            results[n] = result
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    return Run(mode, results, killed)


# --- SQLite's ceiling: one synchronous connection ---


def raw_sqlite_pairs(db_path: Path, pairs: int) -> float:
    """The store's statements on one synchronous sqlite3 connection; returns elapsed seconds."""
    con = sqlite3.connect(db_path, isolation_level=None)
    for pragma in PRAGMAS:
        con.execute(pragma).fetchall()
    users = [row[0] for row in con.execute("SELECT id FROM users ORDER BY id").fetchall()]
    day = DAY.isoformat()
    started = time.perf_counter()
    for n in range(pairs):
        uid = users[n % USERS]
        job_id = con.execute(
            SQL_INSERT_JOB,
            (uid, "bench", "c", None, "draw", "p", '{"n":1}', 0, 0, time.time(), None),
        ).fetchone()[0]
        con.execute("BEGIN IMMEDIATE")
        used = con.execute(SQL_RESERVE_READ, (uid, day, None, day, None, uid, job_id)).fetchone()[3]
        daily = min(COST, max(0, ALLOWANCE - used))
        balance = COST - daily
        if balance:
            con.execute(SQL_TAKE_BALANCE, (balance, uid, balance))
        if daily:
            con.execute(SQL_TAKE_DAILY, (uid, day, daily, ALLOWANCE))
        con.execute(SQL_INSERT_RESERVATION, (job_id, uid, daily, balance, day, None))
        con.execute(
            SQL_INSERT_LEDGER, (job_id, uid, "reserve", daily, balance, day, time.time(), "", None)
        )
        con.execute("COMMIT")
        con.execute("BEGIN IMMEDIATE")
        row = con.execute(SQL_SETTLE, ("committed", job_id)).fetchone()
        con.execute(
            SQL_INSERT_LEDGER, (job_id, uid, "commit", row[1], row[2], day, time.time(), "", None)
        )
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return elapsed


# --- databases: creating, querying, auditing ---


class Database:
    """One bench database: a SQLite file, or a fresh database on the PostgreSQL server."""

    def __init__(self, url: str, drop: Callable[[], None] | None = None) -> None:
        self.url = url
        self._drop = drop

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if is_postgres(self.url):
            return asyncio.run(_pg_query(self.url, sql, params))
        con = sqlite3.connect(self.url.removeprefix("sqlite:///"))
        try:
            return [tuple(row) for row in con.execute(sql.replace("$1", "?"), params)]
        finally:
            con.close()

    def drop(self) -> None:
        if self._drop is not None:
            self._drop()


async def _pg_query(url: str, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await con.fetch(sql, *params)]
    finally:
        await con.close()


def create_database(
    base_url: str, tmp: Path, name: str, keydir: Path, *, seed: bool = True
) -> Database:
    """A fresh database named `name` with the store's schema and the bench's users (`seed`:
    by this checkout's code; `run_before` seeds its own with the old code's schema)."""
    if is_postgres(base_url):
        parts = urlsplit(base_url.replace("postgresql+asyncpg://", "postgresql://", 1))
        url = urlunsplit(parts._replace(path=f"/{name}"))
        admin = urlunsplit(parts)
        asyncio.run(_pg_admin(admin, f'DROP DATABASE IF EXISTS "{name}"'))
        asyncio.run(_pg_admin(admin, f'CREATE DATABASE "{name}"'))
        db = Database(url, lambda: asyncio.run(_pg_admin(admin, f'DROP DATABASE "{name}"')))
    else:
        db = Database(f"sqlite:///{tmp / (name + '.db')}")
    if seed:
        asyncio.run(_seed(db.url, keydir))
    return db


def seed_main(url: str, keydir: str) -> None:
    """Seed a database in a spawned process (with `--before`, the old code's schema)."""
    asyncio.run(_seed(url, Path(keydir)))


async def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        await con.execute(sql)
    finally:
        await con.close()


async def _seed(url: str, keydir: Path) -> None:
    store = await Store.connect(url, keybox=KeyBox.load(keydir))
    try:
        for n in range(USERS):
            await store.grant((await store.user("bench", str(n))).id, START_BALANCE)
    finally:
        await store.close()


def audit(db: Database, run: Run | None, pairs: int | None = None) -> list[str]:
    """Every way the ledger could be wrong, as messages (empty: exact).

    `run`: the workers whose counts must match the committed reservations of their process;
    `pairs` (no run): how many pairs a process-less run (the SQLite ceiling) made.
    """
    problems: list[str] = []
    q = db.query
    for uid, granted, ledger in q(
        """
        SELECT u.id, u.granted, COALESCE((SELECT SUM(CASE kind
                   WHEN 'grant' THEN balance_amount WHEN 'reserve' THEN -balance_amount
                   WHEN 'refund' THEN balance_amount WHEN 'transfer' THEN balance_amount
                   ELSE 0 END)
               FROM ledger WHERE user_id = u.id), 0)
        FROM users AS u
        """
    ):
        if granted != ledger:
            problems.append(f"user #{uid}: balance {granted} but ledger says {ledger}")
    for uid, day, used, ledger in q(
        """
        SELECT d.user_id, d.day, d.used, COALESCE((SELECT SUM(CASE kind
                   WHEN 'reserve' THEN daily_amount WHEN 'refund' THEN -daily_amount
                   WHEN 'transfer' THEN daily_amount ELSE 0 END)
               FROM ledger WHERE user_id = d.user_id AND day = d.day), 0)
        FROM daily_usage AS d
        """
    ):
        if used != ledger:
            problems.append(f"user #{uid} {day}: daily used {used} but ledger says {ledger}")
    states = dict(q("SELECT state, COUNT(*) FROM reservations GROUP BY state"))
    if states.get("reserved"):
        problems.append(f"{states['reserved']} reservations never settled")
    bad = q(
        """
        SELECT COUNT(*) FROM reservations AS r WHERE
            (SELECT COUNT(*) FROM ledger WHERE job_id = r.job_id AND kind = 'reserve') <> 1
         OR (SELECT COUNT(*) FROM ledger WHERE job_id = r.job_id AND kind = 'commit')
            <> CASE r.state WHEN 'committed' THEN 1 ELSE 0 END
         OR (SELECT COUNT(*) FROM ledger WHERE job_id = r.job_id AND kind = 'refund')
            <> CASE r.state WHEN 'refunded' THEN 1 ELSE 0 END
        """
    )[0][0]
    if bad:
        problems.append(f"{bad} reservations whose ledger rows do not match their state")
    spent, committed = q(
        """
        SELECT COALESCE(SUM(CASE kind WHEN 'reserve' THEN daily_amount + balance_amount
                                      WHEN 'refund' THEN -(daily_amount + balance_amount)
                                      ELSE 0 END), 0),
               (SELECT COUNT(*) FROM reservations WHERE state = 'committed')
        FROM ledger WHERE job_id IS NOT NULL
        """
    )[0]
    if spent != committed * COST:
        problems.append(f"{spent} credits spent for {committed} committed pairs of cost {COST}")
    if run is None:
        if committed != pairs:
            problems.append(f"{pairs} pairs but {committed} committed reservations")
        return problems
    by_process = dict(
        q(
            "SELECT j.process_id, COUNT(*) FROM reservations AS r JOIN jobs AS j"
            " ON j.id = r.job_id WHERE r.state = 'committed' GROUP BY j.process_id"
        )
    )
    for n, result in enumerate(run.results):
        if n in run.killed:
            continue
        if by_process.get(result.process_id, 0) != result.pairs:
            problems.append(
                f"worker {n} counted {result.pairs} pairs, the database committed "
                f"{by_process.get(result.process_id, 0)}"
            )
    if run.killed:
        # The dead worker's jobs: none may be left in flight with its credits held.
        alive = tuple(r.process_id for r in run.results if r.process_id)
        marks = ", ".join(f"'{pid}'" for pid in alive) or "''"
        stuck = q(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
            f" AND process_id NOT IN ({marks})"
        )[0][0]
        if stuck:
            problems.append(f"{stuck} jobs of the killed worker still queued or running")
    return problems


def balances(db: Database) -> list[tuple[Any, ...]]:
    return db.query("SELECT id, granted FROM users ORDER BY id")


def audit_bare(db: Database, before: list[tuple[Any, ...]]) -> list[str]:
    wrong = len(set(balances(db)) ^ set(before)) // 2
    return [f"{wrong} users not back at their balance after take/give-back"] if wrong else []


# --- main ---


@dataclass
class Row:
    name: str
    run: Run | None
    pairs: int
    rate: float
    latencies: list[float]


def recover_next_start(db: Database, keydir: Path) -> int:
    """A new process starting on the database: its recovery settles the dead one's jobs."""

    async def go() -> int:
        store = await Store.connect(db.url, keybox=KeyBox.load(keydir))
        try:
            await store.start_process("bench-next-start", timeout=PROCESS_TIMEOUT)
            await asyncio.sleep(PROCESS_TIMEOUT)
            recovered = len(await store.recover())
            await store.stop_process()
            return recovered
        finally:
            await store.close()

    return asyncio.run(go())


def run_before(
    args: argparse.Namespace, tmp: Path, db: Database, keydir: Path, seconds: float
) -> Run:
    """The store workers with the bot's code as of `--before` (a temporary git worktree)."""
    code = tmp / "before"
    repo = str(Path(__file__).resolve().parents[1])
    subprocess.run(
        ["git", "-C", repo, "worktree", "add", "--detach", str(code), args.before],
        check=True,
        capture_output=True,
    )
    os.environ[BEFORE_CODE] = str(code)
    try:
        # Its schema is the old code's: a newer one would be refused by it.
        seeder = multiprocessing.get_context("spawn").Process(
            target=seed_main, args=(db.url, str(keydir))
        )
        seeder.start()
        seeder.join()
        if seeder.exitcode:
            raise RuntimeError(f"seeding the database for {args.before} failed")
        return run_workers("store", db.url, keydir, args.processes, args.tasks, seconds, False)
    finally:
        del os.environ[BEFORE_CODE]
        subprocess.run(
            ["git", "-C", repo, "worktree", "remove", "--force", str(code)],
            check=False,
            capture_output=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (2 s of pairs)")
    parser.add_argument("--seconds", type=float, help="how long each run lasts (default 10, 2)")
    parser.add_argument("--tasks", type=int, default=100, help="concurrent tasks a process (100)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (1)")
    parser.add_argument(
        "--database-url",
        default="",
        help="postgresql://... (a server: fresh databases are made there); default SQLite",
    )
    parser.add_argument(
        "--kill", action="store_true", help="SIGKILL the first worker half-way through"
    )
    parser.add_argument(
        "--before", metavar="REV", help="also run the store workers with the bot as of REV"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="workers on uvloop instead of asyncio's loop"
    )
    args = parser.parse_args()
    if args.uvloop:
        os.environ[LOOP_ENV] = "uvloop"
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    postgres = is_postgres(args.database_url)
    rows: list[Row] = []
    problems: list[str] = []
    recovered = 0
    tag = f"dbench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keydir = tmp / "keys"
        dbs: list[Database] = []
        try:
            store_db = create_database(args.database_url, tmp, f"{tag}_store", keydir)
            dbs.append(store_db)
            run = run_workers(
                "store", store_db.url, keydir, args.processes, args.tasks, seconds, args.kill
            )
            rows.append(
                Row(
                    f"store, {args.processes} x {args.tasks} tasks"
                    + (" (worker 0 killed)" if args.kill else ""),
                    run,
                    run.pairs,
                    run.rate,
                    run.latencies,
                )
            )
            if args.kill and len(run.killed) == len(run.results):
                recover_next_start(store_db, keydir)
            refunded = store_db.query("SELECT COUNT(*) FROM reservations WHERE state = 'refunded'")
            recovered = refunded[0][0]
            problems += [f"store: {p}" for p in audit(store_db, run)]
            if args.before:
                before_db = create_database(
                    args.database_url, tmp, f"{tag}_before", keydir, seed=False
                )
                dbs.append(before_db)
                old = run_before(args, tmp, before_db, keydir, seconds)
                rows.append(
                    Row(
                        f"store as of {args.before}, {args.processes} x {args.tasks} tasks",
                        old,
                        old.pairs,
                        old.rate,
                        old.latencies,
                    )
                )
                problems += [f"store as of {args.before}: {p}" for p in audit(before_db, old)]
            if not args.kill:
                one_db = create_database(args.database_url, tmp, f"{tag}_one", keydir)
                dbs.append(one_db)
                one = run_workers("store", one_db.url, keydir, 1, 1, seconds / 4, False)
                rows.append(Row("store, 1 x 1 task", one, one.pairs, one.rate, one.latencies))
                problems += [f"store, 1 task: {p}" for p in audit(one_db, one)]
            raw_db = create_database(args.database_url, tmp, f"{tag}_raw", keydir)
            dbs.append(raw_db)
            if postgres:
                raw = run_workers(
                    "raw", raw_db.url, keydir, args.processes, args.tasks, seconds, False
                )
                rows.append(
                    Row(
                        f"raw asyncpg, store SQL, {args.processes} x {args.tasks}",
                        None,
                        raw.pairs,
                        raw.rate,
                        raw.latencies,
                    )
                )
                problems += [f"raw: {p}" for p in audit(raw_db, None, raw.pairs)]
                before = balances(raw_db)
                bare = run_workers(
                    "bare", raw_db.url, keydir, args.processes, args.tasks, seconds, False
                )
                rows.append(
                    Row(
                        f"raw asyncpg, 2 bare UPDATEs, {args.processes} x {args.tasks}",
                        None,
                        bare.pairs,
                        bare.rate,
                        bare.latencies,
                    )
                )
                problems += [f"bare: {p}" for p in audit_bare(raw_db, before)]
            else:
                count = max(run.pairs, 1000)
                elapsed = raw_sqlite_pairs(Path(raw_db.url.removeprefix("sqlite:///")), count)
                rows.append(Row("raw sqlite3, sync (ceiling)", None, count, count / elapsed, []))
                problems += [f"raw: {p}" for p in audit(raw_db, None, count)]
        finally:
            for db in dbs:
                db.drop()

    engine = "PostgreSQL" if postgres else f"SQLite {sqlite3.sqlite_version}"
    if args.uvloop:
        engine += ", every worker on uvloop"
    print(
        f"reserve+commit pairs (create_job + reserve + commit), {USERS} users, {engine}, "
        f"{seconds:g} s a run"
    )
    print(f"machine: {machine()}")
    print()
    print(
        table(
            ["run", "pairs", "pairs/s", "p50 ms", "p99 ms"],
            [
                [
                    row.name,
                    row.pairs,
                    f"{row.rate:.0f}",
                    f"{percentile(row.latencies, 0.5) * 1e3:.2f}" if row.latencies else "-",
                    f"{percentile(row.latencies, 0.99) * 1e3:.2f}" if row.latencies else "-",
                ]
                for row in rows
            ],
        )
    )
    ours = rows[0].rate
    ceiling = next(row for row in rows if row.run is None)
    print(f"ours/raw: {ours / ceiling.rate:.2f}")
    if args.before:
        print(f"ours/before: {ours / rows[1].rate:.2f}")
    missed = False
    if args.kill:
        print(f"recovery refunded {recovered} reservation(s) the killed worker left open")
    if postgres and not args.kill and args.tasks == 100 and args.processes in GOALS:
        goal = GOALS[args.processes]
        ok = ours >= goal
        missed |= not ok
        print(
            f"goal: >= {goal:.0f} pairs/s with {args.processes} process(es): "
            f"{ours:.0f} ({'ok' if ok else 'MISSED'})"
        )
    if problems:
        print("ledger NOT exact:")
        for problem in problems[:20]:
            print(f"  {problem}")
        return 1
    print("ledger exact: yes (every database audited with plain SQL)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
