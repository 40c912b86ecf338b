"""Several drawbridge processes on one database, as several `Store` objects on one schema (or
one SQLite file): each has its own connections (an asyncpg pool, a sqlite3 connection), so
they share nothing but the database, like processes on different hosts.

- reservations from every process at once never overspend, with grants, commits, refunds
  and a /link in the mix, and the ledger stays exact;
- recovery settles only the jobs of dead processes (stale heartbeat, clean stop) and of no
  process, never a live one's;
- a provider's slots are shared: never more than `capacity` held in all, a dead process's
  taken over, released ones reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import date
from pathlib import Path

import pytest

from bot.errors import GroupCapReachedError, InsufficientCreditsError
from bot.secrets import KeyBox
from bot.store import Credits, Store
from tests.databases import Raw
from tests.test_store import assert_ledger_exact, new_job, reserve

DAY = date(2025, 3, 1)
ALLOWANCE = 3
OpenStore = Callable[[], Awaitable[Store]]


@pytest.fixture
async def open_store(store_url: str, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Open another "process" on the test's database; all are closed after the test."""
    keybox = KeyBox.load(tmp_path / "data")
    opened: list[Store] = []

    async def open_one() -> Store:
        store = await Store.connect(store_url, keybox=keybox)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
def raw(store_url: str) -> Iterator[Raw]:
    r = Raw(store_url)
    yield r
    r.close()


async def started(open_store: OpenStore, platforms: str, silence: float = 60.0) -> Store:
    """Another process, registered: its heartbeat may lapse `silence` seconds."""
    store = await open_store()
    await store.start_process(platforms, timeout=silence)
    return store


# --- one wallet, many processes ---


async def test_reservations_from_three_processes_never_overspend_and_the_ledger_stays_exact(
    open_store: OpenStore, raw: Raw
) -> None:
    rng = random.Random(15)
    stores = [await started(open_store, f"p{n}") for n in range(3)]
    first = stores[0]
    users = [(await first.user("qq", str(n))).id for n in range(4)]
    # /link in the mix: Telegram 100 (its account charged throughout) is joined by QQ 200
    # midway; after that, draws through QQ 200 are charged to the one account.
    tg = await first.user("telegram", "100")
    joining = await first.user("qq", "200")
    granted: Counter[int] = Counter()
    for uid in (*users, tg.id):
        granted[uid] = rng.randint(0, 10)
        await first.grant(uid, granted[uid])
    await first.grant(joining.id, 7)
    granted[tg.id] += 7  # moves with the link
    code = await first.create_link_code(tg.identity_id)
    linked = asyncio.Event()
    spent: Counter[int] = Counter()
    outcomes: Counter[str] = Counter()

    async def draw(store: Store, uid: int, cost: int) -> None:
        job_id = await new_job(store, uid, group_key="qq:g")
        try:
            await store.reserve(
                job_id,
                user_id=uid,
                cost=cost,
                day=DAY,
                daily_allowance=ALLOWANCE,
                group_key="qq:g",
            )
        except InsufficientCreditsError:
            await store.finish_job(job_id, status="failed", error_kind="insufficient_credits")
            outcomes["refused"] += 1
            return
        await asyncio.sleep(rng.random() * 0.01)
        settle = rng.choice(["commit", "refund", "partial"])
        if settle == "commit":
            assert await store.commit(job_id)
            spent[uid] += cost
        elif settle == "partial":
            amount = rng.randint(0, cost)
            assert await store.commit(job_id, amount=amount)
            spent[uid] += amount
        else:
            assert await store.refund(job_id, "failed")
        await store.finish_job(job_id, status="succeeded" if settle != "refund" else "failed")
        outcomes[settle] += 1

    async def task(n: int) -> None:
        store = stores[n % 3]
        await asyncio.sleep(rng.random() * 0.05)
        pick = rng.random()
        if pick < 0.05:
            uid = rng.choice(users)
            await store.grant(uid, 2, note="top-up during the storm")
            granted[uid] += 2
        elif pick < 0.25:
            await draw(store, tg.id, rng.randint(1, 4))
        elif pick < 0.35:
            await linked.wait()
            # Read through the joining identity now: the account it belongs to.
            await draw(store, (await store.user("qq", "200")).id, rng.randint(1, 4))
        else:
            await draw(store, rng.choice(users), rng.randint(1, 4))

    async def link() -> None:
        await asyncio.sleep(0.02)
        result = await stores[2].link(code, joining.identity_id, DAY)
        assert result.account_id == tg.id and result.moved == 7
        linked.set()

    await asyncio.gather(link(), *(task(n) for n in range(150)))

    # Both paths were taken (which draws settle how depends on the interleaving).
    assert outcomes["refused"] > 5 and outcomes["commit"] + outcomes["partial"] > 5, outcomes
    for uid in (*users, tg.id):
        credits = await stores[1].credits(uid, DAY, ALLOWANCE)
        # What the account had, minus exactly what its settled jobs spent; never below zero.
        assert credits.total_left == granted[uid] + ALLOWANCE - spent[uid], uid
        assert credits.balance >= 0 and credits.daily_used <= ALLOWANCE
    assert (await stores[0].user("qq", "200")).id == tg.id
    counts = assert_ledger_exact(raw)
    assert counts.get("reserved", 0) == 0
    assert counts["reservations"] == sum(outcomes.values()) - outcomes["refused"]


