"""One wallet across platforms: /link (/绑定), /link CODE, /unlink (/解绑) and /quota's list.

The logic through the platform-neutral harness; then a Telegram and a QQ identity linked
through their fakes (draws on each charged to one balance, one daily allowance), Discord's
ephemeral code, and 1,000 concurrent reservations across two linked identities.
"""

# Fixtures imported from the platforms' test modules are named again as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from nonebot.adapters.onebot.v11 import Bot as OneBot
from nonebot.matcher import Matcher
from nonebot.message import handle_event
from nonebug import App

from adapters.qq import create_platform as create_qq
from adapters.qq.chat import SendPacer
from adapters.qq.handler import build_matcher
from adapters.telegram import TelegramPlatform
from bot.config import Settings
from bot.errors import InsufficientCreditsError
from bot.jobs import today
from bot.mock_upstream import MockUpstream
from bot.secrets import KeyBox
from bot.services import Services
from bot.store import LinkRefused, ReservationError, Store
from plugins.registry import find_command, split_command
from tests.databases import Raw
from tests.fake_telegram import FakeTelegram
from tests.recording_chat import RecordingChat, invocation, run_command
from tests.test_discord import Bot, fake_discord, start_bot  # noqa: F401 (fixtures)
from tests.test_qq_matcher import (
    SELF_ID,
    Matching,
    group_event,
    plain,
    private_event,
    to_group,
)
from tests.test_store import assert_ledger_exact
from tests.test_telegram import FAST, fake  # noqa: F401 (fixtures)

CODE = re.compile(r"\b[A-HJ-NP-Z2-9]{8}\b")
KEY_A = "sk-first-key-aaaaaaaaaaaaaaaa"
KEY_B = "sk-newer-key-bbbbbbbbbbbbbbbb"


def tg(command: str, text: str = "", **fields: Any) -> Any:
    """A command from Telegram user 100, in a private chat unless told."""
    values: dict[str, Any] = {"platform": "telegram", "user_id": "100", "chat_id": "100"}
    values.update(fields)
    return invocation(command, text, **values)


def qq(command: str, text: str = "", **fields: Any) -> Any:
    """A command from QQ user 200, in a private chat unless told."""
    values: dict[str, Any] = {"platform": "qq", "user_id": "200", "chat_id": "private:200"}
    values.update(fields)
    return invocation(command, text, **values)


def code_in(chat: RecordingChat) -> str:
    found = CODE.search(chat.last_text())
    assert found, chat.last_text()
    return found.group(0)


@pytest.fixture
async def services(
    settings_factory: Callable[..., Settings], store_url: str
) -> AsyncIterator[Services]:
    """Live services on each engine in turn (the store's /link rules run on both)."""
    svc = await Services.create(settings_factory(database_url=store_url))
    try:
        yield svc
    finally:
        await svc.close()


def exact(services: Services) -> dict[str, int]:
    """The ledger invariants, checked on whichever database the services use."""
    raw = Raw(services.settings.database())
    try:
        return assert_ledger_exact(raw)
    finally:
        raw.close()


async def left(services: Services, platform: str, uid: str) -> tuple[int, int]:
    """(daily allowance left today, balance) as the identity sees them."""
    user = await services.store.user(platform, uid)
    credits = await services.store.credits(
        user.id, today(services.settings), services.settings.daily_credits
    )
    return credits.daily_left, credits.balance


async def linked(services: Services) -> None:
    """Telegram 100 and QQ 200 in one account, through the commands."""
    code = code_in(await run_command(services, tg("link")))
    done = await run_command(services, qq("link", code))
    assert done.last_text().startswith("Linked"), done.last_text()


# --- declarations ----------------------------------------------------------------------------


def test_link_and_unlink_are_declared_once_with_chinese_aliases() -> None:
    link, unlink = find_command("link"), find_command("unlink")
    assert link is not None and unlink is not None and link.in_menu and unlink.in_menu
    assert find_command("绑定") is link and find_command("解绑") is unlink
    assert split_command("/绑定 ABCD2345") == (link, "ABCD2345")


