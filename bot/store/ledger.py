"""The ledger's rules: how credits move, written once for both engines (see engine.py).

Credits are moved only by guarded statements (`... WHERE granted >= ?`, `... WHERE state =
'reserved'`) whose row counts are checked, never by reading a balance and writing a new one,
and every movement appends a row to `ledger`, which triggers make append-only. A job has at
most one reservation; it is settled exactly once: refunded whole, or committed, whole or in
part (a job that delivered fewer or cheaper images than it reserved for). A partial commit
gives the rest back in the same transaction, so such a job has a 'commit' row and a 'refund'
row, and for every job

    reserve == commit + refund    (each of daily_amount and balance_amount; absent rows are 0)

The invariants, for every user and group:

    users.granted == sum(grant) - sum(reserve.balance_amount) + sum(refund.balance_amount)
                     + sum(transfer.balance_amount)
    daily_usage.used(day) == sum(reserve.daily_amount) - sum(refund.daily_amount)
                             + sum(transfer.daily_amount) for that day
    group_usage.used(day) == sum(reserve) - sum(refund) over the group's jobs of that day

Under PostgreSQL, several processes run these at once: a reservation first locks the
account's row (`FOR UPDATE`), so two reservations of one account take turns, and the guards
refuse what a stale read would have allowed. Under SQLite, BEGIN IMMEDIATE already lets one
writer in at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from bot.errors import GroupCapReachedError, InsufficientCreditsError
from bot.groups import effective_cap
from bot.store.engine import Dialect, Row, Tx
from bot.store.model import (
    INTERRUPTED,
    Credits,
    Job,
    NotFoundError,
    ReservationError,
    StoreError,
)
from bot.store.sql import (
    JOB_SELECT,
    SQL_ADD_DAILY,
    SQL_ADD_GROUP,
    SQL_INSERT_LEDGER,
    SQL_INSERT_RESERVATION,
    SQL_RESERVE_READ,
    SQL_SETTLE,
    SQL_TAKE_BALANCE,
    SQL_TAKE_DAILY,
    SQL_TAKE_GROUP,
    SQL_TAKE_LOCKED_BALANCE,
)

log = logging.getLogger("bot.store")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Compact JSON, as the store writes it (one encoder for all: a job's row is several)."""
    return _ENCODER.encode(value)


async def ledger_row(
    tx: Tx,
    job_id: int | None,
    user_id: int,
    kind: str,
    daily: int,
    balance: int,
    day: str | None,
    note: str = "",
    by_user_id: int | None = None,
) -> None:
    await tx.execute(
        SQL_INSERT_LEDGER,
        job_id,
        user_id,
        kind,
        daily,
        balance,
        day,
        time.time(),
        note,
        by_user_id,
    )


async def lock_accounts(tx: Tx, for_update: str, *user_ids: int) -> None:
    """Lock these users rows, lowest id first (one order everywhere: no deadlocks)."""
    if for_update:
        for user_id in sorted(set(user_ids)):
            await tx.fetch("SELECT id FROM users WHERE id = ?" + for_update, user_id)


async def grant(
    tx: Tx, for_update: str, user_id: int, amount: int, by_user_id: int | None, note: str
) -> int:
    # A linked identity's own row holds nothing: the grant goes to its account.
    account = await account_of(tx, user_id)
    rows = await tx.fetch("SELECT granted FROM users WHERE id = ?" + for_update, account)
    before: int = rows[0][0]
    after = max(0, before + amount)
    await tx.execute("UPDATE users SET granted = ? WHERE id = ?", after, account)
    await ledger_row(tx, None, account, "grant", 0, after - before, None, note, by_user_id)
    return after


