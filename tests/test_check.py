"""`drawbridge check`: settings checked, configuration shown masked, every endpoint asked for
free (Telegram getMe, Discord /users/@me, the OneBot bind, each provider's /v1/models)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bot.mock_upstream import MockUpstream
from bot.store.migrations import POSTGRES_MIGRATIONS
from tests.databases import Raw
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.test_startup_errors import closed_port, drawbridge, taken_port

TELEGRAM_TOKEN = "7654321:AAHcheckTokenValue_Zq8wK3mN5pR7tV"
DISCORD_TOKEN = "discord-check-token-Zq8wK3mN5pR7tV9x"
API_KEY = "sk-check-shared-Zq8wK3mN5pR7tV9x"


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord(token=DISCORD_TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def row(output: str, check: str) -> str:
    """The table line of one check."""
    [line] = [x for x in output.splitlines() if re.match(rf"{re.escape(check)}\s{{2}}", x)]
    return line


async def test_everything_reachable_exits_0_with_secrets_masked(
    tmp_path: Path, mock_upstream: MockUpstream, fake_discord: FakeDiscord
) -> None:
    async with FakeTelegram(token=TELEGRAM_TOKEN) as telegram:
        code, output = await drawbridge(
            tmp_path,
            "check",
            DRAWBRIDGE_API_BASE=mock_upstream.base_url,
            DRAWBRIDGE_API_KEY=API_KEY,
            TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
            TELEGRAM_API_SERVER=telegram.base_url,
            DISCORD_BOT_TOKEN=DISCORD_TOKEN,
            DISCORD_API_BASE=fake_discord.api_base,
            QQ_ENABLED="true",
            PORT=str(closed_port()),
        )
        asked = [call.method for call in telegram.calls]
    assert code == 0, output
    for check in ("telegram", "discord", "qq (OneBot)", "provider default"):
        assert " ok " in row(output, check), output
    assert "@drawbridge_test_bot" in row(output, "telegram")
    assert asked == ["getMe"]  # nothing but the free check
    assert "all reachable" in output
    # The configuration is shown, secrets masked the way /token shows keys.
    assert "DRAWBRIDGE_API_KEY = sk-...tV9x" in output
    assert "TELEGRAM_BOT_TOKEN = ...R7tV" in output
    for secret in (TELEGRAM_TOKEN, TELEGRAM_TOKEN.split(":")[1], DISCORD_TOKEN, API_KEY):
        assert secret not in output
    assert not (tmp_path / "data" / "drawbridge.sqlite3").exists()  # checked, not started


async def test_each_unreachable_or_refused_part_is_named_and_exits_1(
    tmp_path: Path,
    mock_factory: Callable[..., Awaitable[MockUpstream]],
    fake_discord: FakeDiscord,
) -> None:
    picky = await mock_factory(api_key="sk-the-only-accepted-key-000")
    async with FakeTelegram(token=TELEGRAM_TOKEN) as telegram:
        with taken_port() as port:
            code, output = await drawbridge(
                tmp_path,
                "check",
                DRAWBRIDGE_API_BASE=picky.base_url,
                DRAWBRIDGE_API_KEY=API_KEY,
                TELEGRAM_BOT_TOKEN="1:wrong-telegram-token-000000",
                TELEGRAM_API_SERVER=telegram.base_url,
                DISCORD_BOT_TOKEN=DISCORD_TOKEN,
                DISCORD_API_BASE=f"http://127.0.0.1:{closed_port()}/api/v10",
                QQ_ENABLED="true",
                PORT=str(port),
            )
    assert code == 1, output
    assert "Traceback" not in output
    assert "FAIL" in row(output, "telegram") and "TELEGRAM_BOT_TOKEN" in row(output, "telegram")
    discord_row = row(output, "discord")
    assert "FAIL" in discord_row and "DISCORD_PROXY" in discord_row
    assert "DISCORD_API_BASE" in discord_row
    assert "FAIL" in row(output, "qq (OneBot)") and "PORT" in row(output, "qq (OneBot)")
    assert "FAIL" in row(output, "provider default") and "refused" in output
    assert "4 check(s) failed" in output
    assert "wrong-telegram-token" not in output


async def test_the_platform_apis_are_asked_through_their_proxy_settings(
    tmp_path: Path, mock_upstream: MockUpstream, fake_discord: FakeDiscord
) -> None:
    # The fakes answer, but only straight: a proxy that is down must make both checks fail.
    down = f"http://user:proxy-pass-Zq8w@127.0.0.1:{closed_port()}"
    async with FakeTelegram(token=TELEGRAM_TOKEN) as telegram:
        code, output = await drawbridge(
            tmp_path,
            "check",
            DRAWBRIDGE_API_BASE=mock_upstream.base_url,
            DRAWBRIDGE_API_KEY=API_KEY,
            TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN,
            TELEGRAM_API_SERVER=telegram.base_url,
            TELEGRAM_PROXY=down,
            DISCORD_BOT_TOKEN=DISCORD_TOKEN,
            DISCORD_API_BASE=fake_discord.api_base,
            DISCORD_PROXY=down,
        )
        asked = telegram.calls
    assert code == 1, output
    assert asked == []
    assert "FAIL" in row(output, "telegram") and "TELEGRAM_PROXY" in row(output, "telegram")
    assert "FAIL" in row(output, "discord") and "DISCORD_PROXY" in row(output, "discord")
    assert " ok " in row(output, "provider default")
    # Proxies are shown without their password.
    assert "TELEGRAM_PROXY = http://127.0.0.1:" in output
    assert "proxy-pass" not in output


async def test_bad_settings_exit_2_before_anything_is_asked(tmp_path: Path) -> None:
    code, output = await drawbridge(
        tmp_path, "check", DRAWBRIDGE_TIMEOUT="5min", TELEGRAM_BOT_TOKEN="1:x"
    )
    assert code == 2
    assert output.strip().splitlines() == [
        "error: DRAWBRIDGE_TIMEOUT: must be a number of seconds such as 300 (no unit)"
    ]


async def test_a_shared_base_without_a_key_and_no_platform_is_a_settings_error(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    code, output = await drawbridge(tmp_path, "check", DRAWBRIDGE_API_BASE=mock_upstream.base_url)
    assert code == 2, output
    [line] = output.strip().splitlines()
    assert line.startswith("error: DRAWBRIDGE_API_KEY: ")


async def test_with_a_platform_a_shared_base_without_a_key_is_checked_for_reachability(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    # As `run` allows it: users bring their own keys with /token.
    code, output = await drawbridge(
        tmp_path,
        "check",
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        QQ_ENABLED="true",
        PORT=str(closed_port()),
    )
    assert code == 0, output
    assert "users bind their own" in row(output, "provider default")


async def test_an_open_onebot_endpoint_fails_the_check_as_run_would_refuse_it(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    code, output = await drawbridge(
        tmp_path,
        "check",
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY=API_KEY,
        QQ_ENABLED="true",
        HOST="0.0.0.0",
        PORT=str(closed_port()),
    )
    assert code == 1, output
    line = row(output, "qq (OneBot)")
    assert "FAIL" in line and "ONEBOT_ACCESS_TOKEN" in line


async def test_the_console_alone_is_no_chat_platform(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    # Nobody draws or binds a key in the console: a keyless provider is a settings error and
    # "no chat platform" is a failed row, console or not.
    code, output = await drawbridge(
        tmp_path,
        "check",
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_CONSOLE_PASSWORD="a-long-console-passphrase",
    )
    assert code == 2, output
    assert output.strip().splitlines()[0].startswith("error: DRAWBRIDGE_API_KEY: ")

    code, output = await drawbridge(
        tmp_path,
        "check",
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        DRAWBRIDGE_API_KEY=API_KEY,
        DRAWBRIDGE_CONSOLE_PASSWORD="a-long-console-passphrase",
    )
    assert code == 1, output
    assert "none configured" in row(output, "platforms")
    assert "a-long-console-passphrase" not in output


async def test_a_postgresql_store_is_checked_read_only_and_its_password_masked(
    tmp_path: Path, mock_upstream: MockUpstream, pg_url: str
) -> None:
    """DRAWBRIDGE_DATABASE_URL: the server answers, the schema's version is reported, nothing
    is created; a wrong password or no server is a FAIL row naming the setting."""
    with_password = pg_url.replace("postgresql://postgres@", "postgresql://postgres:pw0rd-Zq8@")
    common = {
        "DRAWBRIDGE_API_BASE": mock_upstream.base_url,
        "DRAWBRIDGE_API_KEY": API_KEY,
        "QQ_ENABLED": "true",
        "PORT": str(closed_port()),
    }
    code, output = await drawbridge(
        tmp_path, "check", DRAWBRIDGE_DATABASE_URL=with_password, **common
    )
    assert code == 0, output
    migrations = len(POSTGRES_MIGRATIONS)
    assert f"schema 0: run (or db upgrade) applies {migrations} migration(s)" in row(
        output, "database"
    )
    assert "pw0rd-Zq8" not in output
    raw = Raw(pg_url)
    try:  # read only: the fresh schema is still empty
        assert raw.value("SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()") == 0
    finally:
        raw.close()

    code, output = await drawbridge(
        tmp_path,
        "check",
        DRAWBRIDGE_DATABASE_URL="postgresql://postgres:s3cret-Zq8@127.0.0.1:1/nothing",
        **common,
    )
    assert code == 1, output
    assert "FAIL" in row(output, "database") and "DRAWBRIDGE_DATABASE_URL" in output
    assert "s3cret-Zq8" not in output
