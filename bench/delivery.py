"""Result delivery lag: from the upstream's last byte to the platform receiving the result.

    python bench/delivery.py                    # 7 streamed /draw jobs per platform and latency
    python bench/delivery.py --quick            # 2 per platform and latency (under a minute)
    python bench/delivery.py --before REV       # also the bot as of git revision REV

One `python -m bot run` process (empty working directory, fresh data directory) serves all
three platforms against the fakes the tests use, all on 127.0.0.1 and all in this process:

  telegram  tests.fake_telegram.FakeTelegram as TELEGRAM_API_SERVER (long polling); each
            job comes from a new user in a new private chat
  qq        tests.fake_onebot.FakeOneBot on the bot's OneBot v11 endpoint; group messages
  discord   tests.fake_discord.FakeDiscord as DISCORD_API_BASE / DISCORD_GATEWAY_URL;
            the /draw slash command

The upstream is the mock (`bot.mock_upstream.MockUpstream`) streaming each image with the
default 2 partial previews, spread over each of the `--latency` values in turn (default 1.0
and 2.0 s: a partial every 0.33 or 0.67 s), so the bot has shown a status line and a
preview, and has an edit or a preview in hand, when the final image arrives. The bot's
settings are the defaults (stream on, Telegram's default flood policy: what a deployment
runs).

The lag of one job is measured on this process's monotonic clock, from the mock writing the
last byte of its answer (after `write_eof`) to the fake having received the whole result
upload: Telegram's `sendPhoto` with the result buttons (the request body read), QQ's
`send_msg` carrying the image (the WebSocket frame read), Discord's message carrying a
`drawbridge-*` file (the fake's waiter woken once the upload is handled). Jobs run one at
a time; the next starts once the bot logs the previous one done.

`--before REV` checks REV out into a temporary `git worktree` (the shared working tree is
not touched), runs the same jobs with the bot's code from there (PYTHONPATH first), and
removes the worktree. The fakes and the mock are this checkout's in both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, add_repo_to_path, machine, median, table, verdict

add_repo_to_path()

import discord  # noqa: E402

from bot.mock_upstream import MockOptions, MockUpstream  # noqa: E402
from tests.bot_process import BotProcess, bot_env  # noqa: E402
from tests.fake_discord import FakeDiscord, FakeUser, snowflake  # noqa: E402
from tests.fake_onebot import ApiCall as OneBotCall  # noqa: E402
from tests.fake_onebot import FakeOneBot, text  # noqa: E402
from tests.fake_telegram import ApiCall as TelegramCall  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402

PLATFORMS = ("telegram", "qq", "discord")
GOAL = 0.5
PROMPT = "a heron at dawn"
API_KEY = "sk-bench-not-a-real-key"
ACCESS_TOKEN = "onebot-bench-token-0000"
SELF_ID = 10001
GROUP = 40001
READY_TIMEOUT = 90.0
JOB_TIMEOUT = 60.0


class TimedMock(MockUpstream):
    """The mock upstream, noting when each streamed answer's last byte was written."""

    def __init__(self, options: MockOptions) -> None:
        super().__init__(options)
        self.finished: list[float] = []

    async def _answer_stream(self, *args: Any, **kwargs: Any) -> Any:
        response = await super()._answer_stream(*args, **kwargs)
        self.finished.append(time.monotonic())
        return response


@dataclass
class Fakes:
    """The three platforms' fakes and the mock, shared by every bot run."""

    mock: TimedMock
    telegram: FakeTelegram
    discord: FakeDiscord
    users: Any = field(default_factory=lambda: iter(range(70001, 99999)))