@dataclass(frozen=True, slots=True, eq=False)
class Ask:
    """One reservation asked for (`reserve`'s arguments).

    Each one is its own (compared and hashed by identity): a burst's 500 asks are keys of the
    store's batches, and hashing every field, the job row's eleven included, cost ~4 ms of a
    burst's loop time.
    """

    job_id: int
    user_id: int
    cost: int
    iso_day: str
    daily_allowance: int
    group_key: str | None
    group_cap: int
    # A job to write first (SQL_INSERT_JOB's parameters; `Store.open_job`), job_id 0 until.
    job: tuple[Any, ...] | None = None


async def reserve(tx: Tx, for_update: str, ask: Ask) -> int:
    """Reserve the job's cost; the credits left after it (refusals raise `refusal(...)`)."""
    job_id, user_id, cost, iso_day = ask.job_id, ask.user_id, ask.cost, ask.iso_day
    daily_allowance, group_key, group_cap = ask.daily_allowance, ask.group_key, ask.group_cap
    # PostgreSQL runs this rule as one function, `drawbridge_reserve` (migrations 11 and 12),
    # line for line, and `reserve_many` decides many at once the same way: a change here is a
    # change in both, and the store tests check all three decide alike.
    # The account's row first: a second reservation of the same account (another task,
    # another process) waits here until this one commits, then reads what it left.
    linked = await tx.fetch("SELECT account_id FROM users WHERE id = ?" + for_update, user_id)
    if linked and linked[0][0] is not None:
        # /link moved this row's account elsewhere after the caller read the user:
        # charging it would hand out a second daily allowance.
        raise refusal("linked", job_id=job_id, user_id=user_id, cost=cost)
    rows = await tx.fetch(
        SQL_RESERVE_READ, user_id, iso_day, group_key, iso_day, group_key, user_id, job_id
    )
    if not rows:
        raise refusal("not_found", job_id=job_id, user_id=user_id, cost=cost)
    owner, status, state, daily_used, balance, group_used, own_allowance, group_own_cap = rows[0]
    # The account's own allowance (set in the console) replaces the configured one.
    allowance = max(0, daily_allowance if own_allowance is None else own_allowance)
    if owner != user_id:
        raise refusal("owner", job_id=job_id, user_id=user_id, cost=cost, number=owner)
    if state is not None:
        raise refusal("reserved", job_id=job_id, user_id=user_id, cost=cost, detail=state)
    if status != "queued":
        raise refusal("status", job_id=job_id, user_id=user_id, cost=cost, detail=status)
    # The group's own cap (/group cap), read in this transaction: never above the global
    # one, which the caller passes.
    cap = effective_cap(group_cap, group_own_cap) if group_key else group_cap
    if group_key and cap > 0 and group_used + cost > cap:
        raise refusal("group_cap", job_id=job_id, user_id=user_id, cost=cost, number=cap)

    credits = Credits(allowance, daily_used, balance)
    left = credits.total_left
    if cost > left:
        raise refusal("insufficient", job_id=job_id, user_id=user_id, cost=cost, number=left)
    daily_part = min(cost, credits.daily_left)
    balance_part = cost - daily_part

    # The guards repeat the checks above inside the statements themselves, so the charge is
    # exact even if something wrote between the read and here. All the writes go in one step
    # (one round trip on PostgreSQL); a guard that refuses raises, which rolls the
    # reservation and its ledger row back with the rest.
    takes: list[tuple[str, tuple[Any, ...]]] = []
    if balance_part:
        takes.append((SQL_TAKE_BALANCE, (balance_part, user_id, balance_part)))
    if daily_part:
        takes.append((SQL_TAKE_DAILY, (user_id, iso_day, daily_part, allowance)))
    if group_key and cost:
        takes.append((SQL_TAKE_GROUP, (group_key, iso_day, cost, cap)))
    counts = await tx.writes(
        *takes,
        (
            SQL_INSERT_RESERVATION,
            (job_id, user_id, daily_part, balance_part, iso_day, group_key),
        ),
        (
            SQL_INSERT_LEDGER,
            (job_id, user_id, "reserve", daily_part, balance_part, iso_day, time.time(), "", None),
        ),
    )
    for (sql, _), count in zip(takes, counts, strict=False):
        if count != 1:
            if sql is SQL_TAKE_GROUP:
                raise refusal("group_cap", job_id=job_id, user_id=user_id, cost=cost, number=cap)
            raise refusal("insufficient", job_id=job_id, user_id=user_id, cost=cost, number=left)
    return left - cost


