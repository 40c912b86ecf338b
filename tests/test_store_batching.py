"""Fewer trips to the database for the same results (issue 15, "Speed").

SQLite queues every call, reads included, and runs what was queued by then in one trip to its
thread; PostgreSQL sends a rule's writes as one statement (`Tx.writes`), commits a whole
reservation in one statement, keeps pooled sessions as they are between borrowers, and gives
each call one deadline.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from bot import errors
from bot.secrets import KeyBox
from bot.store import Store
from bot.store import postgres as pg
from bot.store.engine import Tx
from bot.store.sql import SQL_INSERT_LEDGER, SQL_TAKE_BALANCE
from bot.store.sqlite import SqliteEngine
from tests.test_store import new_job

DAY = date(2025, 3, 1)


@pytest.fixture
async def store(store_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.connect(store_url, keybox=KeyBox.load(tmp_path))
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "db.sqlite3", keybox=KeyBox.load(tmp_path))
    try:
        yield opened
    finally:
        await opened.close()


def count_trips(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    engine = store.engine
    assert isinstance(engine, SqliteEngine)
    trips = [0]
    call = engine.call

    async def counted(fn: Any) -> Any:
        trips[0] += 1
        return await call(fn)

    monkeypatch.setattr(engine, "call", counted)
    return trips


async def test_sqlite_runs_reads_and_writes_queued_together_in_one_trip_in_order(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await sqlite_store.user("t", "1")
    engine = sqlite_store.engine
    trips = count_trips(sqlite_store, monkeypatch)
    read = "SELECT granted FROM users WHERE id = ?"
    before, changed, after, again, credits = await asyncio.gather(
        engine.read(read, (user.id,)),
        engine.execute("UPDATE users SET granted = 5 WHERE id = ?", (user.id,)),
        engine.read(read, (user.id,)),
        engine.read(read, (user.id,)),
        sqlite_store.credits(user.id, DAY, 0),
    )
    assert trips[0] == 1
    # Each read sees what was queued before it: the same read on both sides of a write is
    # not answered from the first.
    assert (before[0][0], changed, after[0][0], again[0][0], credits.balance) == (0, 1, 5, 5, 5)


async def test_sqlite_same_read_queued_twice_gives_each_caller_its_own_rows(
    sqlite_store: Store,
) -> None:
    user = await sqlite_store.user("t", "1")
    engine = sqlite_store.engine
    sql = "SELECT id FROM users WHERE id = ?"
    first, second = await asyncio.gather(engine.read(sql, (user.id,)), engine.read(sql, (user.id,)))
    first.clear()
    assert [row[0] for row in second] == [user.id]


async def test_sqlite_a_failing_call_in_a_trip_fails_alone(sqlite_store: Store) -> None:
    user = await sqlite_store.user("t", "1")
    bad_read, bad_write, granted, credits = await asyncio.gather(
        sqlite_store.engine.read("SELECT nope FROM users"),
        sqlite_store.engine.execute("UPDATE nowhere SET x = 1"),
        sqlite_store.grant(user.id, 3),
        sqlite_store.credits(user.id, DAY, 0),
        return_exceptions=True,
    )
    assert isinstance(bad_read, sqlite3.OperationalError)
    assert isinstance(bad_write, sqlite3.OperationalError)
    assert granted == 3
    assert not isinstance(credits, BaseException)
    assert (await sqlite_store.credits(user.id, DAY, 0)).balance == 3


async def test_writes_step_reports_each_row_count_and_rolls_back_with_its_transaction(
    store: Store,
) -> None:
    user = await store.user("t", "1")

    async def step(tx: Tx) -> list[int]:
        counts = await tx.writes(
            (SQL_INSERT_LEDGER, (None, user.id, "grant", 0, 0, None, 0.0, "step", None)),
            # Guarded: the user has nothing to take.
            (SQL_TAKE_BALANCE, (1, user.id, 1)),
        )
        if counts[1] != 1:
            raise errors.InsufficientCreditsError(needed=1, left=0)
        return counts

    with pytest.raises(errors.InsufficientCreditsError):
        await store._write(step)
    rows = await store.engine.read("SELECT COUNT(*) FROM ledger WHERE note = 'step'")
    assert rows[0][0] == 0


async def test_reservation_takes_allowance_balance_and_group_in_one_step(store: Store) -> None:
    user = await store.user("t", "1")
    await store.grant(user.id, 2)
    job = await store.create_job(
        user_id=user.id,
        platform="t",
        chat_id="c",
        group_key="t:g",
        kind="draw",
        prompt="p",
        options={},
        ref_count=0,
        own_key=False,
    )
    await store.reserve(job, user_id=user.id, cost=3, day=DAY, daily_allowance=1, group_key="t:g")
    credits = await store.credits(user.id, DAY, 1)
    assert (credits.daily_used, credits.balance) == (1, 0)
    assert await store.group_used("t:g", DAY) == 3
    # Refused by the group's cap: nothing taken.
    other = await new_job(store, user.id)
    await store.grant(user.id, 5)
    with pytest.raises(errors.GroupCapReachedError):
        await store.reserve(
            other, user_id=user.id, cost=1, day=DAY, daily_allowance=1, group_key="t:g", group_cap=3
        )
    assert (await store.credits(user.id, DAY, 1)).balance == 5


async def test_whole_and_partial_commits_settle_exactly_once(store: Store) -> None:
    user = await store.user("t", "1")
    await store.grant(user.id, 10)
    whole, partial = await new_job(store, user.id), await new_job(store, user.id)
    for job in (whole, partial):
        await store.reserve(job, user_id=user.id, cost=3, day=DAY, daily_allowance=0)
    assert await store.commit(whole, amount=3)
    assert await store.commit(partial, amount=1)
    assert not await store.commit(whole)
    assert not await store.commit(partial, amount=1)
    rows = await store.engine.read(
        "SELECT job_id, kind, daily_amount + balance_amount FROM ledger"
        " WHERE job_id IS NOT NULL ORDER BY id"
    )
    assert [tuple(row) for row in rows] == [
        (whole, "reserve", 3),
        (partial, "reserve", 3),
        (whole, "commit", 3),
        (partial, "commit", 1),
        (partial, "refund", 2),
    ]
    assert (await store.credits(user.id, DAY, 0)).balance == 6


async def test_commit_of_an_unreserved_job_changes_nothing(store: Store) -> None:
    user = await store.user("t", "1")
    job = await new_job(store, user.id)
    assert not await store.commit(job)
    assert not await store.commit(job, amount=0)
    rows = await store.engine.read("SELECT COUNT(*) FROM ledger WHERE job_id IS NOT NULL")
    assert rows[0][0] == 0


def test_fused_statement_numbers_parameters_on_from_one_statement_to_the_next() -> None:
    sql = pg.fused(
        (
            ("UPDATE a SET x = ? WHERE id = ?", 2),
            ("INSERT INTO b (p, q) VALUES (?, 'it''s ?') ON CONFLICT DO UPDATE SET q = ?3", 3),
        )
    )
    assert "UPDATE a SET x = $1 WHERE id = $2 RETURNING 1" in sql
    assert "VALUES ($3, 'it''s ?') ON CONFLICT DO UPDATE SET q = $5 RETURNING 1" in sql
    assert sql.endswith("SELECT (SELECT COUNT(*) FROM w0), (SELECT COUNT(*) FROM w1)")


async def test_postgres_transaction_left_open_is_rolled_back_before_the_next_borrower(
    pg_url: str, tmp_path: Path
) -> None:
    store = await Store.connect(pg_url, keybox=KeyBox.load(tmp_path))
    try:
        user = await store.user("t", "1")
        loop = asyncio.get_running_loop()
        handler = loop.get_exception_handler()
        loop.set_exception_handler(lambda loop, context: None)  # asyncpg reports it there

        async def leave_open(tx: Tx) -> None:
            await tx.execute("BEGIN")
            await tx.execute("UPDATE users SET granted = 99 WHERE id = ?", user.id)

        try:
            await store.engine.session(leave_open)
        finally:
            loop.set_exception_handler(handler)
        rows = await store.engine.read("SELECT granted FROM users WHERE id = ?", (user.id,))
        assert rows[0][0] == 0
    finally:
        await store.close()


async def test_postgres_call_past_its_deadline_times_out_and_is_transient(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await Store.connect(pg_url, keybox=KeyBox.load(tmp_path))
    try:
        monkeypatch.setattr(pg, "CALL_TIMEOUT", 0.2)
        with pytest.raises(TimeoutError) as raised:
            await store.engine.read("SELECT pg_sleep(2)")
        assert store.is_transient(raised.value)
        monkeypatch.setattr(pg, "CALL_TIMEOUT", 60.0)
        assert (await store.engine.read("SELECT 1"))[0][0] == 1
    finally:
        await store.close()


async def test_sqlite_single_write_refused_in_a_batch_undoes_only_itself(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await sqlite_store.user("t", "1")
    engine = sqlite_store.engine
    trips = count_trips(sqlite_store, monkeypatch)
    duplicate = "INSERT INTO users (platform, platform_user_id, created_at) VALUES ('t', '1', 0)"
    first, refused, last = await asyncio.gather(
        engine.execute("UPDATE users SET granted = 4 WHERE id = ?", (user.id,)),
        engine.execute(duplicate),
        engine.execute("UPDATE users SET lang = 'de' WHERE id = ?", (user.id,)),
        return_exceptions=True,
    )
    assert trips[0] == 1
    assert isinstance(refused, sqlite3.IntegrityError)
    assert (first, last) == (1, 1)
    rows = await engine.read("SELECT granted, lang FROM users WHERE id = ?", (user.id,))
    assert tuple(rows[0]) == (4, "de")


async def test_a_bursts_job_updates_made_together_land_as_made_one_by_one(
    store: Store, store_url: str
) -> None:
    """On PostgreSQL a job's life (running, charge and upstream time, finished, its slot freed)
    is written for many jobs at once (`postgres.BATCHED`): each job's row ends as if its
    own statements had run alone, a finished job is left alone, and slots go back."""
    from tests.databases import Raw

    user = (await store.user("qq", "1")).id
    jobs = [await new_job(store, user) for _ in range(12)]
    await store.start_process("qq")
    slots = await store.acquire_slots("main", 12, jobs)
    assert slots == list(range(12))

    await asyncio.gather(*(store.mark_running(job, "main") for job in jobs))
    # One job finishes early (cancelled): nothing later may reopen or rewrite it.
    await store.finish_job(jobs[0], status="cancelled", error_kind="cancelled")
    # The charge, with the upstream's answer time (as the job runner records it) or without.
    await asyncio.gather(
        *(
            store.mark_delivering(job, charge=n % 3, eta_class="main|1k|auto|draw" if n else None)
            for n, job in enumerate(jobs)
        ),
        *(store.release_slot("main", slot) for slot in slots if slot is not None),
    )
    await asyncio.gather(
        *(
            store.finish_job(
                job,
                status="succeeded",
                usage={"total_tokens": n},
                outputs=[{"n": n}],
                # None keeps the provider the job ran on.
                provider=None if n % 2 else "fallback",
            )
            for n, job in enumerate(jobs)
        )
    )

    raw = Raw(store_url)
    try:
        rows = {
            row[0]: row[1:]
            for row in raw.query(
                "SELECT id, status, provider, charge, eta_class, error_kind, usage,"
                " started_at IS NOT NULL, finished_at IS NOT NULL,"
                " upstream_done_at >= started_at FROM jobs"
            )
        }
        assert raw.value("SELECT COUNT(*) FROM provider_slots") == 0
    finally:
        raw.close()
    assert rows[jobs[0]] == ("cancelled", "main", None, None, "cancelled", None, True, True, None)
    for n, job in enumerate(jobs[1:], start=1):
        provider = "main" if n % 2 else "fallback"
        assert rows[job] == (
            "succeeded",
            provider,
            n % 3,
            "main|1k|auto|draw",
            None,
            json.dumps({"total_tokens": n}, separators=(",", ":")),
            True,
            True,
            True,
        ), (n, rows[job])


# --- reservations asked together (`ledger.reserve_many`) ---


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each batch of reservations decided together, by `ledger.reserve_many`
    (SQLite) or PostgreSQL's `drawbridge_open_many` (`Store._open_many`), and taken by the
    database: a batch it refused, then made one by one, is not counted."""
    from bot.store import ledger

    batches: list[int] = []
    reserve_many = ledger.reserve_many
    open_many = Store._open_many

    async def counted(tx: Tx, dialect: Any, asks: Any, fresh: Any = ()) -> Any:
        decided = await reserve_many(tx, dialect, asks, fresh)
        batches.append(len(asks))
        return decided

    async def counted_server_side(store: Store, asks: Any) -> Any:
        decided = await open_many(store, asks)
        batches.append(len(asks))
        return decided

    monkeypatch.setattr(ledger, "reserve_many", counted)
    monkeypatch.setattr(Store, "_open_many", counted_server_side)
    return batches


