"""The terminal commands, run as real processes against `drawbridge mock-upstream`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from PIL import Image

from bot.mock_upstream import MockUpstream

ENV_KEYS_TO_DROP = ("TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "QQ_ENABLED", "DRAWBRIDGE_PROVIDERS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS_TO_DROP}
    env.update(extra)
    return env


async def drawbridge(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def mock_process(tmp_path: Path) -> AsyncIterator[str]:
    """`drawbridge mock-upstream` as its own process; yields its base URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "mock-upstream",
        "--port",
        str(port),
        env=clean_env(),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


async def test_draw_writes_a_16_9_png(mock_process: str, tmp_path: Path) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process + "/v1", DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, out, err = await drawbridge(
        "draw", "a red fox", "--size", "16:9", "-o", "out", env=env, cwd=tmp_path
    )
    assert code == 0, err
    [path] = sorted((tmp_path / "out").glob("drawbridge-*-1.png"))
    width, height = Image.open(path).size
    assert abs(width / height - 16 / 9) < 0.02
    assert "usage:" in out
    assert "sk-cli-test-key" not in out + err


async def test_draw_keeps_partial_previews_in_their_folder_with_partials(
    mock_process: str, tmp_path: Path
) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process, DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, _, err = await drawbridge(
        "draw", "a fox", "--partials", "-o", "out", env=env, cwd=tmp_path
    )
    assert code == 0, err
    assert list((tmp_path / "out" / "partials").glob("*partial*"))
    assert not list((tmp_path / "out").glob("*partial*.png"))


async def test_edit_sends_the_image_files(mock_process: str, tmp_path: Path) -> None:
    ref = tmp_path / "in.jpg"
    Image.new("RGB", (300, 200), "green").save(ref, "JPEG")
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process, DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, _, err = await drawbridge(
        "edit", "make it blue", str(ref), "--size", "1:1", "-o", "out", env=env, cwd=tmp_path
    )
    assert code == 0, err
    [path] = sorted((tmp_path / "out").glob("drawbridge-*-1.png"))
    assert Image.open(io.BytesIO(path.read_bytes())).size == (1024, 1024)


async def test_upstream_error_is_one_line_and_exit_1(mock_process: str, tmp_path: Path) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process, DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, _, err = await drawbridge(
        "draw", "a fox [fail:moderation]", "--lang", "en", env=env, cwd=tmp_path
    )
    assert code == 1
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "rephrase" in line


async def test_invalid_size_is_refused_before_any_request(tmp_path: Path) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE="http://127.0.0.1:9", DRAWBRIDGE_API_KEY="sk-x")
    code, _, err = await drawbridge("draw", "a fox", "--size", "1919x1079", env=env, cwd=tmp_path)
    assert code == 1
    assert "1919x1079" in err


async def test_run_without_platforms_names_the_settings_and_fails(tmp_path: Path) -> None:
    env = clean_env(DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"))
    code, _, err = await drawbridge("run", env=env, cwd=tmp_path)
    assert code != 0
    for name in ("TELEGRAM_BOT_TOKEN", "QQ_ENABLED", "DISCORD_BOT_TOKEN"):
        assert name in err


async def test_draw_passes_background_compression_and_moderation(
    mock_process: str, tmp_path: Path
) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process, DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, _, err = await drawbridge(
        "draw",
        "a sticker",
        "--format",
        "webp",
        "--compression",
        "70",
        "--background",
        "transparent",
        "--moderation",
        "low",
        "-o",
        "out",
        env=env,
        cwd=tmp_path,
    )
    assert code == 0, err
    [path] = sorted((tmp_path / "out").glob("drawbridge-*-1.webp"))
    assert Image.open(path).format == "WEBP"


@pytest.mark.parametrize(
    ("lang", "size", "expected"),
    [
        ("en", "99:1", "The nearest valid ratio is 3:1"),
        ("zh", "99:1", "最接近的可用比例是 3:1"),
        ("en", "16:9 8k", "the tiers are 1k, 2k and 4k, the largest. Try 16:9 4k"),
        ("zh", "abc", "看不懂尺寸 abc"),
    ],
)
async def test_a_bad_size_is_told_in_the_configured_language(
    tmp_path: Path, lang: str, size: str, expected: str
) -> None:
    # A closed port: a request that got that far would fail with another message.
    env = clean_env(
        DRAWBRIDGE_API_BASE="http://127.0.0.1:9",
        DRAWBRIDGE_API_KEY="sk-x",
        DRAWBRIDGE_DEFAULT_LANG=lang,
    )
    code, _, err = await drawbridge("draw", "a fox", "--size", size, env=env, cwd=tmp_path)
    assert code == 1
    assert expected in err
    assert "[invalid_size]" in err


async def test_n_out_of_range_is_refused_in_terminal_words(tmp_path: Path) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE="http://127.0.0.1:9", DRAWBRIDGE_API_KEY="sk-x")
    code, _, err = await drawbridge(
        "draw", "a fox", "--n", "11", "--lang", "en", env=env, cwd=tmp_path
    )
    assert code == 1
    assert "error: Invalid value for --n: 11 (1-4). [bad_option]" in err
    assert "/help" not in err


async def test_without_a_key_the_error_names_the_settings_and_exits_2(tmp_path: Path) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE="", DRAWBRIDGE_API_KEY="", DRAWBRIDGE_DEFAULT_LANG="en")
    code, _, err = await drawbridge("draw", "a fox", env=env, cwd=tmp_path)
    assert code == 2
    assert "DRAWBRIDGE_API_KEY" in err and "/token" not in err


