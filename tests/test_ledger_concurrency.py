"""Many asyncio tasks reserving, committing and refunding at once: the ledger stays exact."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from bot.errors import InsufficientCreditsError
from bot.secrets import KeyBox
from bot.store import ReservationError, Store
from tests.databases import Raw
from tests.test_store import assert_ledger_exact

DAY = date(2025, 3, 1)
ALLOWANCE = 3
USERS = 50
RESERVATIONS = 1000


@pytest.fixture
async def store(store_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.connect(store_url, keybox=KeyBox.load(tmp_path))
    yield s
    await s.close()


async def test_a_thousand_concurrent_reservations_keep_the_ledger_exact(
    store: Store, store_url: str
) -> None:
    rng = random.Random(20250301)
    users = [(await store.user("qq", str(n))).id for n in range(USERS)]
    # Small balances against ~20 jobs of 1-4 credits per user: many must be refused. (Large
    # enough that each way of settling still gets its share when PostgreSQL's engine takes
    # all thousand reservations in one batch, before any refund gives credits back.)
    granted = {uid: rng.randint(0, 30) for uid in users}
    for uid, amount in granted.items():
        await store.grant(uid, amount)

    committed: Counter[int] = Counter()  # user -> credits spent
    outcomes: Counter[str] = Counter()

    async def one(uid: int, cost: int, settle: str) -> None:
        job_id = await store.create_job(
            user_id=uid,
            platform="qq",
            chat_id="g",
            group_key="qq:g" if settle == "partial" else None,
            kind="draw",
            prompt="p",
            options={},
            ref_count=0,
            own_key=False,
        )
        attempts = 2 if settle == "race" else 1
        results = await asyncio.gather(
            *(
                store.reserve(
                    job_id,
                    user_id=uid,
                    cost=cost,
                    day=DAY,
                    daily_allowance=ALLOWANCE,
                    group_key="qq:g" if settle == "partial" else None,
                )
                for _ in range(attempts)
            ),
            return_exceptions=True,
        )
        # A reservation that went through says what it left (an int).
        ok = [r for r in results if isinstance(r, int)]
        for r in results:
            assert isinstance(r, int | InsufficientCreditsError | ReservationError), r
        if not ok:
            assert all(isinstance(r, InsufficientCreditsError) for r in results)
            outcomes["refused"] += 1
            return
        # Two reserves of one job: exactly one charges, the other is refused as a duplicate
        # (under PostgreSQL it may instead have run first and been refused as short, before a
        # refund or a top-up let this one through).
        assert len(ok) == 1, "a job was reserved twice"
        if store.engine.dialect.name == "sqlite":
            assert sum(isinstance(r, ReservationError) for r in results) == attempts - 1
        await asyncio.sleep(rng.random() * 0.01)
        if settle == "race":
            # Commit and refund (each twice) at once: exactly one of the four wins.
            flags = await asyncio.gather(
                store.commit(job_id),
                store.refund(job_id, "race"),
                store.commit(job_id),
                store.refund(job_id, "race"),
            )
            assert sum(flags) == 1, flags
            if flags[0] or flags[2]:
                committed[uid] += cost
            outcomes["race"] += 1
        elif settle == "partial":
            # Fewer or cheaper images than reserved for: spend part, the rest comes back at once
            # (racing a second commit and a refund: exactly one of the three settles it; on
            # SQLite the first queued, on PostgreSQL whichever locks the reservation first).
            amount = rng.randint(0, cost)
            flags = await asyncio.gather(
                store.commit(job_id, amount=amount),
                store.commit(job_id, amount=cost),
                store.refund(job_id, "late"),
            )
            assert sum(flags) == 1, flags
            committed[uid] += amount if flags[0] else cost if flags[1] else 0
            outcomes["partial"] += 1
        elif settle == "commit":
            assert await store.commit(job_id)
            committed[uid] += cost
            outcomes["commit"] += 1
        else:
            assert await store.refund(job_id, "failed")
            outcomes["refund"] += 1

    async def top_up(uid: int) -> None:
        await asyncio.sleep(rng.random() * 0.05)
        await store.grant(uid, 2, note="top-up during the storm")
        granted[uid] += 2

    tasks = [
        one(
            rng.choice(users),
            rng.randint(1, 4),
            rng.choice(["commit", "refund", "race", "partial"]),
        )
        for _ in range(RESERVATIONS)
    ]
    tasks += [top_up(rng.choice(users)) for _ in range(20)]
    rng.shuffle(tasks)
    await asyncio.gather(*tasks)

    assert outcomes["refused"] > 50, outcomes
    assert min(outcomes[kind] for kind in ("commit", "refund", "race", "partial")) > 30, outcomes
    assert sum(outcomes.values()) == RESERVATIONS
    for uid in users:
        credits = await store.credits(uid, DAY, ALLOWANCE)
        # What the user had, minus exactly what committed jobs cost: nothing charged twice,
        # nothing lost by a refund, nothing refused left behind.
        assert credits.total_left == granted[uid] + ALLOWANCE - committed[uid], uid
        assert await store.ledger_sum(uid) == committed[uid]

    raw = Raw(store_url)
    try:
        counts = assert_ledger_exact(raw)
    finally:
        raw.close()
    assert counts["reservations"] == RESERVATIONS - outcomes["refused"]
    assert counts.get("reserved", 0) == 0
    assert counts["committed"] + counts["refunded"] == counts["reservations"]