async def reservation_scenario(store: Store) -> list[tuple[int, int, int, dict[str, Any]]]:
    """Users, groups and jobs on which every outcome of a reservation shows up; the asks, in
    order: (job, user, cost, reserve's other arguments)."""
    a = (await store.user("qq", "a")).id
    b = (await store.user("qq", "b")).id
    c = (await store.user("qq", "c")).id
    d = (await store.user("qq", "d")).id
    linked = (await store.user("tg", "a-too")).id
    await store.grant(a, 2, by_user_id=None, note="")
    await store.set_daily_allowance(b, 1)  # b's own allowance replaces the configured 3
    await store.set_group_rule("g1", "cap", 3)  # g1's own cap; g2 has the global one only
    await store.link(await store.create_link_code(a), linked, DAY)  # raises if refused
    plain, g1, g2 = {}, {"group_key": "g1"}, {"group_key": "g2", "group_cap": 2}
    later = {"day": date(2025, 3, 2)}
    asks: list[tuple[int, int, int, dict[str, Any]]] = []
    for user, cost, where in [
        (a, 2, plain),  # allowance
        (a, 2, plain),  # the allowance's last credit and one of the balance
        (a, 2, plain),  # insufficient: 1 left
        (a, 1, plain),  # the balance's last
        (a, 1, later),  # another day, another allowance
        (a, 0, plain),  # free (own key): still reserved, nothing taken
        (b, 1, g1),
        (b, 1, g1),  # insufficient: b's own allowance is 1
        (c, 1, g1),
        (c, 2, g1),  # over g1's own cap of 3
        (c, 1, g1),
        (d, 1, g2),
        (d, 2, g2),  # over the global cap of 2
        (d, 1, g2),
    ]:
        job = await new_job(store, user, group_key=where.get("group_key"))
        asks.append((job, user, cost, where))
    done = await new_job(store, a)
    await store.finish_job(done, status="failed", error_kind="x")
    reserved = await new_job(store, b)
    await store.reserve(reserved, user_id=b, cost=0, day=DAY, daily_allowance=3)
    asks += [
        (asks[0][0], a, 1, plain),  # the same job again, in the same batch
        (reserved, b, 1, plain),  # reserved before
        (done, a, 1, plain),  # not queued
        (asks[6][0], a, 1, plain),  # b's job
        (10_000, a, 1, plain),  # no such job
        (await new_job(store, linked), linked, 1, plain),  # linked into a: a's row pays
    ]
    return asks