# --- the code -------------------------------------------------------------------------------


async def test_the_code_is_eight_characters_and_answered_only_where_the_caller_alone_reads(
    services: Services,
) -> None:
    private = await run_command(services, tg("link"))
    [sent] = private.log
    assert sent.ephemeral and len(code_in(private)) == 8
    assert "10 minutes" in sent.text

    group = await run_command(services, tg("link", is_private=False, chat_id="-100"))
    assert group.last_text() == services.t("en", "link.private_only")
    assert not CODE.search(group.everything())

    # A Discord slash command in a server answers ephemerally: the code may go there.
    ephemeral = await run_command(
        services, tg("link", is_private=False, chat_id="-100", private_answer=True)
    )
    assert len(code_in(ephemeral)) == 8


async def test_a_code_posted_in_a_group_is_burnt_and_the_message_deleted(
    services: Services,
) -> None:
    code = code_in(await run_command(services, tg("link")))
    posted = await run_command(services, qq("link", code, is_private=False, chat_id="group:9"))
    assert [s.kind for s in posted.log] == ["delete_invocation", "text"]
    assert posted.last_text() == services.t("en", "link.code_exposed")
    # Whoever read it there cannot use it now, nor can its owner's other identity.
    late = await run_command(services, qq("link", code))
    assert late.last_text() == services.t("en", "link.refused.bad_code")


async def test_expired_own_unknown_and_someone_elses_spent_codes_are_refused(
    services: Services,
) -> None:
    store = services.store
    alice_tg = await store.user("telegram", "100")
    stale = await store.create_link_code(alice_tg.identity_id, ttl=-1)
    expired = await run_command(services, qq("link", stale))
    assert expired.last_text() == services.t("en", "link.refused.expired")

    code = code_in(await run_command(services, tg("link")))
    own = await run_command(services, tg("link", code))
    assert own.last_text() == services.t("en", "link.refused.own_code")
    unknown = await run_command(services, qq("link", "ABCD2345"))
    assert unknown.last_text() == services.t("en", "link.refused.bad_code")

    assert (await run_command(services, qq("link", code))).last_text().startswith("Linked")
    # Someone else (a third person on Discord) holding the spent code cannot join.
    mallory = await run_command(services, invocation("link", code, platform="discord"))
    assert mallory.last_text() == services.t("en", "link.refused.bad_code")
    assert [p for p, _, _ in await store.identities(alice_tg.id)] == ["telegram", "qq"]


async def test_two_identities_of_one_platform_and_banned_ones_cannot_link(
    services: Services,
) -> None:
    store = services.store
    code = code_in(await run_command(services, tg("link")))
    same = await run_command(services, tg("link", code, user_id="101", chat_id="101"))
    assert same.last_text() == services.t("en", "link.refused.same_platform")

    # The code's owner banned after asking for it: the code joins nobody to them.
    await store.set_role((await store.user("telegram", "100")).identity_id, "banned")
    banned = await run_command(services, qq("link", code))
    assert banned.last_text() == services.t("en", "link.refused.banned")
    # A banned identity cannot even ask.
    asked = await run_command(services, tg("link"))
    assert "banned" in asked.last_text().lower() and not CODE.search(asked.last_text())
    assert len(await store.identities((await store.user("qq", "200")).id)) == 1


# --- one account --------------------------------------------------------------------------