async def reserve_many(
    tx: Tx, dialect: Dialect, asks: Sequence[Ask], fresh: Collection[int] = ()
) -> list[int | Exception]:
    """`reserve` for many jobs in one transaction, each decided as if they had run one after
    another in this order: what each left, or the refusal it raises alone. `fresh` names the
    jobs this transaction has just written (`Store.open_job`): queued, their ask's user's and
    not reserved, so they are not read back.

    The rows are read once for all of them and the writes go table by table, so a batch of
    a burst's reservations costs a handful of statements instead of eight each. The decisions are
    read-then-write, which is exact only because nothing else can write those rows until
    this commits: SQLite's BEGIN IMMEDIATE shuts every other writer out. An engine that
    locks rows instead runs this rule server-side, where it locks every row it reads in the
    order every rule takes them (PostgreSQL's `drawbridge_open_many`, migration 13:
    `Dialect.open_many_call`). Anything unexpected raises, rolling the whole batch back.
    """
    assert not dialect.for_update, "an engine that locks rows decides batches server-side"
    users = sorted({ask.user_id for ask in asks})
    days = sorted({ask.iso_day for ask in asks})
    groups = sorted({ask.group_key for ask in asks if ask.group_key})
    ints, texts = dialect.json_ints, dialect.json_texts
    accounts = {
        row[0]: (row[1], row[2], row[3])
        for row in await tx.fetch(
            f"SELECT id, account_id, granted, daily_allowance FROM users WHERE id IN {ints}",
            _json(users),
        )
    }
    daily_used = {
        (row[0], row[1]): row[2]
        for row in await tx.fetch(
            f"SELECT user_id, day, used FROM daily_usage WHERE user_id IN {ints}"
            f" AND day IN {texts}",
            _json(users),
            _json(days),
        )
    }
    group_used: dict[tuple[str, str], int] = {}
    own_caps: dict[str, int | None] = {}
    if groups:
        for row in await tx.fetch(
            f"SELECT group_key, day, used FROM group_usage WHERE group_key IN {texts}"
            f" AND day IN {texts}",
            _json(groups),
            _json(days),
        ):
            group_used[(row[0], row[1])] = row[2]
        for row in await tx.fetch(
            f"SELECT group_key, cap FROM group_rules WHERE group_key IN {texts}", _json(groups)
        ):
            own_caps[row[0]] = row[1]
    jobs: dict[int, tuple[int, str, str | None]] = {
        ask.job_id: (ask.user_id, "queued", None) for ask in asks if ask.job_id in fresh
    }
    others = sorted({ask.job_id for ask in asks if ask.job_id not in jobs})
    if others:
        for row in await tx.fetch(
            "SELECT j.id, j.user_id, j.status, r.state FROM jobs AS j"
            f" LEFT JOIN reservations AS r ON r.job_id = j.id WHERE j.id IN {ints}",
            _json(others),
        ):
            jobs[row[0]] = (row[1], row[2], row[3])

    outcomes: list[int | Exception] = []
    taken_balance: dict[int, int] = {}
    taken_daily: dict[tuple[int, str], int] = {}
    taken_group: dict[tuple[str, str], int] = {}
    reserved: list[tuple[Any, ...]] = []
    now = time.time()
    for ask in asks:
        job_id, user_id, cost = ask.job_id, ask.user_id, ask.cost
        account = accounts.get(user_id)
        job = jobs.get(job_id)
        if account is not None and account[0] is not None:
            outcomes.append(_refused(ask, "linked"))
            continue
        if account is None or job is None:
            outcomes.append(_refused(ask, "not_found"))
            continue
        owner, status, state = job
        _, balance, own_allowance = account
        if owner != user_id:
            outcomes.append(_refused(ask, "owner", number=owner))
            continue
        if state is not None:
            outcomes.append(_refused(ask, "reserved", detail=state))
            continue
        if status != "queued":
            outcomes.append(_refused(ask, "status", detail=status))
            continue
        day_key = (user_id, ask.iso_day)
        group = (ask.group_key, ask.iso_day) if ask.group_key else None
        cap = (
            effective_cap(ask.group_cap, own_caps.get(ask.group_key or ""))
            if group
            else ask.group_cap
        )
        used = group_used.get(group, 0) if group else 0
        if group and cap > 0 and used + cost > cap:
            outcomes.append(_refused(ask, "group_cap", number=cap))
            continue
        allowance = max(0, ask.daily_allowance if own_allowance is None else own_allowance)
        credits = Credits(allowance, daily_used.get(day_key, 0), balance)
        left = credits.total_left
        if cost > left:
            outcomes.append(_refused(ask, "insufficient", number=left))
            continue
        daily_part = min(cost, credits.daily_left)
        balance_part = cost - daily_part
        # What the next ask of this account, day or group sees.
        accounts[user_id] = (None, balance - balance_part, own_allowance)
        daily_used[day_key] = credits.daily_used + daily_part
        taken_balance[user_id] = taken_balance.get(user_id, 0) + balance_part
        taken_daily[day_key] = taken_daily.get(day_key, 0) + daily_part
        if group and cost:
            group_used[group] = used + cost
            taken_group[group] = taken_group.get(group, 0) + cost
        jobs[job_id] = (owner, status, "reserved")
        reserved.append((job_id, user_id, daily_part, balance_part, ask.iso_day, ask.group_key))
        outcomes.append(left - cost)

    # The writes, each table's in key order. The rows are locked and their values were read
    # in this transaction: plain increments, and the tables' CHECKs (granted >= 0, used >= 0)
    # stand behind them.
    await tx.writes_many(
        (
            SQL_TAKE_LOCKED_BALANCE,
            [(amount, user) for user, amount in sorted(taken_balance.items()) if amount],
        ),
        (
            SQL_ADD_DAILY,
            [(user, day, amount) for (user, day), amount in sorted(taken_daily.items()) if amount],
        ),
        (
            SQL_ADD_GROUP,
            [(group, day, amount) for (group, day), amount in sorted(taken_group.items())],
        ),
        (SQL_INSERT_RESERVATION, reserved),
        (
            SQL_INSERT_LEDGER,
            [
                (job, user, "reserve", daily, bal, day, now, "", None)
                for job, user, daily, bal, day, _ in reserved
            ],
        ),
    )
    return outcomes