# What `reservation_scenario`'s first six asks, all the account a's, say.
A_SAYS = [
    "left 3",
    "left 1",
    "InsufficientCreditsError: insufficient_credits",
    "left 0",
    "left 2",
    "left 0",
]


async def reserve_asks(
    store: Store, asks: list[tuple[int, int, int, dict[str, Any]]], *, together: bool
) -> list[str]:
    async def one(job: int, user: int, cost: int, where: dict[str, Any]) -> str:
        day = where.get("day", DAY)
        others = {k: v for k, v in where.items() if k != "day"}
        try:
            left = await store.reserve(
                job, user_id=user, cost=cost, day=day, daily_allowance=3, **others
            )
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return f"left {left}"

    if together:
        return list(await asyncio.gather(*(one(*ask) for ask in asks)))
    return [await one(*ask) for ask in asks]


def money_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    from tests.databases import Raw

    raw = Raw(url)
    try:
        return {
            "users": raw.query("SELECT id, granted FROM users ORDER BY id"),
            "daily": raw.query("SELECT user_id, day, used FROM daily_usage ORDER BY 1, 2"),
            "groups": raw.query(
                "SELECT group_key, day, used FROM group_usage WHERE used > 0 ORDER BY 1, 2"
            ),
            "reservations": raw.query(
                "SELECT job_id, user_id, daily_amount, balance_amount, day, group_key, state"
                " FROM reservations ORDER BY job_id"
            ),
            "ledger": raw.query(
                "SELECT job_id, user_id, kind, daily_amount, balance_amount, day, note"
                " FROM ledger ORDER BY id"
            ),
        }
    finally:
        raw.close()


