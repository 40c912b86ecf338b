"""Reads of many commands in one statement (issue 15's burst), on both engines.

`Store.users_found` and `Store.credits_of` answer for many users what `user` and `credits`
answer for one; `BatchedReads` queues the reads of commands arriving together and asks them
in one go, with the same answers as direct reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest

from bot.batched_reads import BatchedReads
from bot.groups import GroupRules
from bot.secrets import KeyBox
from bot.store import NotFoundError, Store
from tests.test_store import new_job

DAY = date(2026, 1, 2)


@pytest.fixture
async def store(store_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.connect(
        store_url, keybox=KeyBox.load(tmp_path / "data"), admins={("qq", "10001")}
    )
    yield s
    await s.close()


async def test_users_found_reads_existing_users_as_user_does(store: Store) -> None:
    alice = await store.user("qq", "1", "alice")
    admin = await store.user("qq", "10001", "boss")
    bob = await store.user("telegram", "1", "bob")

    found = await store.users_found(
        [("qq", "1"), ("telegram", "1"), ("qq", "1"), ("qq", "10001"), ("qq", "404")]
    )

    assert found == {("qq", "1"): alice, ("telegram", "1"): bob, ("qq", "10001"): admin}
    assert found[("qq", "10001")].role == "admin"
    assert await store.users_found([]) == {}


async def test_credits_of_matches_credits_for_each_user(store: Store) -> None:
    rich = await store.user("qq", "1")
    poor = await store.user("qq", "2")
    own = await store.user("qq", "3")
    await store.grant(rich.id, 7)
    await store.set_daily_allowance(own.id, 2)
    job = await new_job(store, poor.id, chat_id="c")
    await store.reserve(job, user_id=poor.id, cost=3, day=DAY, daily_allowance=5)

    many = await store.credits_of([rich.id, poor.id, own.id, poor.id, 99999], DAY, 5)

    assert set(many) == {rich.id, poor.id, own.id}
    for user in (rich, poor, own):
        assert many[user.id] == await store.credits(user.id, DAY, 5)
    assert many[poor.id].total_left == 2
    assert many[rich.id].total_left == 12
    assert many[own.id].daily_allowance == 2


async def test_reads_asked_together_go_in_one_statement_with_direct_answers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [await store.user("qq", str(i), f"n{i}") for i in range(5)]
    await store.set_group_rule("qq:g", "size", "1536x1024")
    statements: list[int] = []
    users_found = store.users_found

    async def counted(keys: list[tuple[str, str]]) -> dict[tuple[str, str], object]:
        statements.append(len(keys))
        return await users_found(keys)  # type: ignore[return-value]

    monkeypatch.setattr(store, "users_found", counted)
    reads = BatchedReads(store)

    got = await asyncio.gather(*(reads.user("qq", str(i), f"n{i}") for i in [0, 1, 2, 3, 4, 0]))
    rules = await asyncio.gather(reads.group_rules("qq:g"), reads.group_rules("qq:none"))
    credits = await asyncio.gather(*(reads.credits(u.id, DAY, 5) for u in users))

    assert got == [*users, users[0]]
    assert statements == [5]  # six commands, five users, one statement
    assert rules == [await store.group_rules("qq:g"), GroupRules()]
    assert credits == [await store.credits(u.id, DAY, 5) for u in users]
    with pytest.raises(NotFoundError):
        await reads.credits(99999, DAY, 5)


async def test_a_new_users_commands_together_create_it_once(store: Store) -> None:
    reads = BatchedReads(store)
    got = await asyncio.gather(*(reads.user("qq", "new", "nova") for _ in range(5)))

    assert len({u.id for u in got}) == 1
    assert got[0] == await store.user("qq", "new")
    # A new display name is still written, as `Store.user` does.
    renamed = await reads.user("qq", "new", "nova 2")
    assert renamed.name == "nova 2" and renamed.id == got[0].id


async def test_users_made_creates_and_renames_as_user_does(store: Store) -> None:
    known = await store.user("qq", "1", "alice")
    admin = await store.user("qq", "10001", "boss")
    linked = await store.user("telegram", "7", "al")
    await store.link(await store.create_link_code(known.id), linked.identity_id, DAY)

    made = await store.users_made(
        [
            ("qq", "1", "alice 2"),  # renamed
            ("qq", "10001", ""),  # an empty name keeps the stored one
            ("telegram", "7", "al"),  # linked: its account's id, money and key
            ("qq", "2", "new"),
            ("discord", "2", "other platform, same id"),
            ("qq", "2", "new"),
            # One user under three names in one batch (PostgreSQL writes the batch in one
            # statement, which may upsert a row only once): the last name given stands.
            ("qq", "3", "first"),
            ("qq", "3", "second"),
            ("qq", "3", ""),
        ]
    )

    for (platform, uid, _), user in made.items():
        assert user == await store.user(platform, uid), (platform, uid)
    assert made[("qq", "1", "alice 2")].name == "alice 2"
    assert made[("qq", "10001", "")].name == "boss" and made[("qq", "10001", "")].role == "admin"
    assert made[("telegram", "7", "al")].id == known.id
    assert made[("qq", "2", "new")].id != made[("discord", "2", "other platform, same id")].id
    assert admin.id == made[("qq", "10001", "")].id
    assert {made[("qq", "3", name)].id for name in ("first", "second", "")} == {
        (await store.user("qq", "3")).id
    }
    assert (await store.user("qq", "3")).name == "second"
    assert made[("qq", "3", "first")].name == "second"
    assert await store.users_made([]) == {}


async def test_a_bursts_new_users_are_made_in_one_write(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    users_made = store.users_made

    async def counted(keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], object]:
        writes.append(len(keys))
        return await users_made(keys)  # type: ignore[return-value]

    monkeypatch.setattr(store, "users_made", counted)
    reads = BatchedReads(store)
    got = await asyncio.gather(*(reads.user("qq", str(i % 20), f"n{i % 20}") for i in range(100)))

    assert writes == [20]  # 100 commands of 20 new users: one write
    assert [u.name for u in got] == [f"n{i % 20}" for i in range(100)]
    assert len({u.id for u in got}) == 20

    # 600 commands of 20 more: their reads take three batches (256 at most), each run before
    # the first write landed, so each finds nothing; the users are still written once.
    writes.clear()
    got = await asyncio.gather(*(reads.user("qq", f"b{i % 20}", f"m{i % 20}") for i in range(600)))
    assert writes == [20]
    assert len({u.id for u in got}) == 20


async def test_a_batcher_raises_a_keys_exception_to_that_keys_callers_alone() -> None:
    """`Batcher`: a fetch answering a key with an exception (a reservation whose job could
    not be written) raises it to those who asked for that key; the others get their values;
    a key asked twice is fetched once."""
    from bot.batching import Batcher

    fetched: list[list[str]] = []

    async def fetch(keys: list[str]) -> dict[str, int | Exception]:
        fetched.append(keys)
        return {key: ValueError(key) if key == "bad" else len(key) for key in keys}

    batcher: Batcher[str, int] = Batcher(fetch)
    asked = [batcher.ask(key) for key in ("a", "bad", "ccc", "a", "dddd")]
    said = await asyncio.gather(*asked, return_exceptions=True)
    assert said[0] == 1 and said[2] == 3 and said[3] == 1 and said[4] == 4
    assert isinstance(said[1], ValueError) and str(said[1]) == "bad"
    assert fetched == [["a", "bad", "ccc", "dddd"]]