async def test_linking_adds_the_balances_as_a_transfer_keeps_the_newer_key_and_one_allowance(
    services: Services, mock_upstream: MockUpstream
) -> None:
    store = services.store
    a = await store.user("telegram", "100")
    b = await store.user("qq", "200")
    await store.grant(a.id, 3)
    await store.grant(b.id, 4)
    await run_command(services, tg("draw", "a fox"))  # 1 of Telegram's allowance
    await run_command(services, qq("draw", "a fox --n 2"))  # 2 of QQ's
    await store.set_api_key(a.id, KEY_A)
    await store.set_api_key(b.id, KEY_B)
    await run_command(services, qq("lang", "zh"))

    code = code_in(await run_command(services, tg("link")))
    done = await run_command(services, qq("link", code))
    text = done.last_text()
    # The answer is in the joining identity's language (zh, set above).
    assert "telegram:100, qq:200" in text
    assert services.t("zh", "link.moved", credits=4) in text
    assert "bbbb" in text  # the newer key, masked, is the one kept

    # One balance (3 + 4), one allowance (5 - 1 - 2), one key, one language, on both sides.
    assert await left(services, "telegram", "100") == (2, 7)
    assert await left(services, "qq", "200") == (2, 7)
    a, b = await store.user("telegram", "100"), await store.user("qq", "200")
    assert a.id == b.id and a.identity_id != b.identity_id
    assert await store.get_api_key(a.id) == KEY_B
    assert a.lang == b.lang == "zh"
    # One job history: both identities' jobs are the account's.
    raw = Raw(services.settings.database())
    owners = {row[0] for row in raw.query("SELECT user_id FROM jobs")}
    kinds = [row[0] for row in raw.query("SELECT kind FROM ledger")]
    raw.close()
    assert owners == {a.id}
    assert kinds.count("transfer") == 2  # one pair: daily and balance moved together

    quota = await run_command(services, tg("quota"))
    # In the account's one language (zh, chosen on QQ), on Telegram too.
    linked_line = services.t("zh", "quota.linked", identities="telegram:100, qq:200")
    assert linked_line in quota.last_text()
    exact(services)


async def test_admin_rights_stay_with_the_identity_named_in_drawbridge_admins(
    settings_factory: Callable[..., Settings], store_url: str
) -> None:
    services = await Services.create(
        settings_factory(admins="telegram:100", database_url=store_url)
    )
    try:
        await linked(services)
        assert (await services.store.user("telegram", "100")).is_admin
        assert not (await services.store.user("qq", "200")).is_admin
        stats = await run_command(services, qq("stats"))
        assert stats.last_text() == services.t("en", "error.not_admin")
        # /ban names one identity: the other keeps its rights.
        await run_command(services, tg("ban", "qq:200"))
        assert (await services.store.user("qq", "200")).is_banned
        assert not (await services.store.user("telegram", "100")).is_banned
    finally:
        await services.close()


async def test_unlink_detaches_the_identity_and_the_credits_stay_with_the_account(
    services: Services,
) -> None:
    store = services.store
    await store.grant((await store.user("telegram", "100")).id, 6)
    await linked(services)

    gone = await run_command(services, qq("unlink"))
    assert gone.last_text() == services.t("en", "unlink.done")
    assert await left(services, "telegram", "100") == (5, 6)
    assert await left(services, "qq", "200") == (5, 0)
    again = await run_command(services, qq("unlink"))
    assert again.last_text() == services.t("en", "unlink.not_linked")

    # The identity holding the account's row leaves: the account moves to the other one.
    await linked(services)
    await run_command(services, tg("unlink"))
    assert await left(services, "qq", "200") == (5, 6)
    assert await left(services, "telegram", "100") == (5, 0)
    exact(services)


async def test_link_waits_for_the_joining_accounts_running_jobs(services: Services) -> None:
    store = services.store
    b = await store.user("qq", "200")
    await store.create_job(
        user_id=b.id,
        platform="qq",
        chat_id="private:200",
        group_key=None,
        kind="draw",
        prompt="p",
        options={},
        ref_count=0,
        own_key=False,
    )
    code = code_in(await run_command(services, tg("link")))
    busy = await run_command(services, qq("link", code))
    assert busy.last_text() == services.t("en", "link.refused.busy")
    assert len(await store.identities(b.id)) == 1