async def test_reservations_asked_together_are_decided_as_made_one_by_one(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.databases import database_url

    engine = "postgresql" if store_url.startswith("postgresql") else "sqlite"
    batches = count_batches(monkeypatch)
    async with database_url(engine, tmp_path / "alone") as alone_url:
        outcomes = {}
        for url, together in [(store_url, True), (alone_url, False)]:
            store = await Store.connect(url, keybox=KeyBox.load(tmp_path))
            try:
                asks = await reservation_scenario(store)
                outcomes[together] = await reserve_asks(store, asks, together=together)
            finally:
                await store.close()
        assert batches == [len(asks)], "the asks made together went in one transaction"
        assert outcomes[True] == outcomes[False]
        assert money_rows(store_url) == money_rows(alone_url)
    said = outcomes[True]
    assert said[:6] == A_SAYS
    assert said[7] == said[2] and said[9].startswith("GroupCapReachedError")
    assert said[12].startswith("GroupCapReachedError") and said[13] == "left 1"
    assert [s.split(":")[0] for s in said[14:]] == [
        "ReservationError",  # the same job again
        "ReservationError",  # reserved before
        "ReservationError",  # not queued
        "ReservationError",  # someone else's job
        "NotFoundError",
        "ReservationError",  # linked
    ]


async def test_reservations_whose_batch_fails_are_made_one_by_one_and_nothing_half_written(
    store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asks = await reservation_scenario(store)
    from bot.store.sqlite import SqliteTx

    failed = []
    if store_url.startswith("postgresql"):
        # The batch's one call fails once it has written everything (each of its rows then
        # divides by zero), as a concurrent writer's row could make it fail.
        call = pg.DIALECT.open_many_call
        failing_call = f"SELECT * FROM ({call}) AS made WHERE made.n / (made.n - made.n) = 1"
        monkeypatch.setattr(
            pg.PostgresEngine, "dialect", replace(pg.DIALECT, open_many_call=failing_call)
        )
        open_many = Store._open_many

        async def spied(self: Store, asks: Any) -> Any:
            try:
                return await open_many(self, asks)
            except Exception as error:
                failed.append(error)
                raise

        monkeypatch.setattr(Store, "_open_many", spied)
    else:
        writes_many = SqliteTx.writes_many

        def failing(self: Any, *steps: Any) -> Any:
            # The batch's writes refuse (as a concurrent writer's row could make them).
            if any(sql is SQL_INSERT_LEDGER for sql, _ in steps) and not failed:
                failed.append(len(steps))
                raise sqlite3.IntegrityError("refused under us")
            return writes_many(self, *steps)

        monkeypatch.setattr(SqliteTx, "writes_many", failing)
    said = await reserve_asks(store, asks, together=True)
    assert failed, "the batch's ledger write ran, and failed"
    assert said[:6] == A_SAYS
    rows = money_rows(store_url)
    # One reservation and one reserve row per reservation made: the failed batch left none.
    made = [s for s in said if s.startswith("left")]
    assert len(rows["reservations"]) == len(made) + 1  # and the one reserved beforehand
    assert [r[2] for r in rows["ledger"]].count("reserve") == len(made) + 1


async def three_reservations_asked(
    store: Store, *, allowance: int
) -> tuple[int, list[int], list[asyncio.Future[int]]]:
    """A user's three new jobs, each asked to reserve 1 credit at once (not yet batched)."""
    user = (await store.user("qq", "1")).id
    jobs = [await new_job(store, user) for _ in range(3)]
    asked = [
        asyncio.ensure_future(
            store.reserve(job, user_id=user, cost=1, day=DAY, daily_allowance=allowance)
        )
        for job in jobs
    ]
    return user, jobs, asked


async def test_a_reservation_whose_caller_is_cancelled_is_still_refunded_whole(
    store: Store, store_url: str
) -> None:
    user, jobs, asked = await three_reservations_asked(store, allowance=3)
    await asyncio.sleep(0)  # asked, in a batch not yet written
    asked[1].cancel()
    # The refund comes after the reservation it would otherwise have run before.
    assert await store.refund(jobs[1], "cancelled") is True
    # Each said what it left when made, together, before the refund.
    assert [await asked[0], await asked[2]] == [2, 0]
    rows = money_rows(store_url)
    assert [r[-1] for r in rows["reservations"]] == ["reserved", "refunded", "reserved"]
    assert rows["daily"] == [(user, DAY.isoformat(), 2)]


async def test_jobs_opened_together_are_written_and_charged_as_one_by_one(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Store.open_job`: a job written with its charge, many in one transaction when asked
    together, each as `create_job` then `reserve` would, refusals leaving the job queued."""
    from tests.databases import Raw, database_url

    batches = count_batches(monkeypatch)

    async def scenario(store: Store, together: bool) -> list[str]:
        a = (await store.user("qq", "a")).id
        b = (await store.user("qq", "b")).id
        before = await new_job(store, a)  # a job written first (an /edit's), reserved below

        async def opened(user: int, cost: int, group: str | None) -> Any:
            # Awaited in a task as the job runner does, so the five are asked in this order.
            return await store.open_job(
                user_id=user,
                platform="qq",
                chat_id="g1" if group else "c",
                group_key=group,
                kind="draw",
                prompt=f"a fox for {cost}",
                options={"n": cost},
                ref_count=0,
                own_key=False,
                cost=cost,
                day=DAY,
                daily_allowance=3,
                charged_group=group,
                group_cap=1,
            )

        calls = [
            lambda: opened(a, 2, None),
            lambda: store.reserve(before, user_id=a, cost=1, day=DAY, daily_allowance=3),
            lambda: opened(a, 1, None),  # insufficient by now: the job stays, queued
            lambda: opened(b, 1, "g1"),
            lambda: opened(b, 1, "g1"),  # over the group's cap of 1
        ]
        if together:
            results = await asyncio.gather(*(call() for call in calls))
        else:
            results = [await call() for call in calls]
        return [repr(r) if not isinstance(r, tuple) else f"{r[0]}: {r[1]!r}" for r in results]

    said = {}
    async with database_url(
        "postgresql" if store_url.startswith("postgresql") else "sqlite", tmp_path / "alone"
    ) as alone_url:
        for url, together in [(store_url, True), (alone_url, False)]:
            store = await Store.connect(url, keybox=KeyBox.load(tmp_path))
            try:
                said[together] = await scenario(store, together)
            finally:
                await store.close()
        assert batches == [5], "the five asked together were written in one transaction"
        assert said[True] == said[False]
        assert money_rows(store_url) == money_rows(alone_url)
        jobs = []
        for url in (store_url, alone_url):
            raw = Raw(url)
            try:
                jobs.append(
                    raw.query(
                        "SELECT id, user_id, chat_id, group_key, kind, prompt, options, status,"
                        " process_id FROM jobs ORDER BY id"
                    )
                )
            finally:
                raw.close()
        assert jobs[0] == jobs[1]
    assert said[True][0] == "2: 1"  # job 2, 1 credit left
    assert said[True][1] == "0"  # the job written first: 0 left
    assert said[True][2].startswith("3: InsufficientCreditsError")
    assert said[True][3] == "4: 2" and said[True][4].startswith("5: GroupCapReachedError")
    assert [row[7] for row in jobs[0]] == ["queued"] * 5  # refused ones too: the caller settles


async def test_closing_the_store_lets_the_reservations_already_asked_land(
    store: Store, store_url: str
) -> None:
    _, _, asked = await three_reservations_asked(store, allowance=5)
    await asyncio.sleep(0)  # asked, in a batch not yet written
    await store.close()  # a shutdown: what was asked before it is made, not refused

    assert [await a for a in asked] == [4, 3, 2]
    assert [r[-1] for r in money_rows(store_url)["reservations"]] == ["reserved"] * 3


def open_fields(user: int, n: int, cost: int = 1) -> dict[str, Any]:
    """`Store.open_job`'s arguments for a plain draw of `user`'s."""
    return {
        "user_id": user,
        "platform": "qq",
        "chat_id": "c1",
        "group_key": None,
        "kind": "draw",
        "prompt": f"a fox {n}",
        "options": {"n": 1},
        "ref_count": 0,
        "own_key": False,
        "cost": cost,
        "day": DAY,
        "daily_allowance": 1000,
    }


async def test_jobs_opened_at_once_add_no_task_each(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst's draws (issue 15: 500 at one instant) each ask for their job and charge with
    no task of their own (each would be one more step of the event loop per command); they
    are made in batches, in the order asked."""
    batches = count_batches(monkeypatch)
    users = [(await store.user("qq", f"u{i}")).id for i in range(30)]
    before = len(asyncio.all_tasks())
    opened = [store.open_job(**open_fields(users[n % 30], n)) for n in range(600)]
    assert len(asyncio.all_tasks()) - before == 1, "one task drains the batch, none per job"
    answers = await asyncio.gather(*opened)
    size = store._engine.dialect.reserve_batch  # 1024 on PostgreSQL, 256 on SQLite
    assert batches == [min(size, 600 - k) for k in range(0, 600, size)]
    assert sorted(job for job, _ in answers) == list(range(1, 601))
    # Each user's 20 jobs, in the order asked: 999 left after the first, 980 after the last.
    left = [outcome for job, outcome in answers if job % 30 == 1]
    assert left == list(range(999, 979, -1))


async def test_a_batch_counts_a_groups_usage_another_process_inserts_meanwhile(
    store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: another process is inserting today's usage row of group g9 (2 of its cap
    of 3 used) when a batch of reservations charges g9. The batch waits for that row and
    counts it: the first ask fits the cap, the second is refused. A batch that read the
    usage without waiting for the row would let both through."""
    if not store_url.startswith("postgresql"):
        pytest.skip("SQLite writers take the file's lock first: nobody inserts meanwhile")
    import asyncpg

    batches = count_batches(monkeypatch)
    users = [(await store.user("qq", name)).id for name in ("a", "b")]
    jobs = [await new_job(store, user, group_key="g9") for user in users]
    other = await asyncpg.connect(store_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO group_usage (group_key, day, used) VALUES ('g9', $1, 2)", DAY.isoformat()
        )
        asked = [
            asyncio.ensure_future(
                store.reserve(
                    job,
                    user_id=user,
                    cost=1,
                    day=DAY,
                    daily_allowance=3,
                    group_key="g9",
                    group_cap=3,
                )
            )
            for job, user in zip(jobs, users, strict=True)
        ]
        await asyncio.sleep(0.3)  # the batch waits on the row being inserted
        assert not any(a.done() for a in asked)
        await tx.commit()
        said = await asyncio.gather(*asked, return_exceptions=True)
    finally:
        await other.close()
    assert said[0] == 2
    assert isinstance(said[1], errors.GroupCapReachedError)
    assert batches == [2]


async def test_postgres_bot_pool_is_open_and_knows_every_batched_type_before_a_burst(
    pg_url: str, tmp_path: Path
) -> None:
    # `drawbridge run` opens its store with every pooled connection made (`open_store`), and
    # each connection learns the batched statements' array types when made: a burst's first
    # statements wait for neither a connect nor asyncpg's type lookup (jit off, pg_type, jit
    # back: ~7 ms a connection).
    store = await Store.connect(pg_url, keybox=KeyBox.load(tmp_path), full_pool=True)
    try:
        engine = store.engine
        assert isinstance(engine, pg.PostgresEngine)
        assert engine._pool.get_size() == pg.POOL_SIZE
        statements = [*pg.BATCHED.values(), *pg.MANY.values()]
        assert set(pg._array_types(*statements)) == {
            "bigint",
            "double precision",
            "integer",
            "text",
        }
        held = [await engine._pool.acquire() for _ in range(pg.POOL_SIZE)]
        try:
            for con in held:
                seen: list[str] = []
                con.add_query_logger(lambda query, seen=seen: seen.append(query.query))
                async with con.transaction():
                    for sql in statements:
                        await con.prepare(sql)
                assert not [q for q in seen if "pg_type" in q or "set_config('jit'" in q]
                assert seen  # the logger sees this connection (its BEGIN, at least)
        finally:
            for con in held:
                await engine._pool.release(con)
        # A store opened for a command (not `drawbridge run`) keeps the small pool.
        small = await Store.connect(pg_url, keybox=KeyBox.load(tmp_path))
        try:
            assert isinstance(small.engine, pg.PostgresEngine)
            assert small.engine._pool.get_size() < pg.POOL_SIZE
        finally:
            await small.close()
    finally:
        await store.close()


async def test_postgres_batches_of_any_size_reuse_one_prepared_statement(
    pg_url: str, tmp_path: Path
) -> None:
    # asyncpg prepares each statement text once per connection and keeps it (the server too).
    # A burst's slot takings, group reads and credit reads come in batches of every size:
    # a VALUES or IN list per size was a new statement to prepare each time (a round trip,
    # 18-27 of them in bench/load.py's burst) and to keep, pushing out the ones in use.
    store = await Store.connect(pg_url, keybox=KeyBox.load(tmp_path))
    try:
        await store.start_process("qq")
        users = [await store.user("qq", f"u{n}") for n in range(4)]
        for size in range(1, 5):
            jobs = list(range(100 * size, 100 * size + size))
            assert await store.acquire_slots("main", 10, jobs) == list(range(size))
            for slot in range(size):
                await store.release_slot("main", slot)
            groups = await store.group_rules_of([f"qq:g{n}" for n in range(size)])
            assert len(groups) == size
            credits = await store.credits_of([u.id for u in users[:size]], date.today(), 5)
            assert sorted(credits) == sorted(u.id for u in users[:size])
        engine = store.engine
        assert isinstance(engine, pg.PostgresEngine)
        held = [await engine._pool.acquire() for _ in range(engine._pool.get_size())]
        try:
            texts: set[str] = set()
            for con in held:
                texts.update(
                    row[0]
                    for row in await con.fetch("SELECT statement FROM pg_prepared_statements")
                )
        finally:
            for con in held:
                await engine._pool.release(con)
        for start in (
            "INSERT INTO provider_slots",
            "SELECT * FROM group_rules",
            "SELECT u.id, u.granted",
        ):
            found = [text for text in texts if text.strip().startswith(start)]
            assert len(found) == 1, (start, found)
    finally:
        await store.close()