async def test_a_group_cap_holds_for_reservations_from_two_processes_at_once(
    open_store: OpenStore, raw: Raw
) -> None:
    # Each process's reservations made together run as one batch on PostgreSQL: the two
    # batches race for the group's row, and the cap still holds to the credit.
    stores = [await started(open_store, f"p{n}") for n in range(2)]
    users = [(await stores[0].user("qq", str(n))).id for n in range(30)]
    jobs = [await new_job(stores[0], uid, group_key="qq:g") for uid in users]

    outcomes = await asyncio.gather(
        *(
            stores[n % 2].reserve(
                job,
                user_id=users[n],
                cost=1,
                day=DAY,
                daily_allowance=ALLOWANCE,
                group_key="qq:g",
                group_cap=10,
            )
            for n, job in enumerate(jobs)
        ),
        return_exceptions=True,
    )

    # Each reservation that went through says what it left (the allowance less 1).
    assert [o for o in outcomes if isinstance(o, int)] == [ALLOWANCE - 1] * 10
    refused = [o for o in outcomes if not isinstance(o, int)]
    assert all(isinstance(o, GroupCapReachedError) and o.params == {"cap": 10} for o in refused)
    assert await stores[1].group_used("qq:g", DAY) == 10
    assert assert_ledger_exact(raw) == {"reservations": 10, "reserved": 10}


# --- heartbeats and recovery ---


async def test_recovery_waits_for_a_stale_heartbeat_and_settles_only_that_processs_jobs(
    open_store: OpenStore, raw: Raw
) -> None:
    a = await started(open_store, "qq")
    b = await started(open_store, "telegram")
    cli = await open_store()  # no process: the CLI, a test
    user = await a.user("qq", "1")
    await a.grant(user.id, 20)
    running = await reserve(a, user.id, 4)
    await a.mark_running(running, "main")
    queued = await reserve(a, user.id, 1)
    delivered = await reserve(a, user.id, 3, group_key="qq:g")
    await a.mark_running(delivered, "main")
    await a.mark_delivering(delivered, 2)  # handed to the chat; the commit never landed
    own = await reserve(b, user.id, 2)
    await b.mark_running(own, "main")
    orphan = await reserve(cli, user.id, 1)
    assert raw.value("SELECT process_id FROM jobs WHERE id = ?", running) == a.process_id
    assert raw.value("SELECT process_id FROM jobs WHERE id = ?", orphan) is None

    # A beats: B recovers only the job of no process.
    await a.heartbeat()
    assert await b.recover() == [orphan]
    for job_id in (running, queued, delivered, own):
        assert (await b.job(job_id)).ledger_state == "reserved"  # type: ignore[union-attr]

    # A falls silent for longer than the timeout: B settles A's jobs, and nothing of its own.
    raw.execute(
        "UPDATE processes SET heartbeat_at = heartbeat_at - 3600 WHERE id = ?", a.process_id
    )
    assert await b.recover() == sorted([running, queued])
    assert await b.recover() == []
    for job_id in (running, queued):
        job = await b.job(job_id)
        assert job is not None
        assert (job.status, job.error_kind, job.ledger_state) == (
            "failed",
            "interrupted",
            "refunded",
        )
    done = await b.job(delivered)
    assert done is not None
    assert (done.status, done.ledger_state, done.spent) == ("succeeded", "committed", 2)
    mine = await b.job(own)
    assert mine is not None and (mine.status, mine.ledger_state) == ("running", "reserved")
    # A is gone from the registry; B is not.
    assert raw.value("SELECT COUNT(*) FROM processes WHERE id = ?", a.process_id) == 0
    assert raw.value("SELECT COUNT(*) FROM processes WHERE id = ?", b.process_id) == 1
    # The 20 granted, less the 2 the delivered job spent and the 2 B's live job holds.
    assert await b.credits(user.id, DAY, 5) == Credits(5, 0, 16)
    assert assert_ledger_exact(raw) == {
        "reservations": 5,
        "refunded": 3,
        "committed": 1,
        "reserved": 1,
    }


