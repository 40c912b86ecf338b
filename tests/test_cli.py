"""The terminal commands, run as real processes against `drawbridge mock-upstream`."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

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


async def test_draw_saves_partial_previews_when_streaming(
    mock_process: str, tmp_path: Path
) -> None:
    env = clean_env(DRAWBRIDGE_API_BASE=mock_process, DRAWBRIDGE_API_KEY="sk-cli-test-key")
    code, _, err = await drawbridge("draw", "a fox", "-o", "out", env=env, cwd=tmp_path)
    assert code == 0, err
    assert list((tmp_path / "out").glob("*partial*"))


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
    code, _, err = await drawbridge("draw", "a fox [fail:moderation]", env=env, cwd=tmp_path)
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
