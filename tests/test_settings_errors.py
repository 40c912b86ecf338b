"""Bad settings stop `drawbridge` at once with one line per problem, naming the variable."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.config import Settings, settings_error_lines
from tests.bot_process import bot_env


async def drawbridge(tmp_path: Path, *args: str, **settings: str) -> tuple[int, str]:
    """Run `python -m bot ARGS` with only these settings; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=tmp_path,
        env=bot_env(DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"), **settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, stderr.decode("utf-8", "replace")


async def test_an_unknown_timezone_stops_run_draw_and_edit_with_exit_2_naming_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "ref.png").write_bytes(b"not read")
    results = await asyncio.gather(
        *(
            drawbridge(
                tmp_path,
                *args,
                DRAWBRIDGE_TIMEZONE="Mars/Olympus",
                DRAWBRIDGE_API_BASE="http://127.0.0.1:9",
                DRAWBRIDGE_API_KEY="sk-test-never-used-0000",
                TELEGRAM_BOT_TOKEN="123456:never-used",
            )
            for args in (("draw", "x"), ("edit", "x", "ref.png"), ("run",))
        )
    )
    for code, stderr in results:
        assert code == 2, stderr
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert "DRAWBRIDGE_TIMEZONE" in lines[0] and "Asia/Shanghai" in lines[0]
    assert not (tmp_path / "data").exists()


async def test_every_bad_setting_gets_its_own_line_and_no_value_is_echoed(
    tmp_path: Path,
) -> None:
    code, stderr = await drawbridge(
        tmp_path,
        "draw",
        "x",
        DRAWBRIDGE_TIMEZONE="Asia/Shangai",
        DRAWBRIDGE_DAILY_CREDITS="five",
        DRAWBRIDGE_API_KEY="sk-secret-Zq8wK3mN5pR7tV9x",
    )
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    named = sorted(line.split(":")[1].strip() for line in lines)
    assert named == ["DRAWBRIDGE_DAILY_CREDITS", "DRAWBRIDGE_TIMEZONE"]
    assert "five" not in stderr and "Shangai" not in stderr


async def test_unparsable_providers_json_names_the_variable_without_its_keys(
    tmp_path: Path,
) -> None:
    code, stderr = await drawbridge(
        tmp_path,
        "draw",
        "x",
        DRAWBRIDGE_PROVIDERS='[{"api_base": "http://x", "api_key": "sk-in-json-Zq8wK3mN5p", }',
    )
    assert code == 2 and "Traceback" not in stderr
    assert stderr.startswith("error: ") and "DRAWBRIDGE_PROVIDERS" in stderr
    assert "sk-in-json" not in stderr


@pytest.mark.parametrize("name", ["UTC", "Asia/Shanghai", " Europe/Berlin ", "America/New_York"])
def test_iana_timezone_names_are_accepted(name: str) -> None:
    settings = Settings(_env_file=None, timezone=name)
    assert settings.timezone == name.strip()


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "asia/shanghai", "../etc/passwd", "/etc"])
def test_anything_else_is_refused_when_settings_load(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, timezone=name)
    [line] = settings_error_lines(caught.value)
    assert line.startswith("DRAWBRIDGE_TIMEZONE: ") and "IANA" in line
