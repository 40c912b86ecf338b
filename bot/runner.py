"""`drawbridge run`: one event loop serving every configured chat platform."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from bot import heap
from bot.config import Settings
from bot.i18n import t
from bot.logs import add_secrets, settings_secrets
from bot.platform import Platform
from bot.services import Services
from bot.startup import StartupError

log = logging.getLogger("drawbridge")

PlatformFactory = Callable[[Settings, Services], Platform]
FactoryLoader = Callable[[], PlatformFactory]

SETTING_HINTS = {
    "telegram": "TELEGRAM_BOT_TOKEN=<token from @BotFather>",
    "qq": "QQ_ENABLED=true  (then point NapCat/LLOneBot at ws://HOST:PORT/onebot/v11/ws)",
    "discord": "DISCORD_BOT_TOKEN=<bot token from the Discord developer portal>",
}


def platform_factories() -> dict[str, FactoryLoader]:
    """Platforms installed with the package (the `drawbridge.platforms` entry points).

    Loading is deferred so only configured platforms import their chat library.
    """
    return {ep.name: ep.load for ep in entry_points(group="drawbridge.platforms")}


def missing_platforms_message() -> str:
    """What to set when no platform is configured."""
    lines = [
        "No chat platform is configured. Set at least one of these (in .env or the environment):"
    ]
    lines += [f"  {hint}" for hint in SETTING_HINTS.values()]
    lines.append("See .env.example for every setting.")
    return "\n".join(lines)


async def run(settings: Settings) -> int:
    """Start every configured platform, serve until SIGINT/SIGTERM, then shut down cleanly."""
    add_secrets(settings_secrets(settings), configured=True)
    names = settings.enabled_platforms()
    if not names:
        print(missing_platforms_message(), file=sys.stderr)
        return 2
    if not settings.providers() or not any(p.api_key for p in settings.providers()):
        # Legal (users bring their own keys), but rarely what an operator meant.
        log.warning(
            "no shared upstream key (DRAWBRIDGE_API_BASE/DRAWBRIDGE_API_KEY): only users who "
            "bind their own key with /token can draw"
        )
    loaders = platform_factories()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    try:
        services = await Services.create(settings)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    started: list[Platform] = []
    code = 0
    try:
        for name in names:
            loader = loaders.get(name)
            if loader is None:
                log.error("platform %s is not installed with this package", name)
                code = 1
                break
            factory = loader()
            platform = factory(settings, services)
            await platform.start()
            started.append(platform)
            services.platforms[name] = platform
            log.info("%s ready", name)
        else:
            log.info("drawbridge ready: %s", ", ".join(names))
            heap.settle()
            announcing = asyncio.create_task(
                announce_recovered(services, started, services.recovered)
            )
            beating = asyncio.create_task(keep_alive(services, started))
            try:
                code = await _serve_until_stopped(stop, started)
            finally:
                announcing.cancel()
                beating.cancel()
            log.info("stopping: no new jobs; running jobs get %.0fs", settings.shutdown_grace)
    except StartupError as exc:
        # The operator's to act on: the line says what to check; a traceback would bury it.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    except Exception:
        log.exception("failed to start")
        code = 1
    finally:
        # Stop intake first, then let the job runner finish or refund, then disconnect.
        services.jobs.stop_intake()
        await services.jobs.shutdown(settings.shutdown_grace)
        for platform in reversed(started):
            services.platforms.pop(platform.name, None)
            try:
                await asyncio.wait_for(platform.stop(), timeout=15)
            except Exception:
                log.warning("%s did not stop cleanly", platform.name, exc_info=True)
        await services.close(grace=0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("stopped")
    return code


async def _serve_until_stopped(stop: asyncio.Event, platforms: list[Platform]) -> int:
    """Wait for a signal (exit 0) or a platform whose connection ended by itself (exit 1).

    A dead platform inside a live process would look healthy to a supervisor; stopping
    lets systemd, Docker or a shell loop start the bot again.
    """
    signal_task: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    ended: dict[asyncio.Task[Any], Platform] = {
        asyncio.create_task(p.wait_ended(), name=p.name): p for p in platforms
    }
    try:
        done, _ = await asyncio.wait({signal_task, *ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (signal_task, *ended):
            task.cancel()
    for task in done:
        if task in ended:
            log.error(
                "%s stopped by itself; shutting down so it can be restarted", ended[task].name
            )
            return 1
    return 0


async def keep_alive(services: Services, platforms: list[Platform]) -> None:
    """Recover the jobs of processes that stopped beating (their heartbeat older than
    DRAWBRIDGE_PROCESS_TIMEOUT), as often as this process beats its own (`Services`), and
    tell the chats this process serves."""
    interval = services.beat_interval
    while True:
        await asyncio.sleep(interval)
        try:
            recovered = await services.store.recover()
        except Exception as exc:
            log.warning("recovery check failed (retrying in %.0fs): %r", interval, exc)
            continue
        if recovered:
            log.warning(
                "refunded %d job(s) of a process that stopped beating: %s",
                len(recovered),
                ", ".join(map(str, recovered)),
            )
            await announce_recovered(services, platforms, recovered)


async def announce_recovered(
    services: Services, platforms: list[Platform], job_ids: list[int]
) -> int:
    """Tell each chat whose job a stop interrupted that it was refunded.

    Best effort and one message per job; returns how many were sent.
    """
    by_name = {p.name: p for p in platforms}
    sent = 0
    for job_id in job_ids:
        job = await services.store.job(job_id)
        platform = by_name.get(job.platform) if job is not None else None
        if job is None or platform is None:
            continue
        user = await services.store.find_user(job.platform, f"#{job.user_id}")
        lang = (user.lang if user else None) or services.settings.default_lang
        prompt = job.prompt if len(job.prompt) <= 60 else job.prompt[:57] + "..."
        text = t(lang, "error.interrupted", job=job_id, prompt=prompt)
        try:
            await asyncio.wait_for(platform.notify(job.chat_id, text), timeout=90)
            sent += 1
        except Exception as exc:
            log.warning("could not tell %s chat about job %s: %r", job.platform, job_id, exc)
    return sent
