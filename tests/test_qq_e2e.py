"""`drawbridge run` with QQ_ENABLED=true, end to end, as a subprocess.

A `FakeOneBot` (tests/fake_onebot.py) plays NapCat: it connects to the reverse WebSocket with
the access token and pushes group messages; the real nonebot OneBot adapter inside the bot
parses them (fetching quoted messages with `get_msg`) and our adapter answers. Reference
images are served by a stand-in QQ CDN on 127.0.0.1, results come from the mock upstream.
One bot process serves the whole module; each test speaks as its own user.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bot.i18n import t
from bot.mock_upstream import MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.fake_onebot import ApiCall, FakeOneBot, ImageHost, Segment, at, image, png, reply, text

SELF_ID = 10001
GROUP = 40001
ACCESS_TOKEN = "onebot-e2e-token-4b1d9c"
SHARED_KEY = "sk-e2e-shared-7Yh2Qm9LxPz"
_users = itertools.count(50001)


@dataclass
class Running:
    """The bot process and everything it talks to."""

    bot: BotProcess
    onebot: FakeOneBot
    images: ImageHost
    upstream: MockUpstream
    url: str
    data_dir: Path

    @property
    def output(self) -> list[str]:
        return self.bot.output

    async def wait_output(self, pattern: str, within: float = 20.0) -> None:
        await self.bot.wait_output(pattern, within)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data_dir / 'drawbridge.sqlite3'}?mode=ro", uri=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    workdir = tmp_path_factory.mktemp("qq-e2e")
    upstream = MockUpstream()
    api_base = await upstream.start()
    images = ImageHost()
    await images.start()
    port = _free_port()
    # Secrets in `.env`, where operators keep them (and where nonebot's own loader would
    # otherwise pick them up and log its config).
    (workdir / ".env").write_text(
        f"DRAWBRIDGE_API_KEY={SHARED_KEY}\nONEBOT_ACCESS_TOKEN={ACCESS_TOKEN}\n", "utf-8"
    )
    env = bot_env(
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        DRAWBRIDGE_DATA_DIR=str(workdir / "data"),
        DRAWBRIDGE_API_BASE=api_base,
        DRAWBRIDGE_IMAGE_HOSTS="127.0.0.1",
        DRAWBRIDGE_DAILY_CREDITS="50",
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        DRAWBRIDGE_LOG_LEVEL="DEBUG",
        # nonebot's own setting: how long a OneBot action may take before NetworkError.
        API_TIMEOUT="2",
    )
    process = BotProcess(env, workdir)
    onebot = FakeOneBot(SELF_ID, images=images)
    bot = Running(
        process, onebot, images, upstream, f"ws://127.0.0.1:{port}/onebot/v11/ws", workdir / "data"
    )
    try:
        await process.start(ready=r"\bqq ready\b")
        await onebot.connect(bot.url, ACCESS_TOKEN)
        await bot.wait_output(rf"Bot {SELF_ID}.* connected")
        yield bot
    finally:
        await onebot.close()
        code = await process.stop() if process.process is not None else None
        await images.stop()
        await upstream.stop()
    assert code == 0, "".join(bot.output[-40:])
    # No key, token or access token in anything the process wrote, at any level.
    for secret in (SHARED_KEY, ACCESS_TOKEN, *_posted_keys):
        assert _leaks(bot.output, secret) == []


_posted_keys: list[str] = []


def _leaks(output: list[str], secret: str) -> list[str]:
    """Lines showing the secret whole, or the tail a truncated dump of a frame would show."""
    return [line for line in output if secret[-10:] in line]


Finder = Callable[[list[ApiCall]], list[ApiCall]]


def _results_for(message_id: int) -> Finder:
    return lambda calls: [
        c for c in calls if c.action == "send_msg" and c.reply_to() == message_id and c.images()
    ]


def _texts_for(message_id: int) -> Finder:
    return lambda calls: [
        c for c in calls if c.action == "send_msg" and c.reply_to() == message_id and not c.images()
    ]


async def _say(bot: Running, user: int, *segments: Segment) -> int:
    return await bot.onebot.group_message(GROUP, user, list(segments))


async def _until(bot: Running, found: Finder, n: int = 1) -> list[ApiCall]:
    try:
        await bot.onebot.wait_for(lambda calls: len(found(calls)) >= n, within=15)
    except TimeoutError:
        calls = "\n".join(f"{c.action} {c.params}"[:300] for c in bot.onebot.calls[-10:])
        log = "".join(line for line in bot.output[-60:] if "aiosqlite" not in line)
        raise AssertionError(f"no answer; last calls:\n{calls}\nbot log:\n{log}") from None
    return found(bot.onebot.calls)


async def test_draw_command_in_chinese_gets_an_acknowledgement_then_the_image(
    running: Running,
) -> None:
    mid = await _say(running, next(_users), text("/画 a red fox in the snow"))
    [result] = await _until(running, _results_for(mid))
    [ack] = _texts_for(mid)(running.onebot.calls)
    assert re.search(r"job \d+", ack.text)
    assert result.params["group_id"] == GROUP
    assert running.upstream.requests[-1].fields["prompt"] == "a red fox in the snow"
    # The acknowledgement goes once the result is out: no clutter left behind.
    await running.onebot.wait_for(
        lambda calls: any(
            c.action == "delete_msg" and c.params["message_id"] == ack.message_id for c in calls
        )
    )


async def test_mentioned_command_with_several_results_sends_them_one_per_message_paced(
    running: Running,
) -> None:
    mid = await _say(running, next(_users), at(SELF_ID), text(" /draw two moons --n 2"))
    results = await _until(running, _results_for(mid), n=2)
    assert [len(r.images()) for r in results] == [1, 1]
    assert results[1].at - results[0].at >= 0.9


async def test_edit_on_a_quoted_image_uses_that_image(running: Running) -> None:
    user = next(_users)
    posted = await _say(running, user, image(running.images.add("fox.png", png(96, 64))))
    mid = await _say(running, user, reply(posted), at(SELF_ID), text(" /改图 make it blue"))
    await _until(running, _results_for(mid))
    assert "fox.png" in running.images.requests
    edit = running.upstream.requests[-1]
    assert edit.path.endswith("/images/edits")
    assert [(f.width, f.height) for f in edit.files] == [(96, 64)]


async def test_several_references_from_the_message_and_the_quote_all_reach_the_edit(
    running: Running,
) -> None:
    user = next(_users)
    add = running.images.add
    posted = await _say(running, user, image(add("q1.png", png(30, 30))))
    mid = await _say(
        running,
        user,
        reply(posted),
        text("/edit blend these"),
        image(add("m1.png", png(40, 40))),
        image(add("m2.png", png(50, 50))),
    )
    await _until(running, _results_for(mid))
    sizes = sorted((f.width, f.height) for f in running.upstream.requests[-1].files)
    assert sizes == [(30, 30), (40, 40), (50, 50)]


async def test_edit_replying_to_a_result_edits_the_stored_original(running: Running) -> None:
    user = next(_users)
    first = await _say(running, user, text("/draw a paper boat --size 3:2"))
    [result] = await _until(running, _results_for(first))
    served_before = list(running.images.requests)
    mid = await _say(running, user, reply(result.message_id), text("/edit make it green"))
    await _until(running, _results_for(mid))
    edit = running.upstream.requests[-1]
    assert edit.path.endswith("/images/edits")
    assert [(f.width, f.height) for f in edit.files] == [(1536, 1024)]
    # Taken from the job's stored original, not downloaded again from QQ's copy.
    assert running.images.requests == served_before


async def test_reroll_replying_to_a_result_draws_it_again(running: Running) -> None:
    user = next(_users)
    first = await _say(running, user, text("/draw a quiet harbour"))
    [result] = await _until(running, _results_for(first))
    mid = await _say(running, user, reply(result.message_id), text("/重画"))
    await _until(running, _results_for(mid))
    prompts = [r.fields.get("prompt") for r in running.upstream.requests[-2:]]
    assert prompts == ["a quiet harbour", "a quiet harbour"]


async def test_upstream_refusal_is_reported_and_nothing_is_charged(running: Running) -> None:
    mid = await _say(running, next(_users), text("/画 [fail:moderation] a castle"))
    texts = await _until(running, lambda c: [x for x in _texts_for(mid)(c) if "refused" in x.text])
    assert texts[-1].text == t("en", "error.moderation")
    assert _results_for(mid)(running.onebot.calls) == []
    with running.db() as db:
        kinds = db.execute(
            "SELECT l.kind FROM ledger l JOIN jobs j ON j.id = l.job_id WHERE j.prompt LIKE ?",
            ("%a castle",),
        ).fetchall()
    assert sorted(k for (k,) in kinds) == ["refund", "reserve"]


async def test_token_in_a_group_is_recalled_and_warned_about_without_the_key(
    running: Running,
) -> None:
    key = "sk-posted-in-group-Q7w8E9r0T1y2"
    _posted_keys.append(key)
    mid = await _say(running, next(_users), text(f"/token {key}"))
    await running.onebot.wait_for(
        lambda calls: any(c.action == "delete_msg" and c.params["message_id"] == mid for c in calls)
    )
    [warning] = await _until(running, _texts_for(mid))
    assert key not in warning.text
    assert mid not in running.onebot.messages
    await asyncio.sleep(0.3)
    # nonebot logged the message (so the check below looks at something) ...
    logged = [line for line in running.output if f"Message {mid} from" in line]
    assert logged and "/token ***" in logged[0]
    # ... and nothing the process wrote shows the key.
    assert _leaks(running.output, key) == []


async def test_image_on_a_host_not_listed_is_refused_without_downloading(
    running: Running,
) -> None:
    url = running.images.add("elsewhere.png", png(), host="localhost")
    mid = await _say(running, next(_users), text("/edit copy this"), image(url))
    [answer] = await _until(running, _texts_for(mid))
    assert answer.text == t("en", "error.forbidden_url")
    assert "elsewhere.png" not in running.images.requests


async def test_result_send_timing_out_is_not_resent_and_refunded_once(running: Running) -> None:
    user = next(_users)
    running.onebot.stall_next("send_msg", when=lambda call: bool(call.images()))
    mid = await _say(running, user, text("/draw a stalled kite"))
    failed = t("en", "error.delivery_failed")
    await _until(running, lambda c: [x for x in _texts_for(mid)(c) if x.text == failed])
    await asyncio.sleep(0.5)
    assert len(_results_for(mid)(running.onebot.calls)) == 1
    with running.db() as db:
        kinds = db.execute(
            "SELECT l.kind FROM ledger l JOIN jobs j ON j.id = l.job_id WHERE j.prompt = ?",
            ("a stalled kite",),
        ).fetchall()
        used = db.execute(
            "SELECT COALESCE(SUM(d.used), 0) FROM daily_usage d JOIN users u ON u.id = d.user_id"
            " WHERE u.platform = 'qq' AND u.platform_user_id = ?",
            (str(user),),
        ).fetchone()[0]
    assert sorted(k for (k,) in kinds) == ["refund", "reserve"]
    assert used == 0


async def test_implementation_with_a_wrong_access_token_is_refused(running: Running) -> None:
    intruder = FakeOneBot(SELF_ID + 1)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await intruder.connect(running.url, "not-the-token")
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await intruder.connect(running.url, None)


async def test_minimal_implementation_without_send_msg_and_get_msg_still_draws_and_rerolls(
    running: Running,
) -> None:
    # A second implementation on the same endpoint (its own connection, its own Bot) that
    # knows only send_group_msg among the send actions and cannot look messages up.
    minimal = FakeOneBot(SELF_ID + 7, images=running.images)
    minimal.unsupported = {"send_msg", "get_msg"}
    await minimal.connect(running.url, ACCESS_TOKEN)
    try:
        await running.wait_output(rf"Bot {SELF_ID + 7}.* connected")
        user = next(_users)

        def results_for(message_id: int) -> Finder:
            return lambda calls: [
                c
                for c in calls
                if c.action == "send_group_msg" and c.reply_to() == message_id and c.images()
            ]

        async def until(found: Finder) -> list[ApiCall]:
            await minimal.wait_for(lambda calls: bool(found(calls)), within=15)
            return found(minimal.calls)

        first = await minimal.group_message(GROUP, user, [text("/画 a tin robot")])
        [result] = await until(results_for(first))
        assert result.params["group_id"] == GROUP
        mid = await minimal.group_message(GROUP, user, [reply(result.message_id), text("/reroll")])
        await until(results_for(mid))
        prompts = [r.fields.get("prompt") for r in running.upstream.requests[-2:]]
        assert prompts == ["a tin robot", "a tin robot"]
    finally:
        await minimal.close()


async def test_second_image_failing_charges_only_the_first_and_says_so(running: Running) -> None:
    user = next(_users)
    sends = itertools.count()
    # The second result image never gets an answer (nonebot's API_TIMEOUT: NetworkError).
    running.onebot.stall_next(
        "send_msg", when=lambda call: bool(call.images()) and next(sends) == 1
    )
    mid = await _say(running, user, text("/draw --n 2 a pair of kites"))
    partial = t("en", "result.partial_delivery", count=1, total=2)
    await _until(running, lambda c: [x for x in _texts_for(mid)(c) if x.text == partial])
    async with asyncio.timeout(10):
        # The commit follows the message; the job row says when it is written.
        while _status_of(running, "a pair of kites") != "succeeded":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    with running.db() as db:
        rows = db.execute(
            "SELECT l.kind, l.daily_amount + l.balance_amount FROM ledger l"
            " JOIN jobs j ON j.id = l.job_id WHERE j.prompt = ? ORDER BY l.id",
            ("a pair of kites",),
        ).fetchall()
    assert rows == [("reserve", 2), ("commit", 1), ("refund", 1)]


def _status_of(bot: Running, prompt: str) -> str | None:
    with bot.db() as db:
        row = db.execute("SELECT status FROM jobs WHERE prompt = ?", (prompt,)).fetchone()
    return row[0] if row else None
