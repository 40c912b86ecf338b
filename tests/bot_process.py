"""`drawbridge run` as a real subprocess for end-to-end tests: start, read its log, stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Settings and nonebot variables a developer's environment must not bring into the bot.
FOREIGN_ENV = re.compile(
    r"^(DRAWBRIDGE_|TELEGRAM_|DISCORD_|QQ_|ONEBOT_|HOST$|PORT$|ENVIRONMENT$|DRIVER$|LOG_LEVEL$"
    r"|API_TIMEOUT$)",
    re.IGNORECASE,
)


def bot_env(**settings: str) -> dict[str, str]:
    """This process's environment without any bot setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not FOREIGN_ENV.match(k)}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    return env


class BotProcess:
    """One `python -m bot run`, its combined output collected line by line."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, ready: str, within: float = 30.0) -> BotProcess:
        """Spawn the bot and wait until a log line matches `ready`."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        self._reader = asyncio.create_task(self._collect(self.process.stdout))
        await self.wait_output(ready, within)
        return self

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.output.append(line.decode("utf-8", "replace"))

    async def wait_output(self, pattern: str, within: float = 20.0) -> None:
        """Wait until a line matches `pattern`; fail with the log if the bot exits first."""
        assert self.process is not None
        async with asyncio.timeout(within):
            while not any(re.search(pattern, line) for line in self.output):
                if self.process.returncode is not None:
                    raise AssertionError("the bot exited:\n" + "".join(self.output[-40:]))
                await asyncio.sleep(0.05)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 20.0) -> int:
        """Send `sig` and wait for the exit code (killing it if it does not stop in time)."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), within)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return self.process.returncode or 0

    @property
    def log(self) -> str:
        return "".join(self.output)