async def test_a_beating_process_keeps_its_jobs_and_a_silent_one_loses_them_after_the_timeout(
    open_store: OpenStore, raw: Raw
) -> None:
    timeout = 0.4
    a = await started(open_store, "qq", timeout)
    b = await started(open_store, "telegram", timeout)
    user = await a.user("qq", "1")
    job_id = await reserve(a, user.id, 2)
    await a.mark_running(job_id, "main")

    async def beat() -> None:
        while True:
            await a.heartbeat()
            await asyncio.sleep(timeout / 8)

    beating = asyncio.create_task(beat())
    try:
        deadline = time.monotonic() + 3 * timeout
        while time.monotonic() < deadline:
            assert await b.recover() == []
            await asyncio.sleep(timeout / 4)
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
    assert (await b.job(job_id)).ledger_state == "reserved"  # type: ignore[union-attr]

    await asyncio.sleep(timeout * 1.5)
    assert await b.recover() == [job_id]
    assert (await b.job(job_id)).ledger_state == "refunded"  # type: ignore[union-attr]
    assert_ledger_exact(raw)


async def test_a_stopped_processs_jobs_are_recovered_at_once(
    open_store: OpenStore, raw: Raw
) -> None:
    a = await started(open_store, "qq")
    b = await started(open_store, "telegram")
    user = await a.user("qq", "1")
    left_behind = await reserve(a, user.id, 2)
    await a.mark_running(left_behind, "main")
    assert await b.recover() == []

    await a.stop_process()
    assert await b.recover() == [left_behind]
    assert (await b.job(left_behind)).ledger_state == "refunded"  # type: ignore[union-attr]
    assert await b.credits(user.id, DAY, 5) == Credits(5, 0, 0)
    assert_ledger_exact(raw)


# --- provider slots shared by every process ---


