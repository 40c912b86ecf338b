"""The terminal commands through the REAL litellm proxy (PyPI `litellm[proxy]`), offline.

litellm sits in front of the mock upstream the way operators put it in front of a reseller.
It fails every streamed image request with a 500 ('str' object has no attribute
'model_dump') after the upstream already ran (relays.md), so with default settings (streaming
on) the client must ask once more without streaming, remember that for the provider, and
never stream through it again.

The proxy lives in its own venv, installed by `.ci/run` (never a project dependency); its
`litellm` executable is found through DRAWBRIDGE_LITELLM_BIN, else ./.venv-litellm/bin/litellm.
Without it these tests FAIL with the reason: a relay test that silently skips proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bot.mock_upstream import MockUpstream
from tests.test_cli import clean_env, drawbridge, free_port

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-litellm-master-0000000000"
UPSTREAM_KEY = "sk-upstream-behind-litellm-0000"
STARTUP_SECONDS = 180.0
# Proxy variables would send litellm's or the client's loopback calls elsewhere.
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

MockFactory = Callable[..., Awaitable[MockUpstream]]


def litellm_bin() -> Path:
    """The proxy executable, or a test failure saying how to get it."""
    configured = os.environ.get("DRAWBRIDGE_LITELLM_BIN")
    path = Path(configured) if configured else ROOT / ".venv-litellm" / "bin" / "litellm"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"litellm proxy not installed at {path}: run .ci/run, or "
            "python3 -m venv .venv-litellm && .venv-litellm/bin/pip install 'litellm[proxy]' "
            "(or point DRAWBRIDGE_LITELLM_BIN at a litellm executable)"
        )
    return path


def proxy_config(upstream: str) -> dict[str, object]:
    """One model behind litellm, nothing retried, nothing cooled down, nothing phoned home."""
    return {
        "model_list": [
            {
                "model_name": "gpt-image-2",
                "litellm_params": {
                    "model": "openai/gpt-image-2",
                    "api_base": f"{upstream}/v1",
                    "api_key": UPSTREAM_KEY,
                    # litellm's own OpenAI client retries a 5xx twice unless told not to.
                    "max_retries": 0,
                },
            }
        ],
        "litellm_settings": {"num_retries": 0, "request_timeout": 120, "telemetry": False},
        "router_settings": {"num_retries": 0, "disable_cooldowns": True},
        "general_settings": {"master_key": MASTER_KEY},
    }


def no_proxy_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if k not in PROXY_VARS}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


@pytest.fixture
async def litellm_proxy(
    tmp_path: Path, mock_factory: MockFactory
) -> AsyncIterator[tuple[str, MockUpstream]]:
    """The litellm proxy on a free loopback port in front of a fresh mock upstream."""
    executable = litellm_bin()
    mock = await mock_factory(fast_images=True, api_key=UPSTREAM_KEY)
    config = tmp_path / "litellm.yaml"
    # JSON is YAML: no YAML writer needed on the project's side.
    config.write_text(json.dumps(proxy_config(mock.base_url), indent=2))
    port = free_port()
    log_path = tmp_path / "litellm.log"
    env = no_proxy_env(
        # The model cost map ships inside the package; never fetch it from the internet.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
    )
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(executable),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(base, proc, log_path)
        yield base, mock
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


async def _wait_ready(base: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_SECONDS
    async with httpx.AsyncClient(trust_env=False) as http:
        while loop.time() < deadline:
            if proc.returncode is not None:
                pytest.fail(f"litellm exited with {proc.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base}/health/liveliness", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.5)
    pytest.fail(f"litellm did not start in {STARTUP_SECONDS:g}s:\n{_tail(log_path)}")


def png(colour: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


async def test_draw_and_a_two_image_edit_through_litellm_with_default_settings(
    litellm_proxy: tuple[str, MockUpstream], tmp_path: Path
) -> None:
    base, mock = litellm_proxy
    env = no_proxy_env(
        DRAWBRIDGE_API_BASE=base,
        DRAWBRIDGE_API_KEY=MASTER_KEY,
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    for name in ("DRAWBRIDGE_STREAM", "DRAWBRIDGE_PROVIDERS"):
        env.pop(name, None)  # the defaults: streaming on, one provider
    out_dir = tmp_path / "out"

    code, out, err = await drawbridge(
        "draw",
        "a fox",
        "--size",
        "1024x1024",
        "--quality",
        "low",
        "-o",
        str(out_dir),
        env=env,
        cwd=tmp_path,
    )
    assert code == 0, f"first draw failed through litellm:\n{out}\n{err}"
    assert [p for p in out_dir.glob("*.png") if "partial" not in p.name]
    # The streamed attempt reached the upstream (litellm lets it run, then answers 500).
    first = len(mock.requests)
    assert 1 <= first <= 2 and mock.requests[-1].stream is False

    refs = [tmp_path / "ref1.png", tmp_path / "ref2.png"]
    refs[0].write_bytes(png("red", (320, 240)))
    refs[1].write_bytes(png("blue", (240, 320)))
    code, out, err = await drawbridge(
        "edit",
        "merge these",
        *map(str, refs),
        "--quality",
        "low",
        "-o",
        str(out_dir),
        env=env,
        cwd=tmp_path,
    )
    assert code == 0, f"edit failed through litellm:\n{out}\n{err}"
    edits = [r for r in mock.requests[first:] if r.path == "/v1/images/edits"]
    assert len(edits) == 1, "the edit was retried or streamed after streaming was learned"
    assert [f.field for f in edits[0].files] == ["image[]", "image[]"]
    assert not edits[0].stream

    # Learned once (and kept in the data dir), later draws cost one upstream request each.
    for attempt in range(2):
        before = len(mock.requests)
        code, out, err = await drawbridge(
            "draw",
            f"a cat {attempt}",
            "--quality",
            "low",
            "-o",
            str(out_dir),
            env=env,
            cwd=tmp_path,
        )
        assert code == 0, f"later draw failed:\n{out}\n{err}"
        assert len(mock.requests) - before == 1
        assert mock.requests[-1].stream is False


async def test_doctor_through_litellm_passes_free_checks_and_learns_streams_fail(
    litellm_proxy: tuple[str, MockUpstream], tmp_path: Path
) -> None:
    base, mock = litellm_proxy
    env = no_proxy_env(
        DRAWBRIDGE_API_BASE=base,
        DRAWBRIDGE_API_KEY=MASTER_KEY,
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    code, out, err = await drawbridge("doctor", env=env, cwd=tmp_path)
    assert code == 0, f"{out}\n{err}"
    assert "listed" in out and "not reported" in out  # litellm has no billing endpoints
    assert mock.requests == []
    # --spend finds out that image streams fail through litellm (after the upstream ran).
    code, out, err = await drawbridge("doctor", "--spend", env=env, cwd=tmp_path)
    assert code == 0, f"{out}\n{err}"
    [stream_row] = [line for line in out.splitlines() if "  stream  " in line]
    assert "FAILS" in stream_row and "model_dump" in stream_row
    assert "may have been charged" in stream_row
    assert mock.requests[0].stream is True  # it did reach the upstream
    # litellm renames every upload to image.png: the upstream refuses the JPEG reference,
    # two PNGs go through.
    [mixed] = [line for line in out.splitlines() if "  edit, 2 images  " in line]
    assert "unsupported file type" in mixed
    [pngs] = [line for line in out.splitlines() if "  edit, 2 PNGs  " in line]
    assert "  yes  " in pngs


if __name__ == "__main__":  # pragma: no cover - a manual check of the install
    print(litellm_bin(), file=sys.stderr)