def _refused(
    ask: Ask, outcome: str, number: int | None = None, detail: str | None = None
) -> Exception:
    return refusal(
        outcome, job_id=ask.job_id, user_id=ask.user_id, cost=ask.cost, number=number, detail=detail
    )


def _json(values: Sequence[Any]) -> str:
    return json.dumps(list(values), ensure_ascii=False, separators=(",", ":"))


def refusal(
    outcome: str,
    *,
    job_id: int,
    user_id: int,
    cost: int,
    number: int | None = None,
    detail: str | None = None,
) -> Exception:
    """The exception a refused reservation raises, on either engine.

    `outcome` names the refusal as `reserve` finds it and PostgreSQL's `drawbridge_reserve`
    returns it; `number` is the owner, the group's cap or the credits left, `detail` the
    reservation's state or the job's status.
    """
    if outcome == "linked":
        return ReservationError(f"user #{user_id} was linked into another account")
    if outcome == "not_found":
        return NotFoundError(f"no job #{job_id} or no user #{user_id}")
    if outcome == "owner":
        return ReservationError(f"job #{job_id} belongs to user #{number}")
    if outcome == "reserved":
        return ReservationError(f"job #{job_id} is already reserved ({detail})")
    if outcome == "status":
        return ReservationError(f"job #{job_id} is {detail}, not queued")
    if outcome == "group_cap":
        return GroupCapReachedError(cap=number)
    if outcome == "insufficient":
        return InsufficientCreditsError(needed=cost, left=number)
    return StoreError(f"job #{job_id}: unknown reservation outcome {outcome!r}")