async def test_slots_are_shared_never_more_than_capacity_in_flight(
    open_store: OpenStore, raw: Raw
) -> None:
    capacity = 3
    stores = [await started(open_store, f"p{n}") for n in range(3)]
    in_flight = 0
    most = 0
    held_slots: set[int] = set()
    served = 0
    # The first holders keep their slots until every slot is held at once, so "all were
    # used" does not depend on how fast a busy machine polls (bounded: a store that never
    # hands out the last slot fails the count below).
    all_held = asyncio.Event()

    async def request(store: Store) -> None:
        nonlocal in_flight, most, served
        # Polled, as the job runner does: the slot may be freed by another process.
        while (slot := await store.acquire_slot("main", capacity, None)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        assert slot not in held_slots, f"slot {slot} handed out twice"
        held_slots.add(slot)
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == capacity:
            all_held.set()
        assert raw.value("SELECT COUNT(*) FROM provider_slots WHERE provider = 'main'") <= capacity
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await all_held.wait()
        await asyncio.sleep(0.01)
        in_flight -= 1
        held_slots.discard(slot)
        await store.release_slot("main", slot)
        served += 1

    await asyncio.gather(*(request(stores[n % 3]) for n in range(30)))
    assert served == 30
    assert most == capacity  # all slots were used, never more
    assert raw.value("SELECT COUNT(*) FROM provider_slots") == 0


async def test_a_dead_processs_slots_are_taken_over_and_released_ones_reused(
    open_store: OpenStore, raw: Raw
) -> None:
    a = await started(open_store, "qq")
    b = await started(open_store, "telegram")
    c = await started(open_store, "discord")
    assert [await a.acquire_slot("main", 2, None) for _ in range(2)] == [0, 1]
    assert await b.acquire_slot("main", 2, None) is None
    assert await b.acquire_slot("other", 2, None) == 0  # another provider's slots

    # A released slot goes to the next process that asks.
    await a.release_slot("main", 1)
    assert await b.acquire_slot("main", 2, None) == 1
    assert await c.acquire_slot("main", 2, None) is None
    # Releasing a slot one does not hold changes nothing.
    await c.release_slot("main", 1)
    assert await c.acquire_slot("main", 2, None) is None

    # A falls silent: its slot is taken over, B's is not.
    raw.execute(
        "UPDATE processes SET heartbeat_at = heartbeat_at - 3600 WHERE id = ?", a.process_id
    )
    assert await c.acquire_slot("main", 2, None) == 0
    holders = dict(raw.query("SELECT slot, process_id FROM provider_slots WHERE provider = 'main'"))
    assert holders == {0: c.process_id, 1: b.process_id}

    # A clean stop frees its slots at once.
    await b.stop_process()
    assert await c.acquire_slot("main", 2, None) == 1
    assert raw.value("SELECT COUNT(*) FROM provider_slots WHERE process_id = ?", b.process_id) == 0


async def test_slots_asked_for_together_are_taken_in_one_go_up_to_the_capacity(
    open_store: OpenStore, raw: Raw
) -> None:
    """A burst's starting jobs take their slots in one transaction (`acquire_slots`): each
    gets its own, those beyond the free ones get None, and each row names its job."""
    a = await started(open_store, "qq")
    b = await started(open_store, "telegram")
    assert await b.acquire_slot("main", 4, 70) == 0
    assert await a.acquire_slots("main", 4, [11, 12, 13, 14, 15]) == [1, 2, 3, None, None]
    assert await a.acquire_slots("main", 4, [16]) == [None]
    holders = raw.query("SELECT slot, process_id, job_id FROM provider_slots ORDER BY slot")
    assert [tuple(row) for row in holders] == [
        (0, b.process_id, 70),
        (1, a.process_id, 11),
        (2, a.process_id, 12),
        (3, a.process_id, 13),
    ]
    await a.release_slot("main", 2)
    assert await a.acquire_slots("main", 4, [16, 17]) == [2, None]
    assert await a.acquire_slots("main", 4, []) == []


async def test_a_slot_another_process_takes_meanwhile_sends_the_job_to_the_next_free_one(
    open_store: OpenStore, store_url: str
) -> None:
    """PostgreSQL: B inserts slot 0 after A read the free slots and before A inserts it. A's
    insert waits for B's, finds the slot taken (DO NOTHING), and tries slot 1, as one slot
    at a time would; it does not give up while slots are free (the job would poll 50 ms)."""
    if not store_url.startswith("postgresql"):
        pytest.skip("SQLite writers take the file's lock first: nobody inserts meanwhile")
    import asyncpg

    a = await started(open_store, "qq")
    b = await started(open_store, "telegram")
    other = await asyncpg.connect(store_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO provider_slots (provider, slot, process_id, job_id, taken_at)"
            " VALUES ('main', 0, $1, 9, 0)",
            b.process_id,
        )
        taking = asyncio.ensure_future(a.acquire_slots("main", 3, [1]))
        await asyncio.sleep(0.3)  # A has read slot 0 as free and waits on B's insert
        assert not taking.done()
        await tx.commit()
        assert await taking == [1]
    finally:
        await other.close()


async def test_a_process_never_frees_its_own_slots_for_a_late_heartbeat_of_its_own(
    open_store: OpenStore, raw: Raw
) -> None:
    """A busy event loop may write a heartbeat late; the process asking for a slot is alive
    by asking, so its own held slots stay held (the two-process test once lost one so)."""
    a = await started(open_store, "telegram")
    assert await a.acquire_slot("main", 2, None) == 0
    raw.execute(
        "UPDATE processes SET heartbeat_at = heartbeat_at - 3600 WHERE id = ?", a.process_id
    )
    assert await a.acquire_slot("main", 2, None) == 1
    assert await a.acquire_slot("main", 2, None) is None
    b = await started(open_store, "qq")
    assert await b.acquire_slot("main", 2, None) == 0  # to another process, A looks dead


async def test_a_reply_finds_its_job_whichever_process_delivered_it(open_store: OpenStore) -> None:
    """The message-to-job map is shared: a result one process sent is found by another (the
    platform account moved to it), as are the job and what it was charged."""
    delivering = await started(open_store, "telegram")
    answering = await started(open_store, "telegram")
    user = await delivering.user("telegram", "1001")
    job_id = await reserve(delivering, user.id, 1)
    assert await delivering.commit(job_id)
    await delivering.finish_job(job_id, status="succeeded", outputs=[{"width": 1024}])
    await delivering.remember_message("telegram", "1001", "77", job_id)
    assert await answering.message_job("telegram", "1001", "77") == job_id
    assert await answering.message_job("qq", "1001", "77") is None  # another platform's message
    job = await answering.job(job_id)
    assert job is not None and (job.status, job.spent) == ("succeeded", 1)