@dataclass
class Run:
    """The lags one bot checkout showed, by (mock latency, platform), in seconds."""

    label: str
    lags: dict[tuple[float, str], list[float]] = field(default_factory=dict)
    error: str = ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def fakes() -> AsyncIterator[Fakes]:
    mock = TimedMock(MockOptions())
    async with contextlib.AsyncExitStack() as stack:
        await mock.start()
        stack.push_async_callback(mock.stop)
        telegram = FakeTelegram()
        await stack.enter_async_context(telegram)
        fake_discord = FakeDiscord()
        await fake_discord.start()
        stack.push_async_callback(fake_discord.stop)
        yield Fakes(mock, telegram, fake_discord)


async def measure(
    label: str, code: Path, shared: Fakes, latencies: list[float], runs: int, tmp: Path
) -> Run:
    """Start the bot from `code`; per latency, `runs` jobs on each platform, one at a time."""
    run = Run(label)
    workdir = Path(tempfile.mkdtemp(prefix="delivery-", dir=tmp))
    port = _free_port()
    env = bot_env(
        PYTHONPATH=str(code),
        DRAWBRIDGE_DATA_DIR=str(workdir / "data"),
        DRAWBRIDGE_API_BASE=shared.mock.base_url,
        DRAWBRIDGE_API_KEY=API_KEY,
        DRAWBRIDGE_DAILY_CREDITS="1000",
        DRAWBRIDGE_DEFAULT_LANG="en",
        DRAWBRIDGE_SHUTDOWN_GRACE="2",
        DRAWBRIDGE_LOG_LEVEL="INFO",
        TELEGRAM_BOT_TOKEN=shared.telegram.token,
        TELEGRAM_API_SERVER=shared.telegram.base_url,
        DISCORD_BOT_TOKEN=shared.discord.token,
        DISCORD_API_BASE=shared.discord.api_base,
        DISCORD_GATEWAY_URL=shared.discord.gateway_url,
        QQ_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        ONEBOT_ACCESS_TOKEN=ACCESS_TOKEN,
    )
    bot = BotProcess(env, workdir)
    onebot = FakeOneBot(SELF_ID)
    try:
        await bot.start(ready=r"drawbridge ready: ", within=READY_TIMEOUT)
        await onebot.connect(f"ws://127.0.0.1:{port}/onebot/v11/ws", ACCESS_TOKEN)
        await bot.wait_output(rf"Bot {SELF_ID}.* connected", READY_TIMEOUT)
        await shared.discord.wait_for(lambda: _draw_synced(shared.discord), READY_TIMEOUT)
        jobs = {
            "telegram": lambda: _telegram_job(shared),
            "qq": lambda: _qq_job(shared, onebot),
            "discord": lambda: _discord_job(shared),
        }
        done = 0
        for latency in latencies:
            shared.mock.options.latency = latency
            for _ in range(runs):
                for platform in PLATFORMS:
                    lag = await _timed(shared.mock, jobs[platform])
                    run.lags.setdefault((latency, platform), []).append(lag)
                    done += 1
                    await _until_done(bot, done)
    except (AssertionError, TimeoutError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:300] + "\n" + "".join(bot.output[-20:])
    finally:
        await onebot.close()
        if bot.process is not None:
            await bot.stop()
    return run


def _draw_synced(fake: FakeDiscord) -> bool:
    return any(c.get("name") == "draw" for cmds in fake.commands.values() for c in cmds)


async def _timed(mock: TimedMock, job: Callable[[], Any]) -> float:
    """Run one job; its lag from the mock's last byte to the fake's receipt of the result."""
    mark = len(mock.finished)
    received: float = await asyncio.wait_for(job(), JOB_TIMEOUT)
    if len(mock.finished) <= mark:
        raise AssertionError("a result arrived without a streamed answer from the mock")
    return received - mock.finished[mark]


async def _until_done(bot: BotProcess, job_id: int) -> None:
    """Wait until the bot logs job `job_id` done (ids count from 1 in a fresh database)."""
    await bot.wait_output(rf"\bjob {job_id} done\b", JOB_TIMEOUT)


