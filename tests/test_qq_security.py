"""QQ hardening, end to end against `drawbridge run` as a subprocess.

- User text never becomes CQ code: whatever path a message takes to OneBot (replies, results
  and their captions, errors echoing the user's words, the notice after a crash), the
  `FakeOneBot` reads it the way NapCat does, and no `at` or foreign `image` segment may come
  out of it.
- The OneBot endpoint is never open by accident: a non-loopback `HOST` without
  `ONEBOT_ACCESS_TOKEN` stops `drawbridge run` with exit code 2 and one line saying what to
  set, unless `QQ_ALLOW_NO_TOKEN=true`; with a token, only the right one gets in.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bot.i18n import t
from bot.mock_upstream import MockOptions, MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.fake_onebot import ApiCall, FakeOneBot, ImageHost, text
from tests.test_qq_e2e import _free_port

SELF_ID = 10001
GROUP = 40003
ACCESS_TOKEN = "onebot-security-token-8c2e71"
HOSTILE = "x [CQ:at,qq=all] [CQ:image,file=file:///etc/passwd]"
"""What a user types to ping everyone and have the implementation read a local file."""


def _smuggled(calls: list[ApiCall]) -> list[str]:
    """Segments an implementation would act on that the bot never meant to send: any @,
    and any image that is not one of the bot's own `base64://` results."""
    found = []
    for call in calls:
        if "message" not in call.params:
            continue
        for seg in call.segments:
            file = str(seg["data"].get("file", ""))
            if seg["type"] == "at" or (seg["type"] == "image" and not file.startswith("base64://")):
                found.append(f"{call.action}: {seg}")
    return found


def _sent(calls: list[ApiCall]) -> list[ApiCall]:
    return [c for c in calls if "message" in c.params]


@dataclass
class Running:
    bot: BotProcess
    onebot: FakeOneBot
    upstream: MockUpstream
    url: str


def _env(workdir: Path, api_base: str, port: int, **extra: str) -> dict[str, str]:
    settings = {
        "QQ_ENABLED": "true",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ONEBOT_ACCESS_TOKEN": ACCESS_TOKEN,
        "DRAWBRIDGE_DATA_DIR": str(workdir / "data"),
        "DRAWBRIDGE_API_BASE": api_base,
        "DRAWBRIDGE_API_KEY": "sk-security-test-shared",
        "DRAWBRIDGE_IMAGE_HOSTS": "127.0.0.1",
        "DRAWBRIDGE_DAILY_CREDITS": "20",
        "DRAWBRIDGE_DEFAULT_LANG": "en",
        "DRAWBRIDGE_SHUTDOWN_GRACE": "1",
    }
    return bot_env(**{**settings, **extra})


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    workdir = tmp_path_factory.mktemp("qq-security")
    upstream = MockUpstream()
    api_base = await upstream.start()
    images = ImageHost()
    await images.start()
    port = _free_port()
    process = BotProcess(_env(workdir, api_base, port), workdir)
    onebot = FakeOneBot(SELF_ID, images=images)
    url = f"ws://127.0.0.1:{port}/onebot/v11/ws"
    try:
        await process.start(ready=r"\bqq ready\b")
        await onebot.connect(url, ACCESS_TOKEN)
        await process.wait_output(rf"Bot {SELF_ID}.* connected")
        yield Running(process, onebot, upstream, url)
    finally:
        await onebot.close()
        if process.process is not None:
            await process.stop()
        await images.stop()
        await upstream.stop()


async def _answers(bot: Running, message_id: int, n: int = 1) -> list[ApiCall]:
    """The bot's messages replying to `message_id`, once there are `n` of them."""

    def found(calls: list[ApiCall]) -> list[ApiCall]:
        return [c for c in _sent(calls) if c.reply_to() == message_id]

    try:
        await bot.onebot.wait_for(lambda calls: len(found(calls)) >= n, within=20)
    except TimeoutError:
        raise AssertionError("no answer:\n" + "".join(bot.bot.output[-40:])) from None
    return found(bot.onebot.calls)


