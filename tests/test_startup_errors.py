"""Start-up failures of `drawbridge run` (and mock-upstream): one line naming what to check,
an exit code a supervisor can act on (2: fix a setting, 1: may pass later), no traceback."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bot.mock_upstream import MockUpstream
from tests.bot_process import BotProcess, bot_env
from tests.databases import POSTGRES_URL, postgres_or_skip
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram


async def drawbridge(tmp_path: Path, *args: str, **settings: str) -> tuple[int, str]:
    """Run `python -m bot ARGS` to its end with only these settings: exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=tmp_path,
        env=bot_env(DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"), **settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 90)
    return process.returncode or 0, output.decode("utf-8", "replace")


@contextmanager
def taken_port() -> Iterator[int]:
    """A port some other process (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def upstream(mock: MockUpstream) -> dict[str, str]:
    return {"DRAWBRIDGE_API_BASE": mock.base_url, "DRAWBRIDGE_API_KEY": "sk-test-start-000000"}


async def test_console_port_in_use_is_one_line_naming_its_port_and_exit_1(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    with taken_port() as port:
        code, output = await drawbridge(
            tmp_path,
            "run",
            DRAWBRIDGE_CONSOLE_PASSWORD="console-start-test-pass",
            DRAWBRIDGE_CONSOLE_PORT=str(port),
            **upstream(mock_upstream),
        )
    assert code == 1, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert f"127.0.0.1:{port}" in line and "DRAWBRIDGE_CONSOLE_PORT" in line


async def test_qq_port_in_use_is_one_line_naming_port_and_exit_1(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    with taken_port() as port:
        code, output = await drawbridge(
            tmp_path, "run", QQ_ENABLED="true", PORT=str(port), **upstream(mock_upstream)
        )
    assert code == 1, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert f"127.0.0.1:{port}" in line and "PORT" in line and "in use" in line


async def test_telegram_refusing_the_token_is_exit_2_naming_telegram_bot_token(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    wrong = "1234567:wrong-token-Zq8wK3mN5pR7tV9x"
    async with FakeTelegram() as fake:
        code, output = await drawbridge(
            tmp_path,
            "run",
            TELEGRAM_BOT_TOKEN=wrong,
            TELEGRAM_API_SERVER=fake.base_url,
            **upstream(mock_upstream),
        )
    assert code == 2, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert "TELEGRAM_BOT_TOKEN" in line and "401" in line and "TELEGRAM_API_SERVER" in line
    assert "wrong-token" not in output


async def test_telegram_unreachable_is_exit_1_naming_the_proxy_and_api_server(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    code, output = await drawbridge(
        tmp_path,
        "run",
        TELEGRAM_BOT_TOKEN="1234567:never-reaches-anything",
        TELEGRAM_API_SERVER=f"http://127.0.0.1:{closed_port()}",
        **upstream(mock_upstream),
    )
    assert code == 1, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert "cannot reach the Telegram Bot API" in line
    assert "TELEGRAM_PROXY" in line and "TELEGRAM_API_SERVER" in line
    assert "never-reaches-anything" not in output


async def test_discord_refusing_the_token_is_exit_2_naming_discord_bot_token(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        code, output = await drawbridge(
            tmp_path,
            "run",
            DISCORD_BOT_TOKEN="wrong-discord-token-0123456789",
            DISCORD_API_BASE=fake.api_base,
            DISCORD_GATEWAY_URL=fake.gateway_url,
            **upstream(mock_upstream),
        )
    finally:
        await fake.stop()
    assert code == 2, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert "DISCORD_BOT_TOKEN" in line and "401" in line and "DISCORD_API_BASE" in line
    assert "wrong-discord-token" not in output
    assert fake.identifies == []


async def test_discord_unreachable_is_exit_1_naming_the_proxy_and_api_base(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    code, output = await drawbridge(
        tmp_path,
        "run",
        DISCORD_BOT_TOKEN="never-sent-token-0123456789",
        DISCORD_API_BASE=f"http://127.0.0.1:{closed_port()}/api/v10",
        **upstream(mock_upstream),
    )
    assert code == 1, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert "cannot reach Discord" in line
    assert "DISCORD_PROXY" in line and "DISCORD_API_BASE" in line


async def test_mock_upstream_on_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with taken_port() as port:
        code, output = await drawbridge(tmp_path, "mock-upstream", "--port", str(port))
    assert code == 1, output
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert f"127.0.0.1:{port}" in line and "--port" in line


async def test_a_shared_base_without_a_key_starts_with_one_warning(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    # Legal for `run`: users bind their own keys with /token. Worth one line at start.
    env = bot_env(
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
        DRAWBRIDGE_API_BASE=mock_upstream.base_url,
        QQ_ENABLED="true",
        PORT=str(closed_port()),
        DRAWBRIDGE_SHUTDOWN_GRACE="1",
    )
    bot = BotProcess(env, tmp_path)
    try:
        await bot.start(ready="drawbridge ready", within=30)
    finally:
        code = await bot.stop()
    assert code == 0, bot.log
    warnings = [line for line in bot.log.splitlines() if "WARNING" in line and "/token" in line]
    assert len(warnings) == 1 and "DRAWBRIDGE_API_KEY" in warnings[0]


async def test_an_unreachable_database_is_one_line_naming_its_setting_and_exit_1(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    code, output = await drawbridge(
        tmp_path,
        "run",
        QQ_ENABLED="true",
        PORT=str(closed_port()),
        DRAWBRIDGE_DATABASE_URL="postgresql://drawbridge:pw-Zq8wK3@127.0.0.1:1/drawbridge",
        **upstream(mock_upstream),
    )
    assert code == 1, output
    assert "DRAWBRIDGE_DATABASE_URL" in output and "cannot reach the database" in output
    assert "Traceback" not in output and "pw-Zq8wK3" not in output


async def test_a_database_that_refuses_drawbridge_is_exit_2(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    await postgres_or_skip()
    no_such = POSTGRES_URL.rsplit("/", 1)[0] + "/drawbridge_no_such_database"
    code, output = await drawbridge(
        tmp_path,
        "run",
        QQ_ENABLED="true",
        PORT=str(closed_port()),
        DRAWBRIDGE_DATABASE_URL=no_such,
        **upstream(mock_upstream),
    )
    assert code == 2, output
    assert "refused drawbridge" in output and "DRAWBRIDGE_DATABASE_URL" in output
    assert "Traceback" not in output


async def test_the_cli_with_an_unreachable_database_is_one_line_and_exit_1(
    tmp_path: Path, mock_upstream: MockUpstream
) -> None:
    """`drawbridge draw` opens the bot's store (what relays were found able to do): the same
    one line as `run` when it cannot, before anything is bought."""
    code, output = await drawbridge(
        tmp_path,
        "draw",
        "a lighthouse",
        DRAWBRIDGE_DATABASE_URL="postgresql://drawbridge:pw-Zq8wK3@127.0.0.1:1/drawbridge",
        **upstream(mock_upstream),
    )
    assert code == 1, output
    assert "cannot reach the database" in output and "DRAWBRIDGE_DATABASE_URL" in output
    assert "Traceback" not in output and "pw-Zq8wK3" not in output
    assert mock_upstream.requests == []