async def settle(tx: Tx, job_id: int, state: str) -> Row | None:
    rows = await tx.fetch(SQL_SETTLE, state, job_id)
    return rows[0] if rows else None


async def commit(tx: Tx, job_id: int, note: str, amount: int | None = None) -> bool:
    row = await settle(tx, job_id, "committed")
    if row is None:
        return False
    user_id, daily, balance, day, group_key = row
    back = 0 if amount is None else daily + balance - amount
    if back < 0 or back > daily + balance:
        # Raised inside the transaction: the state change above is rolled back with it.
        raise ValueError(f"job #{job_id}: cannot commit {amount} of {daily + balance}")
    # What is kept is spent the way the reservation spent: the daily allowance first. So the
    # balance comes back first, which also suits the user (the allowance lapses at midnight).
    back_balance = min(back, balance)
    back_daily = back - back_balance
    # The commit row records what was spent; the invariants count only reserve, refund and
    # grant rows, and reserve == commit + refund for every settled job.
    await ledger_row(
        tx, job_id, user_id, "commit", daily - back_daily, balance - back_balance, day, note
    )
    if back:
        await give_back(tx, user_id, back_daily, back_balance, day, group_key)
        await ledger_row(tx, job_id, user_id, "refund", back_daily, back_balance, day, "partial")
    return True


async def refund(tx: Tx, job_id: int, reason: str) -> bool:
    row = await settle(tx, job_id, "refunded")
    if row is None:
        return False
    user_id, daily, balance, day, group_key = row
    await give_back(tx, user_id, daily, balance, day, group_key)
    await ledger_row(tx, job_id, user_id, "refund", daily, balance, day, reason)
    return True


async def give_back(
    tx: Tx, user_id: int, daily: int, balance: int, day: str, group_key: str | None
) -> None:
    # The daily part goes back to the reservation's day, the balance part to the balance and
    # the whole to the group's usage of that day: each to where the reservation took it from.
    if balance:
        await tx.execute("UPDATE users SET granted = granted + ? WHERE id = ?", balance, user_id)
    if daily:
        await tx.execute(
            "UPDATE daily_usage SET used = used - ? WHERE user_id = ? AND day = ?",
            daily,
            user_id,
            day,
        )
    if group_key and daily + balance:
        await tx.execute(
            "UPDATE group_usage SET used = used - ? WHERE group_key = ? AND day = ?",
            daily + balance,
            group_key,
            day,
        )