async def test_a_job_of_an_identity_linked_away_meanwhile_is_not_charged_to_its_old_row(
    services: Services,
) -> None:
    """The caller read the user before /link moved the account: no second allowance."""
    store = services.store
    stale = await store.user("qq", "200")
    code = await store.create_link_code((await store.user("telegram", "100")).identity_id)
    await store.link(code, stale.identity_id, DAY)
    job = await store.create_job(
        user_id=stale.id,
        platform="qq",
        chat_id="private:200",
        group_key=None,
        kind="draw",
        prompt="p",
        options={},
        ref_count=0,
        own_key=False,
    )
    with pytest.raises(ReservationError):
        await store.reserve(job, user_id=stale.id, cost=1, day=DAY, daily_allowance=5)
    assert (await store.credits(stale.id, DAY, 5)).daily_used == 0
    exact(services)


# --- through the fakes: a Telegram and a QQ identity --------------------------------------


@pytest.fixture
async def both(
    fake: FakeTelegram, settings_factory: Callable[..., Settings]
) -> AsyncIterator[tuple[Services, type[Matcher]]]:
    """One process's services serving the fake Telegram and QQ (under nonebug) at once."""
    settings = settings_factory(
        telegram_bot_token=fake.token,
        telegram_api_server=fake.base_url,
        image_hosts="127.0.0.1",
        daily_credits=5,
    )
    services = await Services.create(settings)
    telegram = TelegramPlatform(settings, services, flood=FAST, album_wait=0.3, polling_timeout=5)
    await telegram.start()
    qq_platform = create_qq(settings, services)
    qq_platform.handler.pacer = SendPacer(0.0)
    matcher = build_matcher(qq_platform.handler)
    try:
        yield services, matcher
    finally:
        matcher.destroy()
        await telegram.stop()
        await services.close()


async def test_a_telegram_and_a_qq_identity_linked_through_the_fakes_share_one_wallet(
    app: App,
    both: tuple[Services, type[Matcher]],
    fake: FakeTelegram,
    mock_upstream: MockUpstream,
) -> None:
    services, _ = both
    store = services.store
    qq_user = 20077
    alice = fake.user(9001)
    chat = fake.private_chat(alice)
    await store.grant((await store.user("telegram", "9001")).id, 2)

    fake.send_message(chat, alice, "/link")
    answer = await fake.wait_call("sendMessage")
    code = CODE.findall(answer.fields["text"])[0]

    linked_text = Matching(lambda m: plain(m["message"]).startswith("Linked"))
    expired_text = Matching(
        lambda m: plain(m["message"]) == services.t("en", "link.refused.expired")
    )
    async with app.test_api() as ctx:
        bot = ctx.create_bot(base=OneBot, self_id=str(SELF_ID))
        ctx.should_call_api("send_msg", linked_text, {"message_id": 700})
        await handle_event(bot, private_event(f"/绑定 {code}", user_id=qq_user))

        # A draw on each platform.
        draw = group_event("/画 a lighthouse", user_id=qq_user)
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 701})
        ctx.should_call_api("send_msg", to_group(Matching()), {"message_id": 702})
        ctx.should_call_api("delete_msg", {"message_id": 701}, None)
        await handle_event(bot, draw)
        await services.jobs.wait_idle()

        # Another QQ user with an expired code of Alice's is refused.
        stale = await store.create_link_code((await store.user("telegram", "9001")).id, ttl=-1)
        ctx.should_call_api("send_msg", expired_text, {"message_id": 703})
        await handle_event(bot, private_event(f"/link {stale}", user_id=qq_user + 1))

    fake.send_message(chat, alice, "/draw a fox --n 2")
    await fake.wait_for(lambda: len(mock_upstream.requests) == 2, what="the Telegram draw")
    await services.jobs.wait_idle()

    assert len(linked_text.seen) == 1 and len(expired_text.seen) == 1
    # Telegram's menu carries the new commands, in both languages' menus.
    menus = fake.calls_of("setMyCommands")
    assert menus
    for call in menus:
        assert {"link", "unlink", "group"} <= {c["command"] for c in call.json("commands")}
    assert len(mock_upstream.requests) == 2
    # Three images, charged to one account: its one allowance (5) first, then the balance.
    assert await left(services, "telegram", "9001") == (2, 2)
    assert await left(services, "qq", str(qq_user)) == (2, 2)
    stranger = await store.user("qq", str(qq_user + 1))
    assert len(await store.identities(stranger.id)) == 1
    exact(services)


