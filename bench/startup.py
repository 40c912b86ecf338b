"""`drawbridge run` start-up: from the command to every configured platform ready.

    python bench/startup.py           # 5 starts per scenario
    python bench/startup.py --quick   # 1 start per scenario (well under a minute)

Each start is a fresh `python -m bot run` process in an empty working directory (no `.env`),
with a fresh data directory, against the fakes the tests use, all on 127.0.0.1:

  telegram  tests.fake_telegram.FakeTelegram as TELEGRAM_API_SERVER (long polling)
  qq        QQ_ENABLED: the OneBot v11 endpoint; then tests.fake_onebot.FakeOneBot connects
            to it like NapCat would, and "OneBot connected" is when nonebot says so
  discord   tests.fake_discord.FakeDiscord as DISCORD_API_BASE / DISCORD_GATEWAY_URL
  all       the three in one process (the runner starts them one after another)

Times are taken on this side, from just before the process is spawned to the arrival of the
runner's log lines "<name> ready" and "drawbridge ready: ...". The baseline is the import
floor: a fresh interpreter importing the same modules (`bot.runner` and each adapter
package), timed to a line it prints once they are imported; no start can beat it.
"stop" is SIGTERM to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO, add_repo_to_path, machine, median, table

add_repo_to_path()

from bot.mock_upstream import MockUpstream  # noqa: E402
from tests.bot_process import FOREIGN_ENV as _FOREIGN_ENV  # noqa: E402

SCENARIOS: dict[str, tuple[str, ...]] = {
    "telegram": ("telegram",),
    "qq": ("qq",),
    "discord": ("discord",),
    "all three": ("telegram", "qq", "discord"),
}
ADAPTER_MODULES = {
    "telegram": "adapters.telegram",
    "qq": "adapters.qq",
    "discord": "adapters.discord",
}
SELF_ID = 10001
ACCESS_TOKEN = "onebot-bench-token-0000"
API_KEY = "sk-bench-not-a-real-key"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_READY = re.compile(r"\b(telegram|qq|discord) ready\b")
_ALL_READY = re.compile(r"drawbridge ready: ")
_ONEBOT_CONNECTED = re.compile(rf"Bot {SELF_ID}.* connected")


class FakesMissing(Exception):
    """A platform's fake is not importable (yet)."""


@dataclass
class Start:
    """What one `drawbridge run` start showed."""

    ready: dict[str, float] = field(default_factory=dict)  # platform -> seconds
    all_ready: float | None = None
    onebot_connected: float | None = None
    stop: float | None = None
    exit_code: int | None = None
    error: str = ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env(data_dir: Path, upstream: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        DRAWBRIDGE_DATA_DIR=str(data_dir),
        DRAWBRIDGE_API_BASE=upstream,
        DRAWBRIDGE_API_KEY=API_KEY,
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        DRAWBRIDGE_LOG_LEVEL="INFO",
    )
    return env


@contextlib.asynccontextmanager
async def platform_fakes(platforms: tuple[str, ...], env: dict[str, str]) -> AsyncIterator[None]:
    """Start the fakes the platforms need and point `env` at them."""
    async with contextlib.AsyncExitStack() as stack:
        if "telegram" in platforms:
            try:
                from tests.fake_telegram import FakeTelegram
            except ImportError as exc:
                raise FakesMissing(f"tests.fake_telegram: {exc}") from exc
            telegram = FakeTelegram()
            await stack.enter_async_context(telegram)
            env.update(TELEGRAM_BOT_TOKEN=telegram.token, TELEGRAM_API_SERVER=telegram.base_url)
        if "discord" in platforms:
            try:
                from tests.fake_discord import FakeDiscord
            except ImportError as exc:
                raise FakesMissing(f"tests.fake_discord: {exc}") from exc
            discord = FakeDiscord()
            await discord.start()
            stack.push_async_callback(discord.stop)
            env.update(
                DISCORD_BOT_TOKEN=discord.token,
                DISCORD_API_BASE=discord.api_base,
                DISCORD_GATEWAY_URL=discord.gateway_url,
            )
        if "qq" in platforms:
            env.update(
                QQ_ENABLED="true",
                HOST="127.0.0.1",
                PORT=str(_free_port()),
                ONEBOT_ACCESS_TOKEN=ACCESS_TOKEN,
            )
        yield