async def _telegram_job(shared: Fakes) -> float:
    fake = shared.telegram
    user = fake.user(next(shared.users), "Bench")
    chat = fake.private_chat(user)
    fake.send_message(chat, user, f"/draw {PROMPT}")

    def is_result(call: TelegramCall) -> bool:
        return call.fields.get("chat_id") == str(chat["id"]) and "reply_markup" in call.fields

    call = await fake.wait_call("sendPhoto", where=is_result, within=JOB_TIMEOUT)
    return call.at


async def _qq_job(shared: Fakes, onebot: FakeOneBot) -> float:
    user = next(shared.users)
    message_id = await onebot.group_message(GROUP, user, [text(f"/draw {PROMPT}")])

    def results(calls: list[OneBotCall]) -> list[OneBotCall]:
        return [c for c in calls if c.reply_to() == message_id and c.images()]

    await onebot.wait_for(lambda calls: bool(results(calls)), within=JOB_TIMEOUT)
    return results(onebot.calls)[0].at


async def _discord_job(shared: Fakes) -> float:
    fake = shared.discord
    user = FakeUser(snowflake(), f"bench{next(shared.users)}")
    interaction = await fake.slash("draw", user=user, prompt=PROMPT)
    await fake.wait_message(
        lambda m: (
            m.interaction_id == interaction.id
            and any(name.startswith("drawbridge-") for name in m.filenames)
        ),
        within=JOB_TIMEOUT,
    )
    # The fake wakes its waiters right after it handled the upload.
    return time.monotonic()


@contextlib.contextmanager
def worktree(revision: str, tmp: Path) -> Any:
    """REV checked out in a temporary worktree, removed afterwards."""
    path = tmp / "before"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), revision],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            check=False,
            capture_output=True,
        )


def report(runs: list[Run], latencies: list[float], count: int) -> bool:
    """Print the table and the verdicts; True when this checkout met the goal everywhere."""
    headers = ["bot", "latency s", *(f"{p} ms: median / max" for p in PLATFORMS)]
    rows = []
    for run in runs:
        for latency in latencies:
            cells = []
            for platform in PLATFORMS:
                lags = run.lags.get((latency, platform), [])
                worst = max(lags, default=float("nan"))
                cells.append(f"{median(lags) * 1000:.0f} / {worst * 1000:.0f}")
            rows.append([run.label, f"{latency:.1f}", *cells])
    print(
        f"\n{count} streamed /draw jobs per platform and latency (2 partial previews); lag from "
        "the mock's last byte to the fake's receipt of the result"
    )
    print(table(headers, rows))
    ok = True
    current = runs[0]
    for platform in PLATFORMS:
        lags = [lag for (_, p), found in current.lags.items() if p == platform for lag in found]
        worst = max(lags, default=float("inf"))
        met = verdict(worst, GOAL)
        ok = ok and met == "ok"
        print(f"{platform}: max {worst * 1000:.0f} ms (goal <= {GOAL * 1000:.0f} ms: {met})")
    for run in runs:
        if run.error:
            ok = False
            print(f"\n{run.label}: {run.error}")
    return ok


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 jobs per platform")
    parser.add_argument("--runs", type=int, help="jobs per platform (default 7, quick 2)")
    parser.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="mock seconds per image, one set of jobs each (default 1.0 2.0)",
    )
    parser.add_argument("--before", metavar="REV", help="also run the bot as of this revision")
    args = parser.parse_args()
    count = args.runs or (2 if args.quick else 7)
    print(machine())
    print(f"discord.py {discord.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as folder:
        tmp = Path(folder)
        runs: list[Run] = []
        async with fakes() as shared:
            runs.append(await measure("this checkout", REPO, shared, args.latency, count, tmp))
            if args.before:
                with worktree(args.before, tmp) as path:
                    label = f"before ({args.before})"
                    runs.append(await measure(label, path, shared, args.latency, count, tmp))
        return 0 if report(runs, args.latency, count) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