async def test_a_draw_never_overwrites_a_file_of_the_same_second(
    mock_process: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # Files named as this draw would name its own, for every second it may start in.
    now = time.time()
    taken = [
        out / f"drawbridge-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}-1.png"
        for s in range(-1, 30)
    ]
    for path in taken:
        path.write_bytes(b"keep me")
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process, DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, stdout, err = await drawbridge("draw", "a fox", "-o", "out", env=env, cwd=tmp_path)
    assert code == 0, err
    assert all(path.read_bytes() == b"keep me" for path in taken)
    [written] = [line.split()[0] for line in stdout.splitlines() if "bytes" in line]
    data = await asyncio.to_thread((tmp_path / written).read_bytes)
    assert data.startswith(b"\x89PNG")


async def test_off_a_terminal_progress_and_log_lines_are_whole_lines(
    tmp_path: Path, mock_factory: Callable[..., Awaitable[MockUpstream]]
) -> None:
    broken = await mock_factory(fail="no_channel", latency=0.3)
    good = await mock_factory(latency=0.3)
    env = clean_env(DRAWBRIDGE_PROVIDERS=two_providers(broken, good))
    code, stdout, err = await drawbridge("draw", "a fox", "-o", "out", env=env, cwd=tmp_path)
    assert code == 0, err
    assert "\r" not in err
    log_lines = [line for line in err.splitlines() if " bot.upstream." in line]
    assert any("trying the next" in line for line in log_lines)
    assert all(line[:4].isdigit() for line in log_lines), log_lines  # time stamps first
    usage = [line for line in stdout.splitlines() if line.startswith("usage:")]
    assert usage and "{" not in usage[0]


async def test_on_a_terminal_a_log_line_never_runs_into_the_progress_line(
    tmp_path: Path, mock_factory: Callable[..., Awaitable[MockUpstream]]
) -> None:
    broken = await mock_factory(fail="no_channel", latency=1.5)
    good = await mock_factory(latency=1.5)
    env = clean_env(DRAWBRIDGE_PROVIDERS=two_providers(broken, good))
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "draw",
            "a fox",
            "-o",
            "out",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        screen = await asyncio.to_thread(read_all, master)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = screen.decode(errors="replace").replace("\r\n", "\n")
    assert "waiting 0:0" in text  # the progress line was there to collide with
    # What the terminal shows on each line: what follows its last carriage return.
    shown = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in text.split("\n")]
    log_lines = [line for line in shown if " bot.upstream." in line]
    assert any("trying the next" in line for line in log_lines)
    # Each log line starts with its time stamp, not after "waiting 0:01".
    assert all(line[:4].isdigit() for line in log_lines), log_lines


def two_providers(first: MockUpstream, second: MockUpstream) -> str:
    return json.dumps(
        [
            {"name": "first", "api_base": first.base_url, "api_key": "sk-first-0000000"},
            {"name": "second", "api_base": second.base_url, "api_key": "sk-second-000000"},
        ]
    )


def read_all(fd: int) -> bytes:
    """Everything written to a pty until its last writer closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# --- --version, --env-file, --help --------------------------------------------------------

SETTINGS_COMMANDS = ("run", "draw", "edit", "check", "doctor")


async def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    code, out, _ = await drawbridge("--version", env=clean_env(), cwd=tmp_path)
    assert code == 0
    assert out.strip() == f"drawbridge {version('drawbridge')}"


@pytest.mark.parametrize("command", SETTINGS_COMMANDS)
async def test_env_file_is_where_the_settings_come_from(tmp_path: Path, command: str) -> None:
    # A bad value only in that file proves the file was read (and ./.env was not).
    (tmp_path / "bot.env").write_text("DRAWBRIDGE_TIMEOUT=5min\n")
    (tmp_path / ".env").write_text("DRAWBRIDGE_ADMINS=123456\n")
    args = {"draw": ("draw", "x"), "edit": ("edit", "x", "ref.png")}.get(command, (command,))
    code, _, err = await drawbridge(*args, "--env-file", "bot.env", env=clean_env(), cwd=tmp_path)
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith("error: DRAWBRIDGE_TIMEOUT: ")


async def test_the_default_env_file_is_dot_env_in_the_working_folder(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DRAWBRIDGE_ADMINS=123456\n")
    code, _, err = await drawbridge("check", env=clean_env(), cwd=tmp_path)
    assert code == 2
    assert err.startswith("error: DRAWBRIDGE_ADMINS: ")


async def test_a_missing_env_file_is_an_error_naming_it(tmp_path: Path) -> None:
    code, _, err = await drawbridge(
        "run", "--env-file", "/etc/drawbridge/nope.env", env=clean_env(), cwd=tmp_path
    )
    assert code == 2
    assert err.strip() == "error: --env-file /etc/drawbridge/nope.env: no such file"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", SETTINGS_COMMANDS)
def test_help_says_where_the_api_base_and_key_come_from(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("DRAWBRIDGE_API_BASE", "DRAWBRIDGE_API_KEY", "DRAWBRIDGE_PROVIDERS", ".env"):
        assert name in text
    assert "--env-file PATH" in text


@pytest.mark.parametrize("command", ["run", "draw", "edit", "check", "doctor", "mock-upstream"])
def test_every_argument_of_the_service_commands_is_described(command: str) -> None:
    import argparse

    from bot.cli import build_parser

    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser = commands.choices[command]
    assert parser.description
    assert [a.dest for a in parser._actions if not a.help] == []