async def test_hostile_text_reaches_qq_as_plain_text_on_every_reply_path(
    running: Running,
) -> None:
    say = running.onebot.group_message
    user = 61001

    help_id = await say(GROUP, user, [text(f"/help {HOSTILE}")])
    quota_id = await say(GROUP, user, [text(f"/quota {HOSTILE}")])
    draw_id = await say(GROUP, user, [text(f"/draw {HOSTILE}")])
    bad_id = await say(GROUP, user, [text(f'/draw a cat --format "{HOSTILE}"')])
    # A display name is the user's text as well: the key warning names the sender.
    token_id = await say(
        GROUP, user + 1, [text("/token sk-security-posted-Zx81Qw")], nickname=HOSTILE
    )

    [help_reply] = await _answers(running, help_id)
    [quota_reply] = await _answers(running, quota_id)
    [bad_reply] = await _answers(running, bad_id)
    [warning] = await _answers(running, token_id)
    draw_replies = await _answers(running, draw_id, n=2)
    [result] = [c for c in draw_replies if c.images()]

    assert help_reply.text.startswith(t("en", "help.header", model="gpt-image-2"))
    assert quota_reply.text.startswith(t("en", "quota.text").split("{")[0])
    assert running.upstream.requests[-1].fields["prompt"] == HOSTILE
    assert HOSTILE in result.text  # the caption, whole
    assert bad_reply.text == t("en", "error.bad_option", option="format", value=HOSTILE)
    assert warning.text == t("en", "token.group_deleted", user=HOSTILE)
    assert _smuggled(running.onebot.calls) == []
    assert [c.action for c in _sent(running.onebot.calls) if c.sent_as_string] == []


async def test_wrong_or_missing_access_token_is_refused_and_the_right_one_accepted(
    running: Running,
) -> None:
    # Same length as the token with the last character changed, a prefix, another scheme.
    wrong = [ACCESS_TOKEN[:-1] + "0", ACCESS_TOKEN[:-1], ACCESS_TOKEN + "0", "", None]
    for token in wrong:
        intruder = FakeOneBot(SELF_ID + 1)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await intruder.connect(running.url, token)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(
                running.url,
                headers={"X-Self-ID": "10003", "Authorization": f"Basic {ACCESS_TOKEN}"},
            )
        # nonebot's other accepted spelling of the header.
        ws = await session.ws_connect(
            running.url,
            headers={
                "X-Self-ID": "10004",
                "X-Client-Role": "Universal",
                "Authorization": f"Token {ACCESS_TOKEN}",
            },
        )
        await ws.close()
    friend = FakeOneBot(SELF_ID + 2)
    await friend.connect(running.url, ACCESS_TOKEN)
    try:
        await running.bot.wait_output(rf"Bot {SELF_ID + 2}.* connected")
        assert not friend.closed
    finally:
        await friend.close()


def _group_event(message_id: int, user_id: int, words: str) -> dict[str, object]:
    return {
        "time": int(time.time()),
        "self_id": SELF_ID,
        "post_type": "message",
        "message_type": "group",
        "sub_type": "normal",
        "message_id": message_id,
        "group_id": GROUP,
        "user_id": user_id,
        "message": [text(words)],
        "raw_message": words,
        "font": 0,
        "sender": {"user_id": user_id, "nickname": "mallory", "role": "owner"},
    }


