"""No secret in anything `drawbridge run` writes at DEBUG, on each platform, through its fake.

Each test runs the real process (`python -m bot run`, DRAWBRIDGE_LOG_LEVEL=DEBUG, every log
line of every logger and of nonebot's loguru on its stderr), sends `/token` with keys in every
spelling users type (quoted, double-quoted, bare, no `sk-` prefix, the Chinese alias), in a
group and in private, draws once, and then looks for each secret in the whole output: the
keys, the bot token, Discord's interaction tokens and the shared upstream key.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from pathlib import Path

from bot.mock_upstream import MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.fake_discord import FakeDiscord, FakeMessage
from tests.fake_onebot import FakeOneBot, text
from tests.fake_telegram import ApiCall, FakeTelegram

# Keys without the "sk-" prefix the shape patterns know: only the redaction of the /token
# argument itself can hide them.
QUOTED_KEY = "Zq8wQuotedSecret4mN5pR7tV9xB2dF"
DOUBLE_QUOTED_KEY = "Hk2jDoubleQuoted8LmN3pQ6rS9tUv"
BARE_KEY = "relay_BareSecret7Yh2Qm9LxPzW4kC"
ALIAS_KEY = "Ly5tAliasSecret2Wq8Er4Ty6Ui0Op"
GROUP_KEY = "Gp3kGroupPosted9Xc7Vb5Nm1Qw3Er"
SK_KEY = "sk-private-Bound6Tn4Rm2Kp8Wq0Zx"
SHARED_KEY = "relay-shared-Mk9Lp0Ou8Iy7Tr6Ew5"

# What a user sends; the QQ and Telegram tests post each of these.
TOKEN_MESSAGES = (
    f"/token '{QUOTED_KEY}'",
    f'/token "{DOUBLE_QUOTED_KEY}"',
    f"/token {BARE_KEY}",
    f"/令牌 '{ALIAS_KEY}'",
    f"/token {SK_KEY}",
)
USER_KEYS = (QUOTED_KEY, DOUBLE_QUOTED_KEY, BARE_KEY, ALIAS_KEY, GROUP_KEY, SK_KEY)


def leaks(log: str, secrets: Iterable[str], *, whole: bool = False) -> list[str]:
    """Each secret that shows in `log`, whole or (unless `whole`) as a piece of it."""
    found = []
    for secret in secrets:
        pieces = {secret, secret[-12:], secret[:12]} if len(secret) >= 20 else {secret}
        if whole:
            pieces = {secret}
        if any(piece in log for piece in pieces):
            found.append(secret)
    return found


def base_env(tmp_path: Path, mock_upstream: MockUpstream, **settings: str) -> dict[str, str]:
    return bot_env(
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY=SHARED_KEY,
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_LOG_LEVEL="DEBUG",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        **settings,
    )


async def test_telegram_at_debug_logs_no_key_and_no_bot_token(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    token = "7654321098:AAHsecretBotTokenValue_Zq8wK3mN5pR7tV"
    async with FakeTelegram(token=token) as fake:
        env = base_env(
            tmp_path, mock_upstream, TELEGRAM_BOT_TOKEN=token, TELEGRAM_API_SERVER=fake.base_url
        )
        bot = BotProcess(env, tmp_path)
        try:
            await bot.start(ready="telegram ready", within=30)
            alice = fake.user(1001)
            private = fake.private_chat(alice)
            group = fake.group_chat()
            sent = 0
            for message in TOKEN_MESSAGES:
                fake.send_message(private, alice, message)
                sent += 1
                await fake.wait_call("sendMessage", count=sent, within=20)
            fake.send_message(group, alice, f"/token {GROUP_KEY}")
            await fake.wait_call("sendMessage", count=sent + 1, within=20)
            fake.send_message(private, alice, "/draw a windmill")

            def with_buttons(call: ApiCall) -> bool:
                return "reply_markup" in call.fields

            await fake.wait_call("sendPhoto", where=with_buttons, within=30)
        finally:
            code = await bot.stop()
    assert code == 0, bot.log[-3000:]
    assert "getUpdates" in bot.log or "Update id=" in bot.log or "telegram" in bot.log
    assert leaks(bot.log, [*USER_KEYS, SHARED_KEY, token, token.split(":", 1)[1]]) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_qq_at_debug_logs_no_key_and_no_access_token(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    access_token = "onebot-access-Zq8wK3mN5pR7"
    port = _free_port()
    env = base_env(
        tmp_path,
        mock_upstream,
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        ONEBOT_ACCESS_TOKEN=access_token,
    )
    bot = BotProcess(env, tmp_path)
    onebot = FakeOneBot(10001)
    try:
        await bot.start(ready=r"\bqq ready\b", within=30)
        await onebot.connect(f"ws://127.0.0.1:{port}/onebot/v11/ws", access_token)
        await bot.wait_output(r"Bot 10001.* connected")
        answers = 0
        for message in TOKEN_MESSAGES:
            await onebot.private_message(20001, [text(message)])
            answers += 1
            await onebot.wait_for(lambda calls, n=answers: _texts(calls) >= n, within=20)
        for message in (f"/token '{GROUP_KEY}'", f"/token {GROUP_KEY}"):
            await onebot.group_message(40001, 20002, [text(message)])
            answers += 1
            await onebot.wait_for(lambda calls, n=answers: _texts(calls) >= n, within=20)
        # Every /token message shows in nonebot's message log: the check looks at something.
        await bot.wait_output(r"Message \d+ from 20002@\[群:40001\]")
        assert sum("/token ***" in line or "/令牌 ***" in line for line in bot.output) >= 7
    finally:
        await onebot.close()
        code = await bot.stop()
    assert code == 0, bot.log[-3000:]
    assert leaks(bot.log, [*USER_KEYS, SHARED_KEY, access_token]) == []


def _texts(calls: Iterable[object]) -> int:
    return sum(1 for c in calls if getattr(c, "action", "").startswith("send_"))


async def test_discord_at_debug_logs_no_key_no_bot_token_and_no_interaction_token(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    fake = FakeDiscord(token="discord-bot-token-Zq8wK3mN5pR7tV9xB2")
    await fake.start()
    env = base_env(
        tmp_path,
        mock_upstream,
        DISCORD_BOT_TOKEN=fake.token,
        DISCORD_API_BASE=fake.api_base,
        DISCORD_GATEWAY_URL=fake.gateway_url,
    )
    bot = BotProcess(env, tmp_path)
    try:
        await bot.start(ready="discord ready", within=30)
        for key in (BARE_KEY, QUOTED_KEY):
            opened = await fake.slash("token")
            await fake.wait_for(lambda opened=opened: opened.modal, within=20)
            submit = await fake.submit_modal(opened, key)
            await fake.wait_message(
                lambda m, submit=submit: m.interaction_id == submit.id, within=20
            )
        drawn = await fake.slash("draw", prompt="a lighthouse at dusk")

        def has_results(message: FakeMessage) -> bool:
            return message.interaction_id == drawn.id and any(
                name.startswith("drawbridge-") for name in message.filenames
            )

        await fake.wait_message(has_results, within=30)
        await asyncio.sleep(0.2)
    finally:
        code = await bot.stop(within=30)
        await fake.stop()
    assert code == 0, bot.log[-3000:]
    # discord.py logged the gateway events and REST calls these tests look through.
    assert "INTERACTION_CREATE" in bot.log and "/interactions/" in bot.log
    assert leaks(bot.log, [BARE_KEY, QUOTED_KEY, SHARED_KEY, fake.token]) == []
    # Interaction tokens end in the interaction's id, which may show: look for them whole.
    tokens = [i.token for i in fake.interactions.values()]
    assert len(tokens) == 5
    assert leaks(bot.log, tokens, whole=True) == []
