"""Everything a command needs, built once per process: settings, store, upstream, jobs."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import httpx

from bot.config import Settings
from bot.datadir import secure_data_dir
from bot.i18n import normalize_lang, t
from bot.jobs import JobRunner
from bot.platform import Platform
from bot.proxies import proxy_from_setting
from bot.secrets import KeyBox
from bot.store import Store
from bot.store.opening import open_store
from bot.upstream import CapabilityStore, build_clients
from bot.upstream.transport import upstream_http

log = logging.getLogger(__name__)


class LoginLinks:
    """One-time login tokens for the operator console, kept in memory.

    `/console` issues one for an admin; the console redeems it once, within `ttl` seconds. A
    restart forgets them all, which only means asking again.
    """

    def __init__(self, ttl: float = 600.0) -> None:
        self.ttl = ttl
        self._tokens: dict[str, tuple[str, float]] = {}

    def issue(self, who: str) -> str:
        """A new token that logs `who` (`platform:user id`) in once."""
        now = time.monotonic()
        self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (who, now + self.ttl)
        return token

    def redeem(self, token: str) -> str | None:
        """Who `token` logs in, if it is valid; it never works again either way."""
        entry = self._tokens.pop(token, None)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]


class Services:
    """The composition of bot services shared by plugins and adapters."""

    def __init__(
        self, settings: Settings, store: Store, jobs: JobRunner, http: httpx.AsyncClient
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.http = http
        # Jobs the last stop interrupted (refunded by recovery); their chats are told once
        # the platforms are up.
        self.recovered: list[int] = []
        # One-time console login links: issued by /console, redeemed by the console.
        self.console_links = LoginLinks()
        # The platforms `drawbridge run` started, by name, while they run: the console's
        # /healthz asks each for its connection.
        self.platforms: dict[str, Platform] = {}
        self._closed = False
        self._beating: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, settings: Settings) -> Services:
        """Open the store (refunding jobs a crash left behind) and connect the upstream."""
        secure_data_dir(settings.data_dir)
        keybox = KeyBox.load(settings.data_dir, settings.secret_key)
        store = await open_store(settings, keybox)
        # This process's heartbeat first: recovery then settles only the jobs of processes
        # that are gone (this host's earlier run at once, others after
        # DRAWBRIDGE_PROCESS_TIMEOUT without a heartbeat), never a live one's.
        await store.start_process(
            ",".join(settings.chat_platforms()), timeout=settings.process_timeout
        )
        recovered = await store.recover()
        if recovered:
            log.warning("refunded %d job(s) interrupted by the last stop", len(recovered))
        # Only the image API goes through this client: DRAWBRIDGE_UPSTREAM_PROXY, else
        # HTTPS_PROXY / NO_PROXY (trust_env). Reference downloads never use it.
        http = upstream_http(settings.upstream_proxy, headers={"User-Agent": "drawbridge/0.1"})
        if proxy := proxy_from_setting(settings.upstream_proxy):
            log.info("image API: connecting through %s", proxy.address)
        # What each relay was found able to do (streams, edits) is kept in the store, so a
        # restart or the CLI does not pay again to find out.
        clients = build_clients(
            settings.providers(), http=http, capabilities=CapabilityStore(store)
        )
        jobs = JobRunner(settings, store, clients)
        # Kept job files are pruned now and hourly while running (shutdown stops it).
        jobs.start_housekeeping()
        services = cls(settings, store, jobs, http)
        services.recovered = recovered
        # From now on, however long the platforms take to start: a process silent for
        # DRAWBRIDGE_PROCESS_TIMEOUT is taken for dead by the others.
        services._beating = asyncio.create_task(services._beat())
        return services

    async def close(self, grace: float | None = None) -> None:
        """Stop intake, let running jobs finish for the grace period, refund the rest, close."""
        if self._closed:
            return
        self._closed = True
        if self._beating is not None:
            self._beating.cancel()
        await self.jobs.shutdown(self.settings.shutdown_grace if grace is None else grace)
        await self.http.aclose()
        try:
            await self.store.stop_process()
        except Exception:
            log.warning("could not record this process's stop", exc_info=True)
        await self.store.close()

    @property
    def beat_interval(self) -> float:
        """Seconds between heartbeats: a third of DRAWBRIDGE_PROCESS_TIMEOUT, at most 20."""
        return min(20.0, self.settings.process_timeout / 3)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.beat_interval)
            try:
                await self.store.heartbeat()
            except Exception as exc:
                log.warning("heartbeat not written (retrying): %r", exc)

    async def user_lang(self, platform: str, user_id: str, locale: str | None) -> str:
        """The user's language: their `/lang` choice, else the platform locale, else default."""
        user = await self.store.user(platform, user_id)
        if user.lang:
            return user.lang
        return normalize_lang(locale, self.settings.default_lang)

    def t(self, lang: str, key: str, **params: Any) -> str:
        """A translated message (see `bot.i18n.t`)."""
        return t(lang, key, **params)

    async def remember_result(
        self, platform: str, chat_id: str, message_id: str, job_id: int
    ) -> None:
        """Record that a sent message shows a job's result (for replies and buttons)."""
        await self.store.remember_message(platform, chat_id, message_id, job_id)

    async def job_for_message(self, platform: str, chat_id: str, message_id: str) -> int | None:
        """The job whose result a message shows, if it is one of ours."""
        return await self.store.message_job(platform, chat_id, message_id)