async def test_forged_http_event_without_the_token_is_refused(running: Running) -> None:
    # An HTTP POST under the connected bot's X-Self-ID, as from anyone who reaches the port:
    # nonebot took it as that bot's own event, past the WebSocket's access token.
    base = running.url.removesuffix("/ws")
    forged = {"X-Self-ID": str(SELF_ID)}
    statuses = []
    async with aiohttp.ClientSession() as session:
        for message_id, path, headers in (
            (90001, "/", forged),
            (90002, "/http", forged),
            (90003, "/http/", {**forged, "Authorization": f"Bearer {ACCESS_TOKEN[:-1]}0"}),
            # The right token opens this route as it opens the WebSocket.
            (90004, "/", {**forged, "Authorization": f"Bearer {ACCESS_TOKEN}"}),
        ):
            event = _group_event(message_id, 63001, "/help")
            async with session.post(base + path, json=event, headers=headers) as answer:
                statuses.append(answer.status)
    assert statuses == [403, 403, 403, 204]
    await _answers(running, 90004)
    assert [c for c in _sent(running.onebot.calls) if c.reply_to() in (90001, 90002, 90003)] == []


async def test_notice_after_a_crash_carries_the_hostile_prompt_as_text(tmp_path: Path) -> None:
    upstream = MockUpstream(MockOptions(latency=120))
    api_base = await upstream.start()
    images = ImageHost()
    await images.start()
    port = _free_port()
    # The restarted process recovers the killed one's job once its heartbeat is 3 s stale.
    env = _env(tmp_path, api_base, port, DRAWBRIDGE_PROCESS_TIMEOUT="3")
    url = f"ws://127.0.0.1:{port}/onebot/v11/ws"
    first, second = BotProcess(env, tmp_path), BotProcess(env, tmp_path)
    try:
        await first.start(ready=r"\bqq ready\b")
        onebot = FakeOneBot(SELF_ID, images=images)
        await onebot.connect(url, ACCESS_TOKEN)
        await onebot.group_message(GROUP, 62001, [text(f"/画 {HOSTILE}")])
        async with asyncio.timeout(20):
            while not upstream.requests:  # noqa: ASYNC110 - the mock has no event to wait on
                await asyncio.sleep(0.05)
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        await onebot.close()

        await second.start(ready=r"\bqq ready\b")
        onebot = FakeOneBot(SELF_ID, images=images)
        await onebot.connect(url, ACCESS_TOKEN)
        await onebot.wait_for(
            lambda calls: any("interrupted" in c.text for c in _sent(calls)), within=30
        )
        await onebot.close()
        with sqlite3.connect(tmp_path / "data" / "drawbridge.sqlite3") as db:
            (job_id,) = db.execute("SELECT id FROM jobs").fetchone()
        [notice] = [c for c in _sent(onebot.calls) if "interrupted" in c.text]
        assert notice.action == "send_group_msg" and notice.params["group_id"] == GROUP
        assert notice.text == t("en", "error.interrupted", job=job_id, prompt=HOSTILE)
        assert _smuggled(onebot.calls) == []
        assert not notice.sent_as_string
    finally:
        for bot in (first, second):
            if bot.process is not None:
                await bot.stop()
        await images.stop()
        await upstream.stop()


async def _run_to_exit(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode("utf-8", "replace")


async def test_open_endpoint_without_token_refuses_to_start_with_exit_code_2(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    env = _env(tmp_path, mock_upstream.base_url, _free_port(), HOST="0.0.0.0")
    del env["ONEBOT_ACCESS_TOKEN"]
    code, output = await _run_to_exit(env, tmp_path)
    assert code == 2, output
    assert "Traceback" not in output
    [line] = [x for x in output.splitlines() if "ONEBOT_ACCESS_TOKEN" in x]
    assert "HOST=0.0.0.0" in line and "QQ_ALLOW_NO_TOKEN=true" in line


async def test_open_endpoint_starts_when_the_operator_allows_it(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    env = _env(
        tmp_path, mock_upstream.base_url, _free_port(), HOST="0.0.0.0", QQ_ALLOW_NO_TOKEN="true"
    )
    del env["ONEBOT_ACCESS_TOKEN"]
    process = BotProcess(env, tmp_path)
    try:
        await process.start(ready=r"\bqq ready\b")
        assert "QQ_ALLOW_NO_TOKEN=true" in process.log  # still warned, loudly
    finally:
        assert await process.stop() == 0