async def test_discord_link_answers_the_code_ephemerally_in_a_server(
    start_bot: Callable[..., Awaitable[Bot]],
) -> None:
    bot = await start_bot()
    command = bot.fake.command("link")
    assert [o["name"] for o in command.get("options", [])] == ["code"]
    interaction = await bot.fake.slash("link")
    message = await bot.answer(interaction, lambda m: bool(CODE.search(m.content)))
    assert message.ephemeral


# --- the ledger under load --------------------------------------------------------------------

DAY = date(2025, 3, 1)
ALLOWANCE = 3
RESERVATIONS = 1000


@pytest.fixture
async def store(store_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.connect(store_url, keybox=KeyBox.load(tmp_path))
    yield s
    await s.close()


async def test_a_thousand_concurrent_reservations_across_two_linked_identities_stay_exact(
    store: Store, store_url: str
) -> None:
    rng = random.Random(14)
    tg_user = await store.user("telegram", "1")
    qq_user = await store.user("qq", "2")
    await store.grant(tg_user.id, 40)
    await store.grant(qq_user.id, 25)
    code = await store.create_link_code(tg_user.identity_id)
    result = await store.link(code, qq_user.identity_id, DAY)
    with pytest.raises(LinkRefused):
        await store.link(code, qq_user.identity_id, DAY)  # spent
    account = result.account_id
    # Each identity resolves to the one account it now shares.
    identities = [await store.user("telegram", "1"), await store.user("qq", "2")]
    assert {u.id for u in identities} == {account}
    granted = 65
    spent = 0
    outcomes: Counter[str] = Counter()

    async def one(n: int) -> None:
        nonlocal spent
        who = identities[n % 2]
        cost = rng.randint(1, 3)
        job = await store.create_job(
            user_id=who.id,
            platform=who.platform,
            chat_id="c",
            group_key=None,
            kind="draw",
            prompt="p",
            options={},
            ref_count=0,
            own_key=False,
        )
        try:
            await store.reserve(job, user_id=who.id, cost=cost, day=DAY, daily_allowance=ALLOWANCE)
        except InsufficientCreditsError:
            outcomes["refused"] += 1
            return
        except ReservationError as exc:  # pragma: no cover - would be a bug
            raise AssertionError(exc) from exc
        await asyncio.sleep(rng.random() * 0.01)
        if rng.random() < 0.5:
            assert await store.commit(job)
            spent += cost
            outcomes["commit"] += 1
        else:
            assert await store.refund(job, "failed")
            outcomes["refund"] += 1

    async def top_up(n: int) -> None:
        nonlocal granted
        await asyncio.sleep(rng.random() * 0.05)
        # Granted through either identity's own row: it lands on the account.
        await store.grant(identities[n % 2].identity_id, 2)
        granted += 2

    tasks = [one(n) for n in range(RESERVATIONS)] + [top_up(n) for n in range(200)]
    rng.shuffle(tasks)
    await asyncio.gather(*tasks)

    assert outcomes["refused"] > 50 and outcomes["commit"] > 50, outcomes
    credits = await store.credits(account, DAY, ALLOWANCE)
    # One allowance for the account, not one per platform.
    assert credits.total_left == granted + ALLOWANCE - spent
    assert credits.daily_allowance == ALLOWANCE
    raw = Raw(store_url)
    counts = assert_ledger_exact(raw)
    raw.close()
    assert counts["reservations"] == RESERVATIONS - outcomes["refused"]
    assert counts.get("reserved", 0) == 0