async def start_once(platforms: tuple[str, ...], upstream: str, tmp: Path) -> Start:
    """Spawn `python -m bot run`, wait until everything is ready, connect OneBot, stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    env = _base_env(workdir / "data", upstream)
    result = Start()
    async with platform_fakes(platforms, env):
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            cwd=workdir,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout is not None
        output: list[str] = []
        changed = asyncio.Event()

        async def read(stream: asyncio.StreamReader) -> None:
            while line := await stream.readline():
                text = line.decode("utf-8", "replace")
                output.append(text)
                now = time.perf_counter() - started
                if match := _READY.search(text):
                    result.ready.setdefault(match.group(1), now)
                if _ALL_READY.search(text) and result.all_ready is None:
                    result.all_ready = now
                if _ONEBOT_CONNECTED.search(text) and result.onebot_connected is None:
                    result.onebot_connected = now
                changed.set()

        async def until(done: object) -> None:
            async with asyncio.timeout(READY_TIMEOUT):
                while not done():  # type: ignore[operator]
                    if process.returncode is not None:
                        raise RuntimeError("exited")
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 0.5)

        reader = asyncio.create_task(read(process.stdout))
        onebot = None
        try:
            await until(lambda: result.all_ready is not None)
            if "qq" in platforms:
                from tests.fake_onebot import FakeOneBot

                onebot = FakeOneBot(SELF_ID)
                await onebot.connect(f"ws://127.0.0.1:{env['PORT']}/onebot/v11/ws", ACCESS_TOKEN)
                await until(lambda: result.onebot_connected is not None)
        except (TimeoutError, RuntimeError) as exc:
            tail = "".join(output[-15:])
            result.error = f"{type(exc).__name__} {exc}: {tail}"
        finally:
            if process.returncode is None:
                stopping = time.perf_counter()
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
                    result.stop = time.perf_counter() - stopping
                except TimeoutError:
                    process.kill()
                    await process.wait()
            result.exit_code = process.returncode
            if onebot is not None:
                await onebot.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 5)
    if result.exit_code not in (0, None) and not result.error:
        result.error = f"exit code {result.exit_code}: {''.join(output[-15:])}"
    return result


async def import_floor(platforms: tuple[str, ...]) -> float:
    """Seconds for a fresh interpreter to start and import the runner and the adapters.

    Timed to the line it prints once imported, not to its exit: tearing down aiogram's
    thousands of models at exit takes a while and is no part of starting.
    """
    modules = ", ".join(["bot.runner", *(ADAPTER_MODULES[p] for p in platforms)])
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"import {modules}; print('imported', flush=True)",
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await process.stdout.readline()
    elapsed = time.perf_counter() - started
    if await process.wait() != 0 or not line.startswith(b"imported"):
        raise RuntimeError(f"cannot import {modules}")
    return elapsed


@dataclass
class Figures:
    """Every start of one scenario."""

    starts: list[Start] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)
    skipped: str = ""


async def measure(runs: int, tmp: Path) -> dict[str, Figures]:
    """Run every scenario `runs` times (interleaved), with the mock upstream in this process."""
    figures = {name: Figures() for name in SCENARIOS}
    # Once, unmeasured: the first import after a change compiles .pyc files and reads cold disk.
    await import_floor(SCENARIOS["all three"])
    async with MockUpstream() as upstream:
        for _ in range(runs):
            for name, platforms in SCENARIOS.items():
                entry = figures[name]
                if entry.skipped:
                    continue
                try:
                    entry.floors.append(await import_floor(platforms))
                    entry.starts.append(await start_once(platforms, upstream.base_url, tmp))
                except FakesMissing as exc:
                    entry.skipped = str(exc)
    return figures


def report(figures: dict[str, Figures], runs: int) -> int:
    """Print the table; 0 if every start reached ready and stopped cleanly."""
    print(f"drawbridge run start-up against the test fakes, {runs} start(s) per scenario; medians")
    print(f"machine: {machine()}")
    print()
    rows: list[list[object]] = []
    problems: list[str] = []

    def seconds(values: list[float]) -> str:
        return f"{median(values):.2f}" if values else "-"

    for name, entry in figures.items():
        if entry.skipped:
            rows.append([name, "-", "-", "-", "-", "-", f"skipped: {entry.skipped}"])
            continue
        good = [s for s in entry.starts if not s.error and s.all_ready is not None]
        for start in entry.starts:
            if start.error:
                problems.append(f"{name}: {start.error.strip()[:600]}")
        ready = [s.all_ready for s in good if s.all_ready is not None]
        floor = median(entry.floors)
        parts = []
        platforms = SCENARIOS[name]
        if len(platforms) > 1:
            previous = [0.0] * len(good)
            for platform in platforms:
                times = [s.ready.get(platform, float("nan")) for s in good]
                steps = [t - p for t, p in zip(times, previous, strict=True)]
                parts.append(f"{platform} +{median(steps):.2f}")
                previous = times
        connected = [s.onebot_connected for s in good if s.onebot_connected is not None]
        rows.append(
            [
                name,
                f"{floor:.2f}",
                seconds(ready),
                f"{median(ready) - floor:.2f}" if ready else "-",
                seconds(connected) if "qq" in platforms else "",
                seconds([s.stop for s in good if s.stop is not None]),
                ", ".join(parts) if parts else f"{len(good)}/{len(entry.starts)} ok",
            ]
        )
    print(
        table(
            [
                "scenario",
                "import floor s",
                "all ready s",
                "ready - floor",
                "OneBot connected s",
                "stop s",
                "notes",
            ],
            rows,
        )
    )
    if problems:
        print()
        print("problems:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 start per scenario")
    parser.add_argument("--runs", type=int, help="starts per scenario (5; quick 1)")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 5)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp:
        figures = asyncio.run(measure(runs, Path(tmp)))
    code = report(figures, runs)
    print(f"({time.monotonic() - started:.0f} s in all)")
    return code


if __name__ == "__main__":
    sys.exit(main())
