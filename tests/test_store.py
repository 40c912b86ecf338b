"""The store (bot/store/) and bot/secrets.py, on both engines: every test that is about the
store's behaviour runs on a SQLite file in tmp_path and on a fresh PostgreSQL schema
(`store_url`); the few about SQLite files themselves (PRAGMA user_version, the link
migration's rebuild, bytes at rest, another connection's write lock) stay SQLite-only, with a
PostgreSQL counterpart where one makes sense."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from cryptography.fernet import Fernet

from bot.errors import GroupCapReachedError, InsufficientCreditsError
from bot.secrets import SECRET_FILE, KeyBox, mask_key
from bot.store import (
    MIGRATIONS,
    POSTGRES_MIGRATIONS,
    Credits,
    NotFoundError,
    ReservationError,
    Store,
    StoreError,
)
from bot.store import ledger as ledger_rules
from bot.store import postgres as postgres_module
from bot.store import sqlite as sqlite_module
from bot.upstream.capabilities import CapabilityStore
from tests.databases import Raw

DAY = date(2025, 3, 1)
KEY = "sk-live-0123456789abcdefSECRETtail"

# What a trigger's refusal raises through each engine's own driver.
REFUSED = (sqlite3.IntegrityError, asyncpg.RaiseError)


def assert_ledger_exact(db: Raw | Path | str) -> dict[str, int]:
    """Check every ledger invariant straight from the database, with plain SQL.

    `db` is a `Raw` on either engine (or a SQLite file's path). Independent of Store's own
    queries, so a bug there cannot hide itself. Returns counts.
    """
    raw = db if isinstance(db, Raw) else Raw(f"sqlite:///{db}")
    try:
        return _check_ledger(raw.query)
    finally:
        if raw is not db:
            raw.close()


def _check_ledger(q: Any) -> dict[str, int]:
    # Portable SQL only (SUM over CASE, COALESCE; no SQLite TOTAL() or boolean sums).
    # Balance: granted == grants - reserved balance + refunded balance + transfers (/link).
    for user_id, granted, expected in q(
        """
        SELECT u.id, u.granted, COALESCE((
            SELECT SUM(CASE kind WHEN 'grant' THEN balance_amount
                                 WHEN 'reserve' THEN -balance_amount
                                 WHEN 'refund' THEN balance_amount
                                 WHEN 'transfer' THEN balance_amount ELSE 0 END)
            FROM ledger WHERE user_id = u.id), 0)
        FROM users AS u
        """
    ):
        assert granted == expected, f"user #{user_id}: granted {granted} != ledger {expected}"
        assert granted >= 0
    # Daily allowance: used(day) == reserved daily - refunded daily, for every day either
    # side knows about.
    ledger_daily = {
        (user_id, day): amount
        for user_id, day, amount in q(
            """
            SELECT user_id, day, SUM(CASE kind WHEN 'reserve' THEN daily_amount
                                               WHEN 'refund' THEN -daily_amount
                                               WHEN 'transfer' THEN daily_amount ELSE 0 END)
            FROM ledger WHERE job_id IS NOT NULL OR kind = 'transfer' GROUP BY user_id, day
            """
        )
    }
    usage = {(u, d): used for u, d, used in q("SELECT user_id, day, used FROM daily_usage")}
    for key in ledger_daily.keys() | usage.keys():
        assert usage.get(key, 0) == ledger_daily.get(key, 0), f"daily usage {key}"
    # Group usage == what the group's reservations hold: reserved minus refunded (a partial
    # commit gives part back).
    groups = {
        (g, d): total
        for g, d, total in q(
            """
            SELECT r.group_key, r.day,
                   SUM(r.daily_amount + r.balance_amount - COALESCE((
                       SELECT l.daily_amount + l.balance_amount FROM ledger AS l
                       WHERE l.job_id = r.job_id AND l.kind = 'refund'), 0))
            FROM reservations AS r WHERE r.group_key IS NOT NULL GROUP BY r.group_key, r.day
            """
        )
    }
    group_usage = {(g, d): used for g, d, used in q("SELECT group_key, day, used FROM group_usage")}
    for key in groups.keys() | group_usage.keys():
        assert group_usage.get(key, 0) == groups.get(key, 0), f"group usage {key}"
    # Transfers only move credits between accounts: their rows sum to zero, each amount.
    [(daily_moved, balance_moved)] = q(
        "SELECT COALESCE(SUM(daily_amount), 0), COALESCE(SUM(balance_amount), 0)"
        " FROM ledger WHERE kind = 'transfer'"
    )
    assert (daily_moved, balance_moved) == (0, 0), "transfers create or destroy credits"
    # An account holds the money: a linked identity's own row holds none.
    [(held,)] = q("SELECT COUNT(*) FROM users WHERE account_id IS NOT NULL AND granted <> 0")
    assert held == 0, "a linked identity's row holds credits"
    # Each reservation: exactly one reserve row with its amounts, and the settle rows its
    # state says: none while reserved, a refund of everything, or a commit (with a refund
    # row for the part given back when the commit was partial), so that for each amount
    # reserve == commit + refund.
    rows = q(
        """
        SELECT r.job_id, r.state, r.daily_amount, r.balance_amount,
               SUM(CASE WHEN l.kind = 'reserve' THEN 1 ELSE 0 END),
               SUM(CASE WHEN l.kind = 'commit' THEN 1 ELSE 0 END),
               SUM(CASE WHEN l.kind = 'refund' THEN 1 ELSE 0 END),
               SUM(CASE WHEN l.kind = 'reserve' THEN l.daily_amount END),
               SUM(CASE WHEN l.kind = 'reserve' THEN l.balance_amount END),
               COALESCE(SUM(CASE WHEN l.kind <> 'reserve' THEN l.daily_amount END), 0),
               COALESCE(SUM(CASE WHEN l.kind <> 'reserve' THEN l.balance_amount END), 0)
        FROM reservations AS r JOIN ledger AS l ON l.job_id = r.job_id
        GROUP BY r.job_id, r.state, r.daily_amount, r.balance_amount
        """
    )
    expected_settles = {
        "reserved": {(0, 0)},
        "committed": {(1, 0), (1, 1)},
        "refunded": {(0, 1)},
    }
    for (
        job_id,
        state,
        daily,
        balance,
        reserves,
        commits,
        refunds,
        l_daily,
        l_bal,
        settled_daily,
        settled_bal,
    ) in rows:
        assert reserves == 1, f"job #{job_id} has {reserves} reserve rows"
        assert (commits, refunds) in expected_settles[state], f"job #{job_id} {state}"
        assert (l_daily, l_bal) == (daily, balance), f"job #{job_id} amounts"
        if state != "reserved":
            assert (settled_daily, settled_bal) == (daily, balance), f"job #{job_id} settled"
        assert min(daily, balance, settled_daily, settled_bal) >= 0, f"job #{job_id} sign"
    [(n_reservations,)] = q("SELECT COUNT(*) FROM reservations")
    assert len(rows) == n_reservations
    [(orphan,)] = q(
        "SELECT COUNT(*) FROM ledger WHERE job_id IS NOT NULL AND job_id NOT IN "
        "(SELECT job_id FROM reservations)"
    )
    assert orphan == 0, "ledger rows for jobs without a reservation"
    states = {
        state: int(n) for state, n in q("SELECT state, COUNT(*) FROM reservations GROUP BY state")
    }
    return {"reservations": int(n_reservations), **states}


def schema_version(raw: Raw) -> int:
    """The migration the database says it is at, read as each engine records it."""
    if raw.engine == "sqlite":
        return int(raw.value("PRAGMA user_version"))
    return int(raw.value("SELECT MAX(version) FROM schema_version") or 0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "drawbridge.sqlite3"


@pytest.fixture
def keybox(tmp_path: Path) -> KeyBox:
    return KeyBox.load(tmp_path / "data")


@pytest.fixture
async def store(store_url: str, keybox: KeyBox) -> AsyncIterator[Store]:
    s = await Store.connect(store_url, keybox=keybox, admins={("qq", "10001")})
    yield s
    await s.close()


@pytest.fixture
def raw(store_url: str) -> Iterator[Raw]:
    """The test's database with no drawbridge code in between."""
    r = Raw(store_url)
    yield r
    r.close()


async def new_job(store: Store, user_id: int, *, group_key: str | None = None, **kw: Any) -> int:
    fields: dict[str, Any] = {
        "platform": "qq",
        "chat_id": "c1",
        "group_key": group_key,
        "kind": "draw",
        "prompt": "a cat",
        "options": {"size": "1024x1024", "n": 1},
        "ref_count": 0,
        "own_key": False,
    }
    fields.update(kw)
    return await store.create_job(user_id=user_id, **fields)


async def reserve(
    store: Store, user_id: int, cost: int, *, day: date = DAY, allowance: int = 5, **kw: Any
) -> int:
    job_id = await new_job(store, user_id, group_key=kw.get("group_key"))
    await store.reserve(
        job_id, user_id=user_id, cost=cost, day=day, daily_allowance=allowance, **kw
    )
    return job_id


def migrations_of(url: str) -> tuple[Any, str, tuple[str, ...]]:
    """The engine module whose migrations a test may shorten, its attribute, the full list."""
    if url.startswith("postgresql"):
        return postgres_module, "POSTGRES_MIGRATIONS", POSTGRES_MIGRATIONS
    return sqlite_module, "SQLITE_MIGRATIONS", MIGRATIONS


# --- migrations ---


async def test_reopening_keeps_schema_version_and_data(
    store_url: str, keybox: KeyBox, raw: Raw
) -> None:
    first = await Store.connect(store_url, keybox=keybox)
    alice = await first.user("telegram", "42", "Alice")
    await first.close()

    second = await Store.connect(store_url, keybox=keybox)
    again = await second.user("telegram", "42")
    await second.close()

    assert schema_version(raw) == len(MIGRATIONS)
    if raw.engine == "sqlite":
        assert raw.value("PRAGMA journal_mode") == "wal"
    assert again.id == alice.id == 1 and again.name == "Alice"


async def test_older_database_is_upgraded_in_place(
    store_url: str, keybox: KeyBox, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name, full = migrations_of(store_url)
    monkeypatch.setattr(module, name, full[:1])
    await (await Store.connect(store_url, keybox=keybox)).close()
    # The first release's rows, written as that release wrote them (today's code reads
    # columns later migrations add).
    raw.execute(
        "INSERT INTO users (platform, platform_user_id, name, granted, created_at)"
        " VALUES ('qq', '1', 'Alice', 3, 0)"
    )
    raw.execute(
        "INSERT INTO ledger (user_id, kind, balance_amount, created_at) VALUES (1, 'grant', 3, 0)"
    )
    monkeypatch.setattr(module, name, full)

    new = await Store.connect(store_url, keybox=keybox)
    alice = await new.user("qq", "1")
    assert (alice.id, alice.granted, alice.name) == (1, 3, "Alice")
    await new.remember_message("qq", "g", "m", await new_job(new, alice.id))
    # A user created after the upgrade gets the next id.
    assert (await new.user("qq", "2")).id == 2
    await new.close()
    assert schema_version(raw) == len(full) > 1
    assert_ledger_exact(raw)


async def test_the_link_migration_rebuilds_the_ledger_keeping_rows_indexes_and_triggers(
    tmp_path: Path, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keybox = KeyBox.load(tmp_path)
    before = next(i for i, script in enumerate(MIGRATIONS) if "link_codes" in script)
    monkeypatch.setattr(sqlite_module, "SQLITE_MIGRATIONS", MIGRATIONS[:before])
    await (await Store.open(db_path, keybox=keybox)).close()
    con = sqlite3.connect(db_path)
    with con:
        con.execute(
            "INSERT INTO users (id, platform, platform_user_id, granted, created_at)"
            " VALUES (1, 'qq', '1', 1, 0)"
        )
        con.execute(
            "INSERT INTO jobs (id, user_id, platform, chat_id, kind, prompt, status, created_at)"
            " VALUES (7, 1, 'qq', 'c', 'draw', 'p', 'succeeded', 0)"
        )
        con.execute("INSERT INTO reservations VALUES (7, 1, 2, 1, '2025-03-01', NULL, 'committed')")
        for kind, note in (("grant", "gift"), ("reserve", ""), ("commit", "")):
            con.execute(
                "INSERT INTO ledger (job_id, user_id, kind, daily_amount, balance_amount, day,"
                " created_at, note) VALUES (?, 1, ?, ?, ?, ?, 1.5, ?)",
                (
                    None if kind == "grant" else 7,
                    kind,
                    0 if kind == "grant" else 2,
                    2 if kind == "grant" else 1,
                    None if kind == "grant" else "2025-03-01",
                    note,
                ),
            )
        con.execute("INSERT INTO daily_usage VALUES (1, '2025-03-01', 2)")
    old_rows = con.execute("SELECT * FROM ledger ORDER BY id").fetchall()
    con.close()
    monkeypatch.setattr(sqlite_module, "SQLITE_MIGRATIONS", MIGRATIONS)

    await (await Store.open(db_path, keybox=keybox)).close()

    con = sqlite3.connect(db_path)
    assert con.execute("SELECT * FROM ledger ORDER BY id").fetchall() == old_rows
    names = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
    assert {"ledger_one_per_job_and_kind", "ledger_user", "ledger_day"} <= names
    assert {"ledger_no_update", "ledger_no_delete", "users_account", "link_codes"} <= names
    assert "ledger_new" not in names
    for statement in ("UPDATE ledger SET note = 'x'", "DELETE FROM ledger"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            con.execute(statement)
    with pytest.raises(sqlite3.IntegrityError):  # one reserve per job, still
        con.execute(
            "INSERT INTO ledger (job_id, user_id, kind, created_at) VALUES (7, 1, 'reserve', 0)"
        )
    with pytest.raises(sqlite3.IntegrityError):  # a transfer belongs to no job
        con.execute(
            "INSERT INTO ledger (job_id, user_id, kind, created_at) VALUES (7, 1, 'transfer', 0)"
        )
    con.close()
    assert_ledger_exact(db_path)


async def test_failing_migration_changes_nothing(
    store_url: str, keybox: KeyBox, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await Store.connect(store_url, keybox=keybox)).close()
    module, name, full = migrations_of(store_url)
    monkeypatch.setattr(
        module, name, (*full, "CREATE TABLE extra (a INTEGER);\nTHIS IS NOT SQL;\n")
    )

    with pytest.raises((sqlite3.OperationalError, asyncpg.PostgresSyntaxError)):
        await Store.connect(store_url, keybox=keybox)

    assert schema_version(raw) == len(full)
    if raw.engine == "sqlite":
        assert raw.value("SELECT name FROM sqlite_master WHERE name = 'extra'") is None
    else:
        assert raw.value("SELECT to_regclass('extra')") is None


async def test_database_from_newer_version_is_refused(
    store_url: str, keybox: KeyBox, raw: Raw
) -> None:
    newer = len(MIGRATIONS) + 1
    if raw.engine == "sqlite":
        raw.execute(f"PRAGMA user_version = {newer}")
    else:
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (?)", newer)
    for migrate in (True, False):
        with pytest.raises(StoreError, match="newer"):
            await Store.connect(store_url, keybox=keybox, migrate=migrate)
    assert schema_version(raw) == newer


async def test_two_stores_migrating_one_fresh_database_at_once_both_succeed(
    store_url: str, keybox: KeyBox, raw: Raw
) -> None:
    # Two processes started together on an empty database: one applies the migrations, the
    # other waits for it (BEGIN IMMEDIATE; PostgreSQL's advisory lock) and finds none left.
    stores = await asyncio.gather(*(Store.connect(store_url, keybox=keybox) for _ in range(3)))
    try:
        assert schema_version(raw) == len(MIGRATIONS)
        users = [await s.user("qq", str(n)) for n, s in enumerate(stores)]
        assert [u.id for u in users] == [1, 2, 3]
    finally:
        for s in stores:
            await s.close()
    if raw.engine == "postgresql":
        assert raw.value("SELECT COUNT(*) FROM schema_version") == 1


# --- users ---


async def test_user_is_created_once_and_name_follows_platform(store: Store) -> None:
    first = await store.user("telegram", "42", "Alice")
    same = await store.user("telegram", "42")
    renamed = await store.user("telegram", "42", "Alice B")
    other_platform = await store.user("discord", "42", "Alice")

    assert same.id == first.id and same.name == "Alice"
    assert renamed.id == first.id and renamed.name == "Alice B"
    assert other_platform.id != first.id
    assert first.role == "user" and first.lang is None and first.granted == 0
    assert not first.has_key


async def test_config_admin_reads_as_admin_but_a_ban_wins(store: Store) -> None:
    admin = await store.user("qq", "10001", "Boss")
    assert admin.role == "admin" and admin.is_admin
    await store.set_role(admin.id, "user")
    assert (await store.user("qq", "10001")).role == "admin"
    await store.set_role(admin.id, "banned")
    assert (await store.user("qq", "10001")).role == "banned"

    plain = await store.user("qq", "20002")
    await store.set_role(plain.id, "admin")
    assert (await store.user("qq", "20002")).role == "admin"
    await store.set_role(plain.id, "banned")
    banned = await store.user("qq", "20002")
    assert banned.role == "banned" and banned.is_banned
    with pytest.raises(ValueError):
        await store.set_role(plain.id, "owner")


async def test_language_is_remembered_and_cleared(store: Store) -> None:
    user = await store.user("discord", "7")
    await store.set_lang(user.id, "en")
    assert (await store.user("discord", "7")).lang == "en"
    await store.set_lang(user.id, None)
    assert (await store.user("discord", "7")).lang is None
    with pytest.raises(NotFoundError):
        await store.set_lang(9999, "en")


async def test_find_user_by_platform_id_other_platform_or_internal_id(store: Store) -> None:
    tg = await store.user("telegram", "42")
    dc = await store.user("discord", "555")

    assert (await store.find_user("telegram", "42")) == tg
    assert (await store.find_user("telegram", "discord:555")) == dc
    assert (await store.find_user("qq", f"#{dc.id}")) == dc
    assert await store.find_user("telegram", "555") is None
    assert await store.find_user("telegram", "#999") is None


# --- keys ---


async def test_api_key_is_encrypted_at_rest(store: Store, raw: Raw) -> None:
    user = await store.user("telegram", "42")
    await store.set_api_key(user.id, KEY)

    assert (await store.user("telegram", "42")).has_key
    assert await store.get_api_key(user.id) == KEY
    # The column (BLOB, BYTEA) holds the encrypted token, never the key.
    column = raw.value("SELECT api_key_enc FROM users WHERE id = ?", user.id)
    assert isinstance(column, bytes) and KEY.encode() not in column and b"SECRETtail" not in column
    assert raw.value("SELECT COUNT(*) FROM users WHERE api_key_enc IS NOT NULL") == 1


async def test_api_key_is_not_in_the_sqlite_files_bytes(keybox: KeyBox, db_path: Path) -> None:
    async with await Store.open(db_path, keybox=keybox) as store:
        user = await store.user("telegram", "42")
        await store.set_api_key(user.id, KEY)
        on_disk = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    assert b"SECRETtail" not in on_disk and KEY.encode() not in on_disk


async def test_api_key_survives_reopen_with_the_same_secret_file(
    tmp_path: Path, store_url: str
) -> None:
    data = tmp_path / "data"
    first = await Store.connect(store_url, keybox=KeyBox.load(data))
    user = await first.user("qq", "1")
    await first.set_api_key(user.id, KEY)
    await first.close()

    second = await Store.connect(store_url, keybox=KeyBox.load(data))
    assert await second.get_api_key(user.id) == KEY
    await second.close()

    stranger = await Store.connect(store_url, keybox=KeyBox.load(data, "another passphrase"))
    assert await stranger.get_api_key(user.id) is None
    await stranger.close()


def test_secret_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    data = tmp_path / "new" / "dir"
    box = KeyBox.load(data)
    path = data / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()

    token = box.encrypt("hello")
    assert KeyBox.load(data).decrypt(token) == "hello"
    assert path.read_bytes() == content


def test_secret_key_list_rotates_and_passphrase_is_stable(tmp_path: Path) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old_token = KeyBox.load(tmp_path, old).encrypt("k1")
    rotated = KeyBox.load(tmp_path, f"{new}, {old}")
    assert rotated.decrypt(old_token) == "k1"
    assert KeyBox.load(tmp_path, new).decrypt(rotated.encrypt("k2")) == "k2"

    token = KeyBox.load(tmp_path, "correct horse battery").encrypt("k3")
    assert KeyBox.load(tmp_path, "correct horse battery").decrypt(token) == "k3"
    assert not (tmp_path / SECRET_FILE).exists()
    assert "hidden" in repr(rotated)


@pytest.mark.parametrize(
    ("key", "masked"),
    [
        ("sk-fake-abcdefghijklmnop1a2b", "sk-...1a2b"),
        ("sk-proj-abcdefghijklmnopWXYZ", "sk-...WXYZ"),
        ("abcdefghijklmnop9876", "...9876"),
        ("sk-short1234", "****"),
        ("", "****"),
    ],
)
def test_mask_key_keeps_only_prefix_and_last_four(key: str, masked: str) -> None:
    assert mask_key(key) == masked


# --- credits ---


async def test_reserve_spends_daily_allowance_before_balance(store: Store) -> None:
    user = await store.user("qq", "1")
    assert await store.grant(user.id, 10) == 10

    await reserve(store, user.id, 3, allowance=5)
    assert await store.credits(user.id, DAY, 5) == Credits(5, 3, 10)
    await reserve(store, user.id, 4, allowance=5)
    credits = await store.credits(user.id, DAY, 5)
    assert credits == Credits(5, 5, 8)
    assert (credits.daily_left, credits.total_left) == (0, 8)
    assert await store.ledger_sum(user.id) == 7


async def test_a_users_own_daily_allowance_replaces_the_configured_one(
    store: Store, raw: Raw
) -> None:
    user = await store.user("qq", "1")
    await store.set_daily_allowance(user.id, 2)
    assert (await store.user("qq", "1")).daily_allowance == 2
    assert await store.credits(user.id, DAY, 5) == Credits(2, 0, 0)
    await reserve(store, user.id, 2, allowance=5)
    with pytest.raises(InsufficientCreditsError):
        await reserve(store, user.id, 1, allowance=5)  # the configured 5 no longer counts
    await store.set_daily_allowance(user.id, None)
    assert await store.credits(user.id, DAY, 5) == Credits(5, 2, 0)
    await reserve(store, user.id, 3, allowance=5)
    with pytest.raises(ValueError):
        await store.set_daily_allowance(user.id, -1)
    assert_ledger_exact(raw)


async def test_the_last_key_probe_is_kept_with_the_account(store: Store) -> None:
    user = await store.user("qq", "1")
    assert user.key_probe is None
    await store.set_key_probe(user.id, {"ok": True, "kind": "", "balance": 12.5, "at": 1.0})
    assert (await store.user("qq", "1")).key_probe == {
        "ok": True,
        "kind": "",
        "balance": 12.5,
        "at": 1.0,
    }
    await store.set_key_probe(user.id, None)
    assert (await store.user("qq", "1")).key_probe is None


async def test_new_day_resets_the_allowance_but_not_the_balance(store: Store) -> None:
    user = await store.user("qq", "1")
    await store.grant(user.id, 2)
    await reserve(store, user.id, 6, allowance=5)
    assert (await store.credits(user.id, DAY, 5)).total_left == 1

    tomorrow = await store.credits(user.id, DAY + timedelta(days=1), 5)
    assert tomorrow == Credits(5, 0, 1)
    await reserve(store, user.id, 6, day=DAY + timedelta(days=1), allowance=5)
    assert (await store.credits(user.id, DAY + timedelta(days=1), 5)).total_left == 0


async def test_reserve_refuses_when_short_and_charges_nothing(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    await store.grant(user.id, 2)
    job_id = await new_job(store, user.id)

    with pytest.raises(InsufficientCreditsError) as caught:
        await store.reserve(job_id, user_id=user.id, cost=8, day=DAY, daily_allowance=5)

    assert caught.value.params == {"needed": 8, "left": 7}
    assert await store.credits(user.id, DAY, 5) == Credits(5, 0, 2)
    job = await store.job(job_id)
    assert job is not None and job.ledger_state is None and job.cost == 0
    # The job can still be reserved at a price the user can pay.
    await store.reserve(job_id, user_id=user.id, cost=7, day=DAY, daily_allowance=5)
    assert await store.credits(user.id, DAY, 5) == Credits(5, 5, 0)
    assert assert_ledger_exact(raw)["reserved"] == 1


async def test_a_reservation_says_what_it_left_as_a_credits_read_after_it_would(
    store: Store,
) -> None:
    """The price line's "N left after this" comes from the reservation itself (PostgreSQL's
    function since migration 12, SQLite's Python rule): today's allowance, then the balance,
    the account's own allowance, one after another."""
    user = await store.user("qq", "1")
    await store.grant(user.id, 3)
    left = []
    for cost in (2, 4, 1):
        job_id = await new_job(store, user.id)
        left.append(
            await store.reserve(job_id, user_id=user.id, cost=cost, day=DAY, daily_allowance=5)
        )
        assert left[-1] == (await store.credits(user.id, DAY, 5)).total_left
    assert left == [6, 2, 1]  # 5 a day + 3: then 2 taken, 4 (3 of today's, 1 bought), 1
    # Nothing free to draw with an own allowance of 0, from the balance alone.
    other = await store.user("qq", "2")
    await store.grant(other.id, 4)
    await store.set_daily_allowance(other.id, 0)
    job_id = await new_job(store, other.id)
    assert await store.reserve(job_id, user_id=other.id, cost=3, day=DAY, daily_allowance=5) == 1


async def test_refund_returns_exactly_what_was_taken(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    await store.grant(user.id, 10)
    await reserve(store, user.id, 2)
    job_id = await reserve(store, user.id, 6)
    assert await store.credits(user.id, DAY, 5) == Credits(5, 5, 7)

    assert await store.refund(job_id, "upstream_unavailable") is True

    assert await store.credits(user.id, DAY, 5) == Credits(5, 2, 10)
    job = await store.job(job_id)
    assert job is not None and job.ledger_state == "refunded"
    assert await store.ledger_sum(user.id) == 2
    assert_ledger_exact(raw)


async def test_commit_and_refund_each_happen_only_once(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    committed = await reserve(store, user.id, 1)
    refunded = await reserve(store, user.id, 1)

    assert await store.commit(committed) is True
    assert await store.commit(committed) is False
    assert await store.refund(committed, "late") is False
    assert await store.refund(refunded, "failed") is True
    assert await store.refund(refunded, "again") is False
    assert await store.commit(refunded) is False
    assert await store.commit(await new_job(store, user.id)) is False  # never reserved

    assert await store.credits(user.id, DAY, 5) == Credits(5, 1, 0)
    assert assert_ledger_exact(raw) == {"reservations": 2, "committed": 1, "refunded": 1}


async def test_partial_commit_spends_the_amount_and_refunds_the_rest_at_once(
    store: Store, raw: Raw
) -> None:
    user = await store.user("qq", "1")
    await store.grant(user.id, 10)
    group = {"group_key": "qq:g1", "group_cap": 20}
    # 8 credits: the 5 of the daily allowance, then 3 of the balance.
    job_id = await reserve(store, user.id, 8, **group)
    assert await store.credits(user.id, DAY, 5) == Credits(5, 5, 7)

    assert await store.commit(job_id, amount=4) is True

    # Spent as if 4 had been reserved: 4 of the allowance; the balance came back first.
    assert await store.credits(user.id, DAY, 5) == Credits(5, 4, 10)
    assert await store.group_used("qq:g1", DAY) == 4
    job = await store.job(job_id)
    assert job is not None and (job.ledger_state, job.cost, job.spent) == ("committed", 8, 4)
    assert await store.ledger_sum(user.id) == 4
    rows = raw.query(
        "SELECT kind, daily_amount, balance_amount FROM ledger WHERE job_id = ? ORDER BY id",
        job_id,
    )
    assert rows == [("reserve", 5, 3), ("commit", 4, 0), ("refund", 1, 3)]
    # Settled once: neither a second commit nor a refund moves anything.
    assert await store.commit(job_id, amount=1) is False
    assert await store.refund(job_id, "late") is False
    assert await store.credits(user.id, DAY, 5) == Credits(5, 4, 10)
    assert assert_ledger_exact(raw) == {"reservations": 1, "committed": 1}


async def test_partial_commit_of_zero_or_all_and_refusal_of_more_than_reserved(
    store: Store, raw: Raw
) -> None:
    user = await store.user("qq", "1")
    nothing = await reserve(store, user.id, 2, group_key="qq:g1")
    everything = await reserve(store, user.id, 2)
    too_much = await reserve(store, user.id, 1)

    assert await store.commit(nothing, amount=0) is True
    assert await store.commit(everything, amount=2) is True
    with pytest.raises(ValueError):
        await store.commit(too_much, amount=2)
    with pytest.raises(ValueError):
        await store.commit(too_much, amount=-1)

    # The refused commit changed nothing: the job is still reserved and can settle later.
    job = await store.job(too_much)
    assert job is not None and job.ledger_state == "reserved"
    assert await store.credits(user.id, DAY, 5) == Credits(5, 3, 0)
    assert await store.group_used("qq:g1", DAY) == 0
    assert (await store.job(nothing)).spent == 0  # type: ignore[union-attr]
    assert assert_ledger_exact(raw) == {"reservations": 3, "committed": 2, "reserved": 1}


async def test_a_job_is_reserved_at_most_once(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    job_id = await reserve(store, user.id, 2)

    with pytest.raises(ReservationError):
        await store.reserve(job_id, user_id=user.id, cost=2, day=DAY, daily_allowance=5)

    assert await store.credits(user.id, DAY, 5) == Credits(5, 2, 0)
    other = await store.user("qq", "2")
    with pytest.raises(ReservationError):
        await store.reserve(
            await new_job(store, user.id), user_id=other.id, cost=1, day=DAY, daily_allowance=5
        )
    assert assert_ledger_exact(raw)["reservations"] == 1


async def test_settled_reservations_and_ledger_rows_are_immutable(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    job_id = await reserve(store, user.id, 1)
    await store.commit(job_id)
    # Refused by the database itself (triggers on both engines), whoever writes.
    with pytest.raises(REFUSED, match="settled"):
        raw.execute("UPDATE reservations SET state = 'refunded' WHERE job_id = ?", job_id)
    with pytest.raises(REFUSED, match="append-only"):
        raw.execute("UPDATE ledger SET balance_amount = 100")
    with pytest.raises(REFUSED, match="append-only"):
        raw.execute("DELETE FROM ledger")
    if raw.engine == "postgresql":
        with pytest.raises(REFUSED, match="append-only"):
            raw.execute("TRUNCATE ledger CASCADE")
    assert raw.value("SELECT state FROM reservations WHERE job_id = ?", job_id) == "committed"
    assert raw.value("SELECT COUNT(*) FROM ledger") == 2


async def test_group_cap_refuses_beyond_cap_and_refund_frees_it(store: Store, raw: Raw) -> None:
    alice = await store.user("qq", "1")
    bob = await store.user("qq", "2")
    group = {"group_key": "qq:g1", "group_cap": 5}
    first = await reserve(store, alice.id, 3, **group)
    await reserve(store, bob.id, 2, **group)

    job_id = await new_job(store, bob.id, group_key="qq:g1")
    with pytest.raises(GroupCapReachedError) as caught:
        await store.reserve(job_id, user_id=bob.id, cost=1, day=DAY, daily_allowance=5, **group)
    assert caught.value.params == {"cap": 5}
    assert await store.credits(bob.id, DAY, 5) == Credits(5, 2, 0)

    # Another group, another day, and the user's own key are not limited by this cap.
    await reserve(store, bob.id, 1, group_key="qq:g2", group_cap=5)
    await reserve(store, bob.id, 1, day=DAY + timedelta(days=1), **group)
    await store.reserve(job_id, user_id=bob.id, cost=0, day=DAY, daily_allowance=5, **group)

    await store.refund(first, "failed")
    await reserve(store, bob.id, 2, **group)
    assert_ledger_exact(raw)


async def test_every_refusal_of_a_reservation_is_the_same_exception_on_both_engines(
    store: Store, raw: Raw
) -> None:
    # PostgreSQL runs the reservation as a server-side function, SQLite as the Python rule:
    # each refusal must raise the same class with the same message and fields on both.
    alice = await store.user("qq", "1")
    bob = await store.user("qq", "2")
    await store.grant(alice.id, 3)

    async def refused(job_id: int, user_id: int, cost: int, **kw: Any) -> Exception:
        kw.setdefault("daily_allowance", 5)
        with pytest.raises(Exception) as caught:
            await store.reserve(job_id, user_id=user_id, cost=cost, day=DAY, **kw)
        return caught.value

    def seen(error: Exception) -> tuple[str, str, dict[str, Any]]:
        return type(error).__name__, str(error), getattr(error, "params", {})

    job = await new_job(store, alice.id)
    assert seen(await refused(job, alice.id, 9)) == (
        "InsufficientCreditsError",
        "insufficient_credits",
        {"needed": 9, "left": 8},
    )
    # The account's own allowance replaces the configured one, never below 0.
    await store.set_daily_allowance(alice.id, 1)
    assert seen(await refused(job, alice.id, 5))[2] == {"needed": 5, "left": 4}
    await store.set_daily_allowance(alice.id, None)
    assert seen(await refused(job, alice.id, 9, daily_allowance=-2))[2] == {
        "needed": 9,
        "left": 3,
    }
    missing = 10**9
    assert seen(await refused(missing, alice.id, 1)) == (
        "NotFoundError",
        f"no job #{missing} or no user #{alice.id}",
        {},
    )
    assert seen(await refused(job, missing, 1)) == (
        "NotFoundError",
        f"no job #{job} or no user #{missing}",
        {},
    )
    assert seen(await refused(job, bob.id, 1)) == (
        "ReservationError",
        f"job #{job} belongs to user #{alice.id}",
        {},
    )
    await store.reserve(job, user_id=alice.id, cost=1, day=DAY, daily_allowance=5)
    assert seen(await refused(job, alice.id, 1)) == (
        "ReservationError",
        f"job #{job} is already reserved (reserved)",
        {},
    )
    done = await new_job(store, alice.id)
    await store.finish_job(done, status="cancelled")
    assert seen(await refused(done, alice.id, 1)) == (
        "ReservationError",
        f"job #{done} is cancelled, not queued",
        {},
    )
    # The group's cap: the lower of the global one and its own (/group cap), 0 being none.
    grouped = await new_job(store, alice.id, group_key="qq:g1")
    assert seen(await refused(grouped, alice.id, 3, group_key="qq:g1", group_cap=2)) == (
        "GroupCapReachedError",
        "group_cap",
        {"cap": 2},
    )
    await store.set_group_rule("qq:g1", "cap", 1)
    for global_cap in (0, 2):
        error = await refused(grouped, alice.id, 2, group_key="qq:g1", group_cap=global_cap)
        assert seen(error)[2] == {"cap": 1}
    # A row /link moved into another account meanwhile is not charged.
    raw.execute("UPDATE users SET account_id = ? WHERE id = ?", alice.id, bob.id)
    bobs = await new_job(store, bob.id)
    assert seen(await refused(bobs, bob.id, 1)) == (
        "ReservationError",
        f"user #{bob.id} was linked into another account",
        {},
    )
    # Nothing refused took anything.
    assert await store.credits(alice.id, DAY, 5) == Credits(5, 1, 3)
    assert assert_ledger_exact(raw) == {"reservations": 1, "reserved": 1}


async def test_calls_made_together_each_get_their_own_outcome(store: Store, raw: Raw) -> None:
    # PostgreSQL runs calls of one statement made together as one batch; a batch that fails
    # runs again call by call, so each caller still gets what it alone would have.
    users = [(await store.user("qq", str(n))).id for n in range(6)]
    for uid in users:
        await store.grant(uid, 2)
    created = await asyncio.gather(
        *(new_job(store, uid) for uid in users * 3),
        new_job(store, 10**9),  # no such user: only this one fails
        return_exceptions=True,
    )
    assert isinstance(created[-1], Exception)
    jobs = [job for job in created[:-1] if isinstance(job, int)]
    assert len(set(jobs)) == len(users) * 3
    # Three jobs of 3 credits each against 5 + 2: the third of each user is refused.
    outcomes = await asyncio.gather(
        *(
            store.reserve(job, user_id=users[n % 6], cost=3, day=DAY, daily_allowance=5)
            for n, job in enumerate(jobs)
        ),
        store.reserve(jobs[0], user_id=users[1], cost=1, day=DAY, daily_allowance=5),
        return_exceptions=True,
    )
    refused = [o for o in outcomes[:-1] if isinstance(o, InsufficientCreditsError)]
    assert len(refused) == len(users)
    # The rest went through, each saying what it left: 7 - 3, then 4 - 3.
    assert sorted(o for o in outcomes[:-1] if o not in refused) == [1] * 6 + [4] * 6
    assert {tuple(sorted(o.params.items())) for o in refused} == {(("left", 1), ("needed", 3))}
    assert isinstance(outcomes[-1], ReservationError)
    committed = await asyncio.gather(*(store.commit(job) for job in jobs), store.commit(10**9))
    assert committed.count(True) == len(users) * 2 and committed[-1] is False
    assert assert_ledger_exact(raw) == {"reservations": 12, "committed": 12}


async def test_a_refusal_raised_by_postgresqls_reservation_function_maps_to_its_exception(
    store: Store,
) -> None:
    # A guard refusing after a write raises (rolling the call back); the store reads it back.
    dialect = store.engine.dialect
    if dialect.reserve_call is None:
        pytest.skip("SQLite runs the reservation as the Python rule")
    for state, outcome, expected in (
        ("DBR01", "insufficient", InsufficientCreditsError(needed=4, left=3)),
        ("DBR02", "group_cap", GroupCapReachedError(cap=3)),
    ):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await store.engine.execute(
                f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{state}',"
                f" MESSAGE = '{outcome}', DETAIL = '3'; END $$"
            )
        refused = dialect.reserve_refused(caught.value)
        assert refused == (outcome, 3, None)
        error = ledger_rules.refusal(refused[0], job_id=1, user_id=1, cost=4, number=refused[1])
        assert type(error) is type(expected) and error.params == expected.params  # type: ignore[attr-defined]
    assert dialect.reserve_refused(ValueError("other")) is None


async def test_own_key_job_records_a_zero_reservation(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    job_id = await new_job(store, user.id, own_key=True)
    await store.reserve(job_id, user_id=user.id, cost=0, day=DAY, daily_allowance=0)

    job = await store.job(job_id)
    assert job is not None and job.own_key and job.cost == 0 and job.ledger_state == "reserved"
    assert await store.commit(job_id) is True
    assert (await store.job(job_id)).ledger_state == "committed"  # type: ignore[union-attr]
    assert assert_ledger_exact(raw)["committed"] == 1


async def test_negative_grant_clamps_at_zero_and_ledger_records_the_actual_change(
    store: Store, raw: Raw
) -> None:
    admin = await store.user("qq", "10001")
    user = await store.user("qq", "1")
    assert await store.grant(user.id, 5, by_user_id=admin.id, note="welcome") == 5
    assert await store.grant(user.id, -8, by_user_id=admin.id) == 0
    assert (await store.user("qq", "1")).granted == 0

    rows = raw.query(
        "SELECT balance_amount, by_user_id, note FROM ledger WHERE kind = 'grant' ORDER BY id"
    )
    assert rows == [(5, admin.id, "welcome"), (-5, admin.id, "")]
    assert_ledger_exact(raw)
    with pytest.raises(NotFoundError):
        await store.grant(9999, 1)


# --- jobs ---


async def test_job_lifecycle_is_recorded(store: Store) -> None:
    user = await store.user("discord", "9")
    job_id = await new_job(
        store, user.id, kind="edit", options={"size": "2048x1152", "quality": "high"}, ref_count=2
    )
    await store.reserve(job_id, user_id=user.id, cost=2, day=DAY, daily_allowance=5)
    queued = await store.job(job_id)
    assert queued is not None and queued.status == "queued" and queued.started_at is None
    assert queued.options == {"size": "2048x1152", "quality": "high"} and queued.ref_count == 2
    assert [j.id for j in await store.active_jobs(user.id)] == [job_id]

    await store.mark_running(job_id, "main")
    outputs = [{"width": 2048, "height": 1152, "bytes": 123456, "mime": "image/png"}]
    await store.finish_job(
        job_id,
        status="succeeded",
        usage={"total_tokens": 100},
        revised_prompt="a cat, oil",
        outputs=outputs,
        provider="backup",
    )
    # A late second outcome (say a cancel racing the success) changes nothing.
    await store.finish_job(job_id, status="cancelled")

    job = await store.job(job_id)
    assert job is not None
    assert (job.status, job.provider, job.cost, job.kind) == ("succeeded", "backup", 2, "edit")
    assert job.usage == {"total_tokens": 100} and job.outputs == outputs
    assert job.revised_prompt == "a cat, oil"
    assert job.started_at is not None and job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at
    assert await store.active_jobs(user.id) == []
    assert await store.job(job_id + 100) is None
    with pytest.raises(ValueError):
        await store.finish_job(job_id, status="running")


async def test_recover_after_crash_refunds_and_fails_interrupted(
    store_url: str, keybox: KeyBox, raw: Raw
) -> None:
    before = await Store.connect(store_url, keybox=keybox)
    user = await before.user("qq", "1")
    await before.grant(user.id, 10)
    running = await reserve(before, user.id, 8)
    await before.mark_running(running, "main")
    queued = await reserve(before, user.id, 1)
    done = await reserve(before, user.id, 1)
    await before.finish_job(done, status="succeeded")  # crashed before commit
    finished_clean = await reserve(before, user.id, 1)
    await before.finish_job(finished_clean, status="succeeded")
    await before.commit(finished_clean)
    assert (await before.credits(user.id, DAY, 5)).total_left == 4
    await before.close()

    after = await Store.connect(store_url, keybox=keybox)
    assert await after.recover() == [running, queued]
    assert await after.recover() == []

    for job_id in (running, queued):
        job = await after.job(job_id)
        assert job is not None
        assert (job.status, job.error_kind, job.ledger_state) == (
            "failed",
            "interrupted",
            "refunded",
        )
        assert job.finished_at is not None
    assert (await after.job(done)).ledger_state == "committed"  # type: ignore[union-attr]
    # 8 (5 daily + 3 balance) and 1 come back; the two succeeded jobs stay spent.
    assert await after.credits(user.id, DAY, 5) == Credits(5, 0, 8)
    await after.close()
    assert assert_ledger_exact(raw) == {"reservations": 4, "committed": 2, "refunded": 2}


async def test_recover_commits_what_a_delivered_job_recorded_instead_of_refunding(
    store_url: str, keybox: KeyBox, raw: Raw
) -> None:
    before = await Store.connect(store_url, keybox=keybox)
    user = await before.user("qq", "1")
    delivered = await reserve(before, user.id, 4, group_key="qq:g1")
    await before.mark_running(delivered, "main")
    # Results handed to the chat, charged for 2 of the 4 images; then the commit never landed.
    await before.mark_delivering(delivered, 2)
    undelivered = await reserve(before, user.id, 1)
    await before.mark_running(undelivered, "main")
    await before.close()

    after = await Store.connect(store_url, keybox=keybox)
    assert await after.recover() == [undelivered]
    job = await after.job(delivered)
    assert job is not None
    assert (job.status, job.error_kind, job.ledger_state) == ("succeeded", None, "committed")
    assert (job.charge, job.spent) == (2, 2)
    assert await after.credits(user.id, DAY, 5) == Credits(5, 2, 0)
    assert await after.group_used("qq:g1", DAY) == 2
    await after.close()
    assert assert_ledger_exact(raw) == {"reservations": 2, "committed": 1, "refunded": 1}


async def test_stats_count_the_days_jobs_images_and_credits(store: Store, raw: Raw) -> None:
    today = datetime.now(UTC).date()
    user = await store.user("qq", "1")
    ok = await reserve(store, user.id, 2, day=today)
    image = {"width": 1024, "height": 1024, "bytes": 1, "mime": "image/png"}
    await store.finish_job(ok, status="succeeded", outputs=[image, image])
    await store.commit(ok)
    failed = await reserve(store, user.id, 1, day=today)
    await store.finish_job(failed, status="failed", error_kind="timeout")
    await store.refund(failed, "timeout")
    running = await reserve(store, user.id, 1, day=today)
    await store.mark_running(running, "main")
    refused = await new_job(store, user.id)  # bad input: never reserved, still a job today
    await store.finish_job(refused, status="failed", error_kind="bad_option")
    old = await reserve(store, user.id, 1, day=today - timedelta(days=1))
    raw.execute("UPDATE jobs SET created_at = created_at - 86400 WHERE id = ?", old)

    stats = await store.stats(today)
    assert stats["users"] == 1
    assert stats["jobs_by_status"] == {"succeeded": 1, "failed": 2, "running": 1}
    assert (stats["jobs_today"], stats["succeeded_today"], stats["failed_today"]) == (4, 1, 2)
    assert stats["images_today"] == 2
    assert stats["credits_today"] == 2
    assert stats["credits_reserved_today"] == 1
    assert stats["jobs_running"] == 1 and stats["jobs_queued"] == 1


async def test_stats_day_follows_the_given_timezone(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    job_id = await new_job(store, user.id)
    # 20:00 UTC on March 1st is already 04:00 on March 2nd in Shanghai.
    instant = datetime(2025, 3, 1, 20, 0, tzinfo=UTC).timestamp()
    raw.execute("UPDATE jobs SET created_at = ? WHERE id = ?", instant, job_id)

    shanghai = ZoneInfo("Asia/Shanghai")
    assert (await store.stats(date(2025, 3, 2), tz=shanghai))["jobs_today"] == 1
    assert (await store.stats(date(2025, 3, 1), tz=shanghai))["jobs_today"] == 0
    assert (await store.stats(date(2025, 3, 1)))["jobs_today"] == 1


async def test_result_messages_map_back_to_their_job(store: Store) -> None:
    user = await store.user("telegram", "1")
    first = await new_job(store, user.id)
    second = await new_job(store, user.id)
    await store.remember_message("telegram", "-100", "77", first)
    await store.remember_message("telegram", "-100", "78", second)

    assert await store.message_job("telegram", "-100", "77") == first
    assert await store.message_job("telegram", "-100", "78") == second
    assert await store.message_job("discord", "-100", "77") is None
    assert await store.message_job("telegram", "-100", "79") is None


# --- under pressure ---


async def test_reserve_waits_while_another_connection_holds_the_lock(
    store: Store, store_url: str, db_path: Path
) -> None:
    """SQLite: another connection holds the file's write lock; PostgreSQL: another
    connection holds the account's row lock. The reservation waits, then goes through."""
    user = await store.user("qq", "1")
    job_id = await new_job(store, user.id)
    locked = threading.Event()
    release: asyncio.Task[None] | None = None

    def hold_write_lock() -> None:
        con = sqlite3.connect(db_path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.5)
        con.execute("COMMIT")
        con.close()

    holder = threading.Thread(target=hold_write_lock)
    if store_url.startswith("sqlite"):
        holder.start()
        await asyncio.to_thread(locked.wait)
    else:
        con = await asyncpg.connect(store_url)
        held = con.transaction()
        await held.start()
        await con.execute("SELECT id FROM users WHERE id = $1 FOR UPDATE", user.id)

        async def let_go() -> None:
            await asyncio.sleep(0.5)
            await held.rollback()
            await con.close()

        release = asyncio.create_task(let_go())
    started = time.monotonic()
    await store.reserve(job_id, user_id=user.id, cost=1, day=DAY, daily_allowance=5)
    waited = time.monotonic() - started
    if release is not None:
        await release
    else:
        await asyncio.to_thread(holder.join)

    assert waited >= 0.3
    assert (await store.job(job_id)).ledger_state == "reserved"  # type: ignore[union-attr]


async def test_cancelled_caller_leaves_no_half_transaction(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    await store.grant(user.id, 100)
    jobs = [await new_job(store, user.id) for _ in range(20)]
    tasks = [
        asyncio.create_task(
            store.reserve(job_id, user_id=user.id, cost=3, day=DAY, daily_allowance=5)
        )
        for job_id in jobs
    ]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    # The store still works, and every reservation that happened is whole and in the ledger.
    extra = await reserve(store, user.id, 1)
    assert await store.commit(extra)
    counts = assert_ledger_exact(raw)
    assert 11 <= counts["reservations"] <= 21


async def test_provider_capabilities_merge_and_survive_reopen(
    store_url: str, keybox: KeyBox, store: Store
) -> None:
    assert await store.provider_capabilities("relay") == {}
    await store.update_provider_capabilities("relay", {"stream": False, "stream_checked": 1.5})
    merged = await store.update_provider_capabilities(
        "relay", {"edits": True, "stream_checked": None}
    )
    assert merged == {"stream": False, "edits": True}
    assert await store.provider_capabilities("other") == {}
    await store.close()
    async with await Store.connect(store_url, keybox=keybox) as again:
        assert await again.provider_capabilities("relay") == {"stream": False, "edits": True}


async def test_a_wave_of_requests_reads_capabilities_once_and_a_late_read_never_undoes_learn(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.update_provider_capabilities("relay", {"stream": False})
    reads = 0
    hold = asyncio.Event()
    hold.set()
    read = asyncio.Event()
    real = store.provider_capabilities

    async def counted(provider: str) -> dict[str, Any]:
        nonlocal reads
        reads += 1
        found = await real(provider)
        read.set()
        await hold.wait()  # the answer, already read, held back
        return found

    monkeypatch.setattr(store, "provider_capabilities", counted)

    # A burst's first wave: 50 requests launched together miss the cache together.
    caps = CapabilityStore(store)
    wave = await asyncio.gather(*(caps.get("relay") for _ in range(50)))
    assert reads == 1
    assert all(c.stream is False for c in wave)

    # One caller giving up does not cancel the read the others wait for.
    caps = CapabilityStore(store)
    hold.clear()
    gone = asyncio.ensure_future(caps.get("relay"))
    staying = asyncio.ensure_future(caps.get("relay"))
    await asyncio.sleep(0.05)
    gone.cancel()
    hold.set()
    assert (await staying).stream is False
    assert reads == 2

    # A read answered after `learn` wrote must not put back what it read before the write.
    caps = CapabilityStore(store)
    hold.clear()
    read.clear()
    late = asyncio.ensure_future(caps.get("relay"))
    await read.wait()  # read from the store, its answer held back
    await caps.learn("relay", stream=True)
    hold.set()
    assert (await late).stream is False  # what was read, as before
    assert caps.cached("relay").stream is True
    assert (await caps.get("relay")).stream is True


async def test_upstream_usage_counts_each_delivered_image_as_drawn(store: Store, raw: Raw) -> None:
    user = await store.user("qq", "1")
    tg = await store.user("telegram", "2")
    square = {"width": 1024, "height": 1024, "bytes": 1, "mime": "image/png"}

    async def done(
        who: int,
        platform: str,
        outputs: list[dict[str, Any]],
        *,
        status: str = "succeeded",
        provider: str | None = "main",
        own_key: bool = False,
        **options: Any,
    ) -> int:
        job_id = await new_job(
            store,
            who,
            platform=platform,
            options={"n": len(outputs), **options},
            own_key=own_key,
        )
        if provider:
            await store.mark_running(job_id, provider)
        await store.finish_job(job_id, status=status, outputs=outputs)
        return job_id

    await done(user.id, "qq", [square, square], size="1024x1024", quality="HIGH")
    await done(user.id, "qq", [square], size="1024x1024", quality="high")
    # Asked for 4K, redrawn at 2K: counted as drawn.
    await done(tg.id, "telegram", [{"width": 2048, "height": 1152}], size="3840x2160")
    # No dimensions recorded: what the job asked for, else "auto".
    await done(tg.id, "telegram", [{"bytes": 5}], size="1536x1024", quality="low")
    await done(tg.id, "telegram", [{"width": 0, "height": 0}], provider=None)
    # Not counted: the user's own key, a failed job, nothing delivered, an older job.
    await done(user.id, "qq", [square], own_key=True)
    await done(user.id, "qq", [square], status="failed")
    await done(user.id, "qq", [])
    old = await done(user.id, "qq", [square, square, square], quality="medium")
    raw.execute("UPDATE jobs SET created_at = created_at - 86400 WHERE id = ?", old)

    since = time.time() - 3600
    assert await store.console_upstream_usage(since) == [
        ("qq", "main", "1024x1024", "high", 3),
        ("telegram", "", "auto", "auto", 1),
        ("telegram", "main", "1536x1024", "low", 1),
        ("telegram", "main", "2048x1152", "auto", 1),
    ]
    assert ("qq", "main", "1024x1024", "medium", 3) in await store.console_upstream_usage(0)
    assert await store.console_upstream_usage(time.time() + 60) == []