async def settle_orphans(tx: Tx, process_ids: list[str], include_unowned: bool) -> list[int]:
    """Settle the jobs of these (dead) processes, and of no process if `include_unowned`.

    A queued or running job whose results were handed to the chat (`jobs.charge` set)
    becomes succeeded and is charged what it recorded; every other one becomes failed
    ("interrupted") and its reservation is refunded. A finished job whose reservation was
    never settled is settled by its outcome. Returns the ids of the interrupted jobs.
    """
    owner = _owner_clause(process_ids, include_unowned)
    if owner is None:
        return []
    where, params = owner
    delivered = await tx.fetch(
        "UPDATE jobs SET status = 'succeeded', finished_at = ?"
        " WHERE status IN ('queued', 'running') AND charge IS NOT NULL AND "
        + where
        + " RETURNING id",
        time.time(),
        *params,
    )
    if delivered:
        log.warning(
            "job(s) %s delivered their results but were never settled: committing",
            ", ".join(str(row[0]) for row in delivered),
        )
    rows = await tx.fetch(
        "UPDATE jobs SET status = 'failed', error_kind = ?, finished_at = ?"
        " WHERE status IN ('queued', 'running') AND " + where + " RETURNING id",
        INTERRUPTED,
        time.time(),
        *params,
    )
    interrupted = sorted(int(row[0]) for row in rows)
    open_rows = await tx.fetch(
        "SELECT r.job_id, j.status, j.charge, r.daily_amount + r.balance_amount"
        " FROM reservations AS r JOIN jobs AS j ON j.id = r.job_id"
        " WHERE r.state = 'reserved' AND "
        + where.replace("process_id", "j.process_id")
        + " ORDER BY r.job_id",
        *params,
    )
    for job_id, status, charge, reserved in open_rows:
        if status == "succeeded":
            amount = None if charge is None else min(charge, reserved)
            await commit(tx, job_id, "recovered", amount)
        else:
            await refund(tx, job_id, INTERRUPTED)
    return interrupted


def _owner_clause(process_ids: list[str], include_unowned: bool) -> tuple[str, list[Any]] | None:
    parts: list[str] = []
    if include_unowned:
        parts.append("process_id IS NULL")
    if process_ids:
        parts.append("process_id IN (" + ", ".join("?" * len(process_ids)) + ")")
    if not parts:
        return None
    return "(" + " OR ".join(parts) + ")", list(process_ids)


async def console_refund(
    tx: Tx, for_update: str, job_id: int, actor: str, by_user_id: int | None
) -> int:
    rows = await tx.fetch(JOB_SELECT + " WHERE j.id = ?", job_id)
    if not rows:
        raise NotFoundError(f"no job #{job_id}")
    job = job_from_row(rows[0])
    if job.status != "succeeded" or job.ledger_state != "committed" or job.spent <= 0:
        raise StoreError(f"job #{job_id} has no charge to refund")
    added = await tx.fetch(
        "INSERT INTO audit (created_at, actor, action, target, detail, job_id)"
        " VALUES (?, ?, 'refund', ?, ?, ?)"
        " ON CONFLICT (job_id) WHERE action = 'refund' DO NOTHING RETURNING id",
        time.time(),
        actor,
        f"#{job.user_id}",
        dumps({"credits": job.spent}),
        job_id,
    )
    if not added:
        raise StoreError(f"job #{job_id} was refunded already")
    await lock_accounts(tx, for_update, job.user_id)
    await tx.execute("UPDATE users SET granted = granted + ? WHERE id = ?", job.spent, job.user_id)
    await ledger_row(
        tx,
        None,
        job.user_id,
        "grant",
        0,
        job.spent,
        None,
        f"refund of job #{job_id} by {actor}",
        by_user_id,
    )
    return job.spent


# --- accounts (/link): moving what one account row holds into another ---


async def account_of(tx: Tx, identity_id: int) -> int:
    rows = await tx.fetch("SELECT COALESCE(account_id, id) FROM users WHERE id = ?", identity_id)
    if not rows:
        raise NotFoundError(f"no user #{identity_id}")
    return int(rows[0][0])


async def identities(tx: Tx, account_id: int) -> tuple[tuple[str, str], ...]:
    rows = await tx.fetch(
        "SELECT platform, platform_user_id FROM users WHERE COALESCE(account_id, id) = ?"
        " ORDER BY id",
        account_id,
    )
    return tuple((row[0], row[1]) for row in rows)


async def has_jobs_in_flight(tx: Tx, account_id: int) -> bool:
    # A queued job may not have reserved yet: it would reserve against the old row.
    rows = await tx.fetch(
        """
        SELECT EXISTS (SELECT 1 FROM jobs WHERE user_id = ? AND status IN ('queued', 'running'))
            OR EXISTS (SELECT 1 FROM reservations WHERE user_id = ? AND state = 'reserved')
        """,
        account_id,
        account_id,
    )
    return bool(rows[0][0])


