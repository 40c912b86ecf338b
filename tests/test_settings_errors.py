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


async def test_an_unknown_event_loop_stops_run_with_exit_2_naming_it(tmp_path: Path) -> None:
    code, stderr = await drawbridge(tmp_path, "run", DRAWBRIDGE_EVENT_LOOP="trio")
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[0].startswith("error: DRAWBRIDGE_EVENT_LOOP")
    assert "auto, asyncio or uvloop" in stderr


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


# Each bad setting the issue names: (settings, the line's start, a word of the accepted form).
BAD_SETTINGS = {
    "timeout with a unit": (
        {"DRAWBRIDGE_TIMEOUT": "5min"},
        "DRAWBRIDGE_TIMEOUT: ",
        "number of seconds",
    ),
    "providers not JSON": (
        {"DRAWBRIDGE_PROVIDERS": '[{"api_base": "http://x", "api_key": "sk-Zq8wK3mN5pR7", }'},
        "DRAWBRIDGE_PROVIDERS: ",
        "JSON list",
    ),
    "providers not a list": (
        {"DRAWBRIDGE_PROVIDERS": '{"api_base": "http://x"}'},
        "DRAWBRIDGE_PROVIDERS: ",
        "JSON list",
    ),
    "provider field unknown": (
        {
            "DRAWBRIDGE_PROVIDERS": '[{"api_base": "http://a", "api_key": "sk-Zq8wK3mN5pR7"}, '
            '{"api_base": "http://b", "api_key": "sk-Zq8wK3mN5pR7", "max_refs": 3}]'
        },
        "DRAWBRIDGE_PROVIDERS[1].max_refs: ",
        "unknown field",
    ),
    "provider value bad": (
        {"DRAWBRIDGE_PROVIDERS": '[{"api_base": "http://a", "api_key": "sk-x", "timeout": "x"}]'},
        "DRAWBRIDGE_PROVIDERS[0].timeout: ",
        "number",
    ),
    "provider without a base": (
        {"DRAWBRIDGE_PROVIDERS": '[{"api_key": "sk-Zq8wK3mN5pR7"}]'},
        "DRAWBRIDGE_PROVIDERS[0].api_base: ",
        "DRAWBRIDGE_API_BASE",
    ),
    "provider base without scheme": (
        {"DRAWBRIDGE_PROVIDERS": '[{"base_url": "relay.example/v1", "api_key": "sk-x"}]'},
        "DRAWBRIDGE_PROVIDERS[0].api_base: ",
        "https://",
    ),
    "admin without platform": (
        {"DRAWBRIDGE_ADMINS": "123456"},
        "DRAWBRIDGE_ADMINS: ",
        "telegram:123456789",
    ),
    "api base without scheme": (
        {"DRAWBRIDGE_API_BASE": "api.example.com/v1", "DRAWBRIDGE_API_KEY": "sk-x"},
        "DRAWBRIDGE_API_BASE: ",
        "https://",
    ),
    "prices not JSON": ({"DRAWBRIDGE_PRICES": "1k=2"}, "DRAWBRIDGE_PRICES: ", "tier"),
    "price not a number": (
        {"DRAWBRIDGE_PRICES": '{"1k": {"high": "two"}}'},
        "DRAWBRIDGE_PRICES.1k.high: ",
        "whole number",
    ),
    "price negative": (
        {"DRAWBRIDGE_PRICES": '{"4k": {"default": -4}}'},
        "DRAWBRIDGE_PRICES.4k.default: ",
        "0",
    ),
    "price tier misspelt": (
        {"DRAWBRIDGE_PRICES": '{"4K": {"hihg": 8}}'},
        "DRAWBRIDGE_PRICES: ",
        "qualities low, medium, high",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
async def test_a_bad_setting_stops_run_draw_edit_and_check_in_one_line_with_exit_2(
    tmp_path: Path, case: str
) -> None:
    settings, start, form = BAD_SETTINGS[case]
    (tmp_path / "ref.png").write_bytes(b"not read")
    results = await asyncio.gather(
        *(
            drawbridge(tmp_path, *args, TELEGRAM_BOT_TOKEN="123456:never-used", **settings)
            for args in (("run",), ("draw", "x"), ("edit", "x", "ref.png"), ("check",))
        )
    )
    for code, stderr in results:
        assert code == 2, stderr
        assert "Traceback" not in stderr and "providers_json" not in stderr
        [line] = stderr.strip().splitlines()
        assert line.startswith("error: " + start), line
        assert form in line
        assert "Zq8wK3mN5pR7" not in line
    assert not (tmp_path / "data").exists()


async def test_a_shared_base_without_a_key_stops_draw_and_edit_naming_the_key(
    tmp_path: Path,
) -> None:
    # Nobody can bind their own key in a terminal: the provider could only answer 401.
    (tmp_path / "ref.png").write_bytes(b"not read")
    for args in (("draw", "x"), ("edit", "x", "ref.png")):
        code, stderr = await drawbridge(tmp_path, *args, DRAWBRIDGE_API_BASE="http://127.0.0.1:9")
        assert code == 2, stderr
        [line] = stderr.strip().splitlines()
        assert line.startswith("error: DRAWBRIDGE_API_KEY: ") and "shared key" in line
    code, stderr = await drawbridge(
        tmp_path,
        "draw",
        "x",
        DRAWBRIDGE_PROVIDERS='[{"api_base": "http://127.0.0.1:9", "api_key": "sk-a"}, '
        '{"api_base": "http://127.0.0.1:9"}]',
    )
    assert code == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: DRAWBRIDGE_PROVIDERS[1].api_key: ")