async def move_account(tx: Tx, src: int, dst: int, day: date, note: str) -> tuple[int, str]:
    """Move what account row `src` holds into `dst` (no job of `src` may be in flight).

    Returns (balance moved, what became of the keys: "" none moved, "moved", "kept_newer"
    when both had one and `dst`'s was newer, "took_newer" when `src`'s was).
    """
    iso_day = day.isoformat()
    src_row = (
        await tx.fetch("SELECT granted, api_key_enc, key_set_at, lang FROM users WHERE id = ?", src)
    )[0]
    dst_row = (await tx.fetch("SELECT api_key_enc, key_set_at FROM users WHERE id = ?", dst))[0]
    granted = int(src_row[0])
    used_rows = await tx.fetch(
        "SELECT used FROM daily_usage WHERE user_id = ? AND day = ?", src, iso_day
    )
    used = int(used_rows[0][0]) if used_rows else 0
    if granted:
        await tx.execute(
            "UPDATE users SET granted = granted - ? WHERE id = ? AND granted >= ?",
            granted,
            src,
            granted,
        )
        await tx.execute("UPDATE users SET granted = granted + ? WHERE id = ?", granted, dst)
    if used:
        # One allowance a day: what the joining account used today counts for the joint one.
        await tx.execute(
            "UPDATE daily_usage SET used = used - ? WHERE user_id = ? AND day = ?",
            used,
            src,
            iso_day,
        )
        await tx.execute(
            """
            INSERT INTO daily_usage (user_id, day, used) VALUES (?, ?, ?)
            ON CONFLICT (user_id, day) DO UPDATE SET used = daily_usage.used + excluded.used
            """,
            dst,
            iso_day,
            used,
        )
    if granted or used:
        # A pair of rows that sum to zero: out of one account, into the other.
        for user_id, sign in ((src, -1), (dst, 1)):
            await ledger_row(
                tx, None, user_id, "transfer", sign * used, sign * granted, iso_day, note
            )
    key = ""
    if src_row[1] is not None:
        src_newer = dst_row[0] is None or (src_row[2] or 0.0) > (dst_row[1] or 0.0)
        if src_newer:
            await tx.execute(
                "UPDATE users SET api_key_enc = ?, key_set_at = ? WHERE id = ?",
                src_row[1],
                src_row[2],
                dst,
            )
        key = "moved" if dst_row[0] is None else ("took_newer" if src_newer else "kept_newer")
        await tx.execute("UPDATE users SET api_key_enc = NULL, key_set_at = NULL WHERE id = ?", src)
    await tx.execute("UPDATE users SET lang = COALESCE(lang, ?) WHERE id = ?", src_row[3], dst)
    await tx.execute("UPDATE users SET lang = NULL WHERE id = ?", src)
    await tx.execute("UPDATE jobs SET user_id = ? WHERE user_id = ?", dst, src)
    return granted, key


def job_from_row(row: Row) -> Job:
    return Job(
        id=row["id"],
        user_id=row["user_id"],
        platform=row["platform"],
        chat_id=row["chat_id"],
        group_key=row["group_key"],
        kind=row["kind"],
        prompt=row["prompt"],
        options=json.loads(row["options"]),
        ref_count=row["ref_count"],
        provider=row["provider"],
        own_key=bool(row["own_key"]),
        status=row["status"],
        error_kind=row["error_kind"],
        error_detail=row["error_detail"],
        cost=int(row["cost"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        usage=None if row["usage"] is None else json.loads(row["usage"]),
        revised_prompt=row["revised_prompt"],
        outputs=json.loads(row["outputs"]),
        ledger_state=row["ledger_state"],
        spent=int(row["spent"]),
        charge=row["charge"],
    )
