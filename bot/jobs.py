"""The job runner: from a validated request to delivered images, with credits kept exact.

One job's life: resolve the credential; check the user (ban, job limit, queue, whether they
can afford the price) and the request before anything is downloaded; fetch and prepare the
references (with a cap on each user's download bytes in flight); reserve credits; wait for a
slot on the provider; call the upstream; free the slot; deliver through the Chat port; commit
what was delivered (the price of the size actually drawn, for the images actually sent) and
refund the rest. Every failure after the reservation refunds it exactly once (the store's
guarded ledger makes a second refund a no-op), and the job row records why.

Once results are in the chat, nothing may tell the user "nothing was charged": a ledger write
that fails then (the database locked by another process, a full disk) is retried, and the job
carries its charge in the store, so recovery commits it rather than refunding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from bot import errors, validation
from bot.batched_reads import BatchedReads
from bot.batching import Batcher
from bot.chat import Chat, ImageSource, Invocation, MessageRef, OutFile, ResultMeta
from bot.config import ProviderConfig, Settings
from bot.eta import Estimate, EtaBook, clock, eta_class, queue_factor
from bot.i18n import t
from bot.images import (
    Reference,
    extension_for_format,
    mime_for_format,
    prepare_references,
    to_jpeg_partial,
)
from bot.logs import add_secrets
from bot.sizes import Size, size_for_reference
from bot.store import StorePort, User, is_transient
from bot.upstream import ImageRequest, ImageResult, Progress, ProviderChain, UpstreamClient

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_TICK = 10.0
"""Seconds between elapsed-time edits of the status message."""
UPSTREAM_MAY_HAVE_BILLED = frozenset(
    {"timeout", "malformed_response", "result_download_failed", "delivery_failed", "shutdown"}
)
"""Failures after the upstream may have made (and billed) the image."""
QUEUE_TICK = 3.0
"""Seconds between checks of a waiting job's queue position."""
LAUNCH_YIELD = 0.5
"""Seconds a waiting job holds its "queued" line back at most, for the jobs starting beside it."""
PREVIEW_INTERVAL = 3.0
"""Least seconds between two partial previews (platforms rate-limit edits)."""
PREVIEW_FLUSH = 0.3
"""Seconds a preview already uploading may finish once the result is in hand."""
PRUNE_EVERY = 3600.0
"""Seconds between two prunings of kept job files while the bot runs."""
LEDGER_RETRY_SECONDS = 60.0
"""How long a job keeps retrying a ledger write that failed (a locked file, a full disk)."""
LEDGER_RETRY_MAX_DELAY = 5.0
"""Longest pause between two of those retries."""
SETTLE_LATER_EVERY = 60.0
"""Seconds between background retries of a settlement a job gave up on, while the bot runs."""
ETA_TICK = 1.0
"""Seconds between checks of a running job's estimate (is it overdue, has it moved?)."""


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A parsed, platform-neutral request for images."""

    kind: str  # "draw" | "edit"
    prompt: str
    size: Size | None = None
    n: int = 1
    quality: str | None = None
    output_format: str | None = None
    background: str | None = None
    references: tuple[ImageSource, ...] = ()
    # False when the user gave no --size: an edit then keeps its first image's shape.
    size_given: bool = True

    def options(self) -> dict[str, Any]:
        """The options as stored on the job row (and reused by reroll).

        An edit without `--size` stores none, so a reroll keeps the images' shape again.
        """
        keeps_shape = self.kind == "edit" and not self.size_given
        return {
            "size": str(self.size) if self.size and not keeps_shape else None,
            "n": self.n,
            "quality": self.quality,
            "format": self.output_format,
            "background": self.background,
        }


@dataclass(frozen=True, slots=True)
class Quote:
    """What a job costs and what the user has left after it, said before anything runs."""

    tier: str  # "1k" | "2k" | "4k" | "auto"
    quality: str
    n: int
    cost: int
    # Credits left after this job (negative: not enough); None when the user's own key pays.
    left: int | None

    @property
    def own_key(self) -> bool:
        """Whether the user's own key pays (no credits are used)."""
        return self.left is None

    def render(self, lang: str) -> str:
        """ "4K · high · 2 images: 16 credits, 84 left after this" (or "your own key pays")."""
        images = t(lang, "price.image_one" if self.n == 1 else "price.images", n=self.n)
        tier = "auto" if self.tier == "auto" else self.tier.upper()
        what = f"{tier} · {self.quality} · {images}"
        if self.left is None:
            return t(lang, "price.own_key", what=what)
        cost = t(lang, "price.credit_one" if self.cost == 1 else "price.credits", n=self.cost)
        if self.left < 0:
            return t(lang, "price.short", what=what, cost=cost, left=self.cost + self.left)
        return t(lang, "price.line", what=what, cost=cost, left=self.left)


@dataclass(eq=False)
class _Ticket:
    """A job waiting for, or holding, a provider slot."""

    job_id: int
    user_id: int
    provider: str
    task: asyncio.Task[None] | None = None
    running: bool = False
    outcome: str = ""
    own_key: bool = False
    # Credits reserved, and the price of one image at the size asked for (0: own key).
    cost: int = 0
    unit: int = 0
    quality: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The price line every status of this job ends with, and the jobs it is timed with.
    ack: str = ""
    eta_class: str = ""
    concurrency: int = 1
    # Starting at once, and its request not yet sent (JobRunner._launched).
    launching: bool = False
    # Its task (or the one settling it, `_unstarted`) has taken its first step: a task
    # cancelled before that runs none of its coroutine.
    started: bool = False


class _Queue:
    """The tickets waiting for one provider's slots, in arrival order.

    Every waiting job asks its place now and then ("Queued #N"): a burst queues hundreds at
    once, and a place counted by walking the queue made that quadratic. Places are counted
    once, when asked after a job left (joining at the end moves nobody).
    """

    def __init__(self) -> None:
        self._tickets: dict[_Ticket, None] = {}  # a set that keeps its order
        self._places: dict[_Ticket, int] | None = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def append(self, ticket: _Ticket) -> None:
        if ticket in self._tickets:
            return
        self._tickets[ticket] = None
        if self._places is not None:
            self._places[ticket] = len(self._tickets)

    def discard(self, ticket: _Ticket) -> None:
        if self._tickets.pop(ticket, 0) is None:
            self._places = None  # the ones behind it moved up

    def place(self, ticket: _Ticket) -> int:
        """1 for the next job to start, 0 for one not waiting."""
        if self._places is None:
            self._places = {t: n for n, t in enumerate(self._tickets, 1)}
        return self._places.get(ticket, 0)


@dataclass(frozen=True, slots=True)
class _Credential:
    chain: ProviderChain
    primary: ProviderConfig
    own_key: bool


def today(settings: Settings) -> date:
    """The credit day in the configured time zone (the allowance resets at its midnight)."""
    return datetime.now(ZoneInfo(settings.timezone)).date()


def price(settings: Settings, size: Size | None, quality: str | None) -> int:
    """Credits for one image of this size tier and quality (default 1)."""
    tier = size.tier if size else "1k"
    table = settings.prices.get(tier) or settings.prices.get("default") or {}
    value = table.get(quality or "auto", table.get("default", 1))
    return max(0, int(value))


class _Later:
    """A task started `delay` seconds from now, unless cancelled before: a timer until then.

    A burst queues hundreds of jobs, each with a status line to keep true; most get their
    slot before its first update is due. A task each, made at once, was hundreds of task
    steps in the burst's busiest moments (and as many cancellations at each wave's start).
    """

    def __init__(self, delay: float, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            delay, self._start, start
        )

    def _start(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(start())

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()


class _Releases:
    """Slots being given back in the background, held until done (`JobRunner.wait_idle` and
    `shutdown` wait for them)."""

    def __init__(self) -> None:
        self.running: set[asyncio.Future[None]] = set()

    def add(self, release: Awaitable[None]) -> None:
        task = asyncio.ensure_future(release)
        self.running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not give back a provider slot: %r", task.exception())


class _ProviderSlot:
    """One of a provider's `concurrency` slots, counted across every process on the store.

    This process's own semaphore first (no database trips while its own jobs queue), then a
    row of `provider_slots`, polled for while other processes hold them all. A store with no
    registered process (tests, the CLI) has only the semaphore. Should the store fail, the job
    goes on with this process's slot alone: bookkeeping must not cost a user their image.
    """

    POLL_FIRST = 0.05
    POLL_MAX = 0.5

    def __init__(
        self,
        store: StorePort,
        provider: ProviderConfig,
        local: asyncio.Semaphore,
        job_id: int,
        shared: Batcher[int, int],
        releases: _Releases,
    ) -> None:
        self._store = store
        self._releases = releases
        self._provider = provider
        self._local = local
        self._job_id = job_id
        # Slots asked for together are taken in one transaction (`Store.acquire_slots`).
        self._shared = shared
        self._held: int | None = None
        # Asked before the job's task first ran (`ask_early`), not yet awaited.
        self._early: asyncio.Future[int | None] | None = None

    def ask_early(self) -> None:
        """Ask for the shared slot now, for a job that starts at once: in a burst its ask then
        goes beside the rest of the intake, not after every other job's first step (the slot
        is a store round trip in front of the job's upstream request)."""
        if self._store.process_id is not None and self._early is None:
            self._early = self._shared.ask(self._job_id)

    def abandon(self) -> None:
        """The job ended without entering: a slot asked early goes back once it is taken."""
        early, self._early = self._early, None
        if early is not None:
            self._free_when_taken(early)

    def _free_when_taken(self, asked: asyncio.Future[int | None]) -> None:
        """A slot taken for a job that no longer waits for it: give it back, or this process
        would hold it (from every process's concurrency) until it stops."""
        name = self._provider.name

        def free(done: asyncio.Future[int | None]) -> None:
            if done.cancelled() or done.exception() is not None or done.result() is None:
                return
            slot = done.result()
            assert slot is not None
            self._releases.add(self._store.release_slot(name, slot))

        asked.add_done_callback(free)

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            if self._store.process_id is not None:
                self._held = await self._take_shared()
        except BaseException:
            self._local.release()
            raise

    async def _take_shared(self) -> int | None:
        delay = self.POLL_FIRST
        name = self._provider.name
        while True:
            asked = self._early if self._early is not None else self._shared.ask(self._job_id)
            self._early = None
            try:
                # Shielded: a job cancelled meanwhile gives back the slot the batch takes.
                slot = await asyncio.shield(asked)
            except asyncio.CancelledError:
                self._free_when_taken(asked)
                raise
            except Exception as exc:
                log.warning("provider %s: shared slot unavailable (%r); going on alone", name, exc)
                return None
            if slot is not None:
                return slot
            await asyncio.sleep(delay)
            delay = min(self.POLL_MAX, delay * 2)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._held is None:
            self._local.release()
            return
        # Given back beside the job's delivery, not in front of it (a store round trip, at a
        # wave's end behind fifty others); a cancelled job frees its slot all the same. This
        # process's next job enters once the row is gone, so it finds the slot free.
        slot, self._held = self._held, None
        self._releases.add(self._release(slot))

    async def _release(self, slot: int) -> None:
        try:
            await self._store.release_slot(self._provider.name, slot)
        except Exception as exc:
            log.warning("provider %s: could not free slot %d: %r", self._provider.name, slot, exc)
        finally:
            self._local.release()


class JobRunner:
    """Runs image jobs with per-provider concurrency, per-user limits and a bounded queue."""

    def __init__(
        self,
        settings: Settings,
        store: StorePort,
        clients: Sequence[UpstreamClient],
    ) -> None:
        self.settings = settings
        self.store = store
        self.clients = list(clients)
        self._chain = ProviderChain(self.clients) if self.clients else None
        # Every shared-key job's credential (None: no shared key configured).
        self._shared_credential = (
            _Credential(self._chain, self.clients[0].provider, False)
            if self._chain is not None and any(c.provider.api_key for c in self.clients)
            else None
        )
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, _Queue] = {}
        self._tickets: dict[int, _Ticket] = {}
        self._per_user: dict[int, int] = {}
        # Jobs past their slot's door, per provider, until they end (for queue estimates,
        # asked by every waiting job: no walk over all tickets).
        self._running: dict[str, int] = {}
        # Jobs admitted but still being validated or charged (not yet in a queue).
        self._intake = 0
        self._intake_idle = asyncio.Event()
        # Jobs starting at once whose request is not sent yet: the jobs that will wait hold
        # their first status line back until these are sent, or LAUNCH_YIELD passes.
        self._launching = 0
        self._launches_sent = asyncio.Event()
        self._slot_batches: dict[tuple[str, int], Batcher[int, int]] = {}
        # Slots being given back (a job's, after its answer; one taken for a job gone).
        self._releases = _Releases()
        self._accepting = True
        self.files_dir = settings.data_dir / "jobs"
        # Download bytes each user has in flight (or waiting), so one user's burst of edits
        # cannot make the bot download hundreds of megabytes at once.
        self._downloads: dict[int, _ByteBudget] = {}
        # Pruning kept files on a timer; settlements retried in the background.
        self._housekeeper: asyncio.Task[None] | None = None
        self._later: set[asyncio.Task[None]] = set()
        self.ledger_retry = LEDGER_RETRY_SECONDS
        """Seconds a job retries a failed ledger write before leaving it to the background."""
        self.eta = EtaBook(store)
        """Recent upstream durations per job class, for the estimates in status messages."""
        self.reads = BatchedReads(store)
        """The intake's store reads, asked together with those of other commands."""

    # --- intake ---

    def _credential(self, own_key: str | None) -> _Credential:
        if own_key:
            if not self.clients:
                raise errors.NotConfiguredError("no provider for a personal key")
            # A personal key is used only on the first provider: never spend it elsewhere. The
            # client shares what was learned about that relay (streaming, edits), so an own-key
            # job never pays again for a lesson a shared-key job already learned.
            client = self.clients[0].with_key(own_key)
            return _Credential(ProviderChain([client]), client.provider, True)
        if self._shared_credential is None:
            raise errors.NotConfiguredError("no shared key")
        return self._shared_credential

    def active_count(self, user_id: int) -> int:
        """Jobs of this user queued or running now."""
        return self._per_user.get(user_id, 0)

    def active_total(self) -> int:
        """Jobs queued or running now, over all users."""
        return len(self._tickets)

    def queue_length(self) -> int:
        """Jobs waiting for a slot, over all providers."""
        return sum(len(q) for q in self._waiting.values())

    async def reject(
        self, inv: Invocation, user: User, kind: str, prompt: str, error: errors.DrawbridgeError
    ) -> int:
        """Record a request refused before any charge, so the job table says why."""
        job_id = await self.store.create_job(
            user_id=user.id,
            platform=inv.platform,
            chat_id=inv.chat_id,
            group_key=inv.group_id,
            kind=kind,
            prompt=prompt,
            options={},
            ref_count=len(inv.references),
            own_key=user.has_key,
        )
        await self.store.finish_job(
            job_id, status="failed", error_kind=error.kind, error_detail=error.detail[:500]
        )
        return job_id

    def cost(self, user: User, spec: JobSpec) -> int:
        """The credits `spec` costs `user` (0 when their own key pays), without any store read."""
        if user.has_key:
            return 0
        return price(self.settings, spec.size, spec.quality) * spec.n

    async def quote(self, user: User, spec: JobSpec) -> Quote:
        """The price of `spec` for `user` and what they would have left: read-only, so a
        dry run or a confirmation prompt reserves nothing."""
        tier = spec.size.tier if spec.size else "auto"
        quality = spec.quality or "auto"
        if user.has_key:
            return Quote(tier, quality, spec.n, 0, None)
        cost = self.cost(user, spec)
        # Batched with the other commands' reads (a burst of dry runs or costly jobs).
        credits = await self.reads.credits(
            user.id, today(self.settings), self.settings.daily_credits
        )
        return Quote(tier, quality, spec.n, cost, credits.total_left - cost)

    async def submit(
        self,
        *,
        inv: Invocation,
        user: User,
        chat: Chat,
        spec: JobSpec,
        lang: str,
        extra_references: Sequence[bytes] = (),
    ) -> int:
        """Validate, charge and queue a job; returns its id once it is queued.

        Raises a `DrawbridgeError` (nothing charged) when the job cannot start; the job row
        then records why. Progress and the result go to `chat`.
        """
        if not self._accepting:
            raise errors.ShuttingDownError()
        own_key = await self.store.get_api_key(user.id) if user.has_key else None
        if own_key:
            add_secrets([own_key])
        job: dict[str, Any] = {
            "user_id": user.id,
            "platform": inv.platform,
            "chat_id": inv.chat_id,
            "group_key": inv.group_id,
            "kind": spec.kind,
            "prompt": spec.prompt,
            "options": spec.options(),
            "ref_count": len(spec.references) + len(extra_references),
            "own_key": bool(own_key),
        }
        # An /edit's job row is written first: its images are downloaded (and may fail)
        # before it is charged. Any other job is written with its charge, in one store step
        # (`Store.open_job`); refused before that, its row is written saying why.
        job_id: int | None = None
        opening: asyncio.Future[tuple[int, int | Exception]] | None = None
        if spec.kind == "edit":
            job_id = await self.store.create_job(**job)
        # Count the job against the user's and the queue's limits before any await, so two
        # commands arriving together cannot both slip under a limit. Everything that can refuse
        # the job without looking at its images runs before any reference is downloaded.
        admitted = False
        try:
            if user.is_banned:
                raise errors.BannedError()
            if user.has_key and not own_key:
                # The secret changed since the key was bound: never fall back to credits silently.
                raise errors.KeyUnreadableError("stored key cannot be decrypted")
            cred = self._credential(own_key)
            if self.active_count(user.id) >= self.settings.user_max_jobs:
                raise errors.TooManyJobsError(limit=self.settings.user_max_jobs)
            if self.queue_length() + self._intake >= self.settings.queue_size:
                raise errors.BusyError()
            self._per_user[user.id] = self.active_count(user.id) + 1
            self._intake += 1
            admitted = True
            self._check_request(spec, extra_references)
            # Route by what each relay was found able to do (an /edit skips providers known not
            # to edit, or taking fewer images), before anything is downloaded or charged.
            refs = len(spec.references) + len(extra_references)
            targets = await cred.chain.candidates(spec.kind, refs)
            if targets[0].provider is not cred.primary:
                cred = replace(cred, primary=targets[0].provider)
            unit = 0 if cred.own_key else price(self.settings, spec.size, spec.quality)
            cost = unit * spec.n
            day = today(self.settings)
            group_key = None if cred.own_key else inv.group_id
            if spec.kind == "edit":
                # Only an edit downloads anything before the charge; for any other job the
                # reservation below refuses with the same errors, without a read in front.
                await self._check_affordable(user.id, cost, day, group_key)
            references = await self._fetch_references(user.id, spec, cred.primary, extra_references)
            if spec.kind == "edit" and not spec.size_given and references:
                # The first image's shape, at the default size's tier (so the same price).
                first = references[0]
                default = str(spec.size) if spec.size else self.settings.default_size
                shape = size_for_reference(first.width, first.height, self.settings.model, default)
                spec = replace(spec, size=shape)
            # Read before the job is queued: once queued, it must reach its slot without a
            # store round trip in between (the queue counts it until then).
            cls = eta_class(cred.primary.name, spec.size, spec.quality, spec.kind)
            estimate = await self._class_estimate(cls, job_id)
            # What it leaves, for the price line: the reservation says (no read after it),
            # each of a user's commands charged together its own figure.
            left: int | None
            if job_id is None:
                opening = asyncio.ensure_future(
                    self.store.open_job(
                        **job,
                        cost=cost,
                        day=day,
                        daily_allowance=self.settings.daily_credits,
                        charged_group=group_key,
                        group_cap=self.settings.group_daily_cap,
                    )
                )
                # Shielded: cancelled meanwhile, the job is settled once it is written.
                job_id, outcome = await asyncio.shield(opening)
                if isinstance(outcome, Exception):
                    raise outcome
                left = outcome
            else:
                left = await self.store.reserve(
                    job_id,
                    user_id=user.id,
                    cost=cost,
                    day=day,
                    daily_allowance=self.settings.daily_credits,
                    group_key=group_key,
                    group_cap=self.settings.group_daily_cap,
                )
            if cred.own_key:
                left = None
            if not self._accepting:
                # Shutdown began while this job was being checked and charged: give it back
                # now (the except below refunds) rather than start work nobody will wait for.
                raise errors.ShuttingDownError()
        except BaseException as exc:
            if admitted:
                self._release_user(user.id)
            kind = exc.kind if isinstance(exc, errors.DrawbridgeError) else "internal"
            detail = exc.detail[:500] if isinstance(exc, errors.DrawbridgeError) else None
            # Cancelled mid-reserve, the shielded reservation may still have committed: a
            # refund is a no-op when nothing was reserved, and exact when something was.
            await asyncio.shield(self._settle_refused(job_id, kind, detail, opening, job))
            raise
        finally:
            if admitted:
                self._intake_settled()
        assert job_id is not None  # written by now: created, or opened with its charge

        quote = Quote(
            spec.size.tier if spec.size else "auto",
            spec.quality or "auto",
            spec.n,
            cost,
            left,
        )
        ticket = _Ticket(
            job_id,
            user.id,
            cred.primary.name,
            own_key=cred.own_key,
            cost=cost,
            unit=unit,
            quality=spec.quality,
            ack=quote.render(lang),
            eta_class=cls,
            concurrency=max(1, cred.primary.concurrency),
        )
        queue = self._waiting.setdefault(ticket.provider, _Queue())
        queue.append(ticket)
        self._tickets[job_id] = ticket
        # Its place behind the jobs queued before it that the free slots do not take. (Not
        # the slots' lock: commands arriving together are all queued before any job task
        # runs, and each would have been told it was starting.)
        free = ticket.concurrency - self._running.get(ticket.provider, 0)
        position = max(0, len(queue) - free)
        slot = self._slot(cred.primary, job_id)
        if not position:
            ticket.launching = True
            self._launching += 1
            self._launches_sent.clear()
            slot.ask_early()
        request = ImageRequest(
            prompt=spec.prompt,
            size=str(spec.size) if spec.size else None,
            n=spec.n,
            quality=spec.quality,
            output_format=spec.output_format,
            background=spec.background,
            references=tuple(references),
            user=hashlib.sha256(f"{inv.platform}:{inv.user_id}".encode()).hexdigest()[:16],
        )
        # From here the task owns the reservation: it commits or refunds on every path.
        ticket.task = asyncio.create_task(
            self._run(ticket, cred, slot, request, chat, lang, position, references, estimate),
            name=f"job-{job_id}",
        )
        # However it ends (even cancelled before its first step), it no longer holds back
        # the waiting jobs' status lines; sending its request releases them sooner.
        ticket.task.add_done_callback(lambda _: self._ended(ticket, slot, chat, lang))
        return job_id

    def _check_request(self, spec: JobSpec, extra: Sequence[bytes]) -> None:
        """Refuse a bad request by what it says alone, before any image is downloaded.

        The same checks as the options parser and the terminal (`bot.validation`); how many
        images a provider takes is the chain's to say (`ProviderChain.candidates`).
        """
        validation.check_request(
            spec.kind,
            spec.prompt,
            spec.n,
            len(spec.references) + len(extra),
            max_prompt_chars=self.settings.max_prompt_chars,
            max_n=self.settings.max_n,
        )

    async def _check_affordable(
        self, user_id: int, cost: int, day: date, group_key: str | None
    ) -> int | None:
        """Refuse, read-only, a job the user or the group cannot pay for right now; returns
        the credits the user has (None when the job is free: nothing was read).

        Downloads are the expensive part of an edit: a user without credits must not cost the
        bot 16 downloads just to be told so. The guarded reservation later is still what
        counts (credits may go between this read and it).
        """
        if cost <= 0:
            return None
        # Batched with the other commands' reads (a burst of edits).
        credits = await self.reads.credits(user_id, day, self.settings.daily_credits)
        if cost > credits.total_left:
            raise errors.InsufficientCreditsError(needed=cost, left=credits.total_left)
        cap = self.settings.group_daily_cap
        if group_key and cap > 0 and await self.store.group_used(group_key, day) + cost > cap:
            raise errors.GroupCapReachedError(cap=cap)
        return credits.total_left

    async def _fetch_references(
        self, user_id: int, spec: JobSpec, provider: ProviderConfig, extra: Sequence[bytes]
    ) -> list[Reference]:
        """Download (within the user's byte budget) and prepare an edit's references."""
        if spec.kind != "edit":
            return []
        budget = self._downloads.get(user_id)
        if budget is None:
            budget = self._downloads[user_id] = _ByteBudget(self.settings.user_download_bytes)
        # Each download holds the most it may bring; one image may not exceed the user's cap.
        limit = min(self.settings.max_input_bytes, budget.capacity)

        async def fetch(source: ImageSource) -> bytes:
            async with budget.hold(limit):
                return await source.fetch(limit)

        budget.users += 1
        # Chat platforms' image links expire: fetch them all now (as the budget allows).
        tasks = [asyncio.create_task(fetch(source)) for source in spec.references]
        try:
            fetched = await asyncio.gather(*tasks)
        except BaseException:
            # One failed download fails the job: stop the others instead of finishing them.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            budget.users -= 1
            if budget.users == 0 and self._downloads.get(user_id) is budget:
                del self._downloads[user_id]
        raw = [*extra, *fetched]
        return await prepare_references(
            raw,
            max_count=provider.max_references,
            max_bytes=provider.max_reference_bytes,
            max_total_pixels=self.settings.max_job_pixels,
        )

    def _local_slots(self, provider: ProviderConfig) -> asyncio.Semaphore:
        local = self._slots.get(provider.name)
        if local is None:
            local = self._slots[provider.name] = asyncio.Semaphore(provider.concurrency)
        return local

    def _slot(self, provider: ProviderConfig, job_id: int) -> _ProviderSlot:
        key = (provider.name, provider.concurrency)
        shared = self._slot_batches.get(key)
        if shared is None:
            name, capacity = key

            async def take(job_ids: list[int]) -> dict[int, int]:
                slots = await self.store.acquire_slots(name, capacity, job_ids)
                pairs = zip(job_ids, slots, strict=True)
                return {job: slot for job, slot in pairs if slot is not None}

            shared = self._slot_batches[key] = Batcher(take)
        return _ProviderSlot(
            self.store, provider, self._local_slots(provider), job_id, shared, self._releases
        )

    # --- running ---

    async def _run(
        self,
        ticket: _Ticket,
        cred: _Credential,
        slot: _ProviderSlot,
        request: ImageRequest,
        chat: Chat,
        lang: str,
        position: int,
        references: Sequence[Reference],
        base_estimate: Estimate | None = None,
    ) -> None:
        ticket.started = True
        job_id = ticket.job_id
        started = time.monotonic()
        ticker: asyncio.Task[None] | _Later | None = None
        progress = _ProgressRelay(chat, lang, lambda: self._launched(ticket))
        status: MessageRef | None = None
        # A starting job's first status line, sent beside its upstream call (not before it:
        # a platform's round trip would delay every job).
        status_sent: asyncio.Task[MessageRef | None] | None = None

        async def sent_status() -> MessageRef | None:
            nonlocal status, status_sent
            if status_sent is not None:
                status, status_sent = await asyncio.shield(status_sent), None
            return status

        # Bookkeeping that must not delay the upstream call; settled before commit or refund.
        side: list[asyncio.Task[Any]] = []
        # Set once results are in the chat: from then on nothing refunds or says "not charged".
        delivered = False
        upstream_seconds = 0.0
        try:
            estimate = self._in_queue(ticket, base_estimate, position)
            if position:
                # It waits anyway: the jobs starting now send their requests first.
                await self._after_launches()
                line = t(lang, "status.queued", position=position, job=job_id)
                status = await _status(chat, self._status_text(lang, ticket, line, estimate))
            else:
                line = t(lang, "status.started", job=job_id)
                status_sent = asyncio.create_task(
                    _status(chat, self._status_text(lang, ticket, line, estimate, running=True))
                )
            await self._keep(job_id, "references", self._save_references, references)
            if position and status is not None and chat.limits.can_edit:
                # Nothing to say before its first tick: started only then, unless the job
                # has its slot by that time (a burst's next waves: no task at all).
                watched, shown, shown_estimate = status, position, estimate
                ticker = _Later(
                    QUEUE_TICK,
                    lambda: self._watch_queue(ticket, chat, watched, lang, shown, shown_estimate),
                )
            async with slot:
                slot_started = time.monotonic()
                if ticker is not None:
                    ticker.cancel()
                    ticker = None
                self._waiting[ticket.provider].discard(ticket)
                ticket.running = True
                self._running[ticket.provider] = self._running.get(ticket.provider, 0) + 1
                side.append(asyncio.create_task(self.store.mark_running(job_id, cred.primary.name)))
                if position:
                    estimate = await self._estimate(ticket, 0)
                if status is not None and chat.limits.can_edit and position:
                    line = t(lang, "status.started", job=job_id)
                    text = self._status_text(lang, ticket, line, estimate, running=True)
                    side.append(asyncio.create_task(_quietly(chat.edit_text(status, text))))
                if chat.limits.can_edit:
                    ticker = asyncio.create_task(
                        self._tick(chat, sent_status, lang, ticket, slot_started, estimate)
                    )
                result = await cred.chain.run(request, progress)
                await sent_status()
                upstream_seconds = time.monotonic() - slot_started
                files = _out_files(job_id, result)
                unit = self._drawn_unit(ticket, result)
                charge = min(ticket.cost, unit * len(files))
                # The charge, recorded before the hand-off so recovery commits a delivered job;
                # and in the same write, when the upstream answered (queue wait and upstream
                # time apart, for the estimates of later jobs). Written beside the slot's
                # release, settled before the delivery.
                side.append(
                    asyncio.create_task(self._mark_delivering(job_id, charge, ticket.eta_class))
                )
            # The result bytes are in hand: the provider's slot goes to the next job now, so a
            # slow upload here (a Telegram flood wait) never holds up jobs in other chats.
            await _settle(side)
            if ticker is not None:
                ticker.cancel()
                ticker = None
            # Previews not yet shown are stale now: the result goes first.
            await progress.close()
            if status is not None and chat.limits.can_edit:
                # Beside the upload, never in front of it (an edit may wait out a rate limit).
                text = self._status_text(lang, ticket, t(lang, "status.uploading", job=job_id))
                side.append(asyncio.create_task(_quietly(chat.edit_text(status, text))))
            caption = self._caption(lang, request, result, ticket, charge)
            sent = await _deliver(chat, files, ResultMeta(job_id, caption, result.revised_prompt))
            delivered = True
            await _settle(side)
            ticket.outcome = "succeeded"
            if sent < len(files):
                # Only some images reached the chat: charge for those, say so.
                charge = min(charge, unit * sent)
                await _quietly(
                    chat.send_text(t(lang, "result.partial_delivery", count=sent, total=len(files)))
                )
            if status is not None:
                await _quietly(chat.delete(status))
            # The kept copy (reroll, "original") is a bonus: a full disk must not cost a result.
            await self._keep(job_id, "results", self._save_results, files)
            await self._settle_delivered(job_id, charge, result, files[:sent])
            await self._record_eta(ticket, upstream_seconds)
            log.info(
                "job %s done in %.1fs by %s (%d images, %d credits)",
                job_id,
                time.monotonic() - started,
                result.provider,
                sent,
                charge,
            )
        except asyncio.CancelledError:
            if delivered:
                # Stopped while settling a delivered job: its recorded charge lets recovery
                # (or the background retry) commit it; the user must hear nothing more.
                log.warning("job %s stopped after delivery, before its commit", job_id)
                raise
            stopped = self._stopped(ticket)
            await asyncio.shield(_settle(side))
            await asyncio.shield(progress.close())
            await asyncio.shield(
                self._fail(job_id, stopped, chat, lang, await sent_status(), own_key=ticket.own_key)
            )
            raise
        except errors.DrawbridgeError as exc:
            log.info("job %s failed: %s (%s)", job_id, exc.kind, exc.detail[:200])
            await _settle(side)
            # A preview shown after the failure message would look like a late result.
            await progress.close()
            await self._fail(job_id, exc, chat, lang, await sent_status(), own_key=ticket.own_key)
        except Exception as exc:
            if delivered:
                # Only bookkeeping can fail here, and the images are the user's already.
                log.exception("job %s: bookkeeping after delivery failed", job_id)
            else:
                log.exception("job %s crashed", job_id)
                await _settle(side)
                await progress.close()
                await self._fail(
                    job_id,
                    errors.DrawbridgeError(type(exc).__name__),
                    chat,
                    lang,
                    await sent_status(),
                    own_key=ticket.own_key,
                )
        finally:
            if ticker is not None:
                ticker.cancel()
            with contextlib.suppress(Exception):
                await progress.close()
            if progress.preview is not None and ticket.outcome != "succeeded":
                # A partial preview of a job that failed would look like a result.
                await _quietly(chat.delete(progress.preview))
            self._forget(ticket)

    def _forget(self, ticket: _Ticket) -> None:
        """The job has ended: out of the queue and the counts; whoever waits for it, wakes."""
        if (waiting := self._waiting.get(ticket.provider)) is not None:
            waiting.discard(ticket)
        self._tickets.pop(ticket.job_id, None)
        if ticket.running:
            self._running[ticket.provider] -= 1
        self._release_user(ticket.user_id)
        ticket.done.set()

    def _stopped(self, ticket: _Ticket) -> errors.DrawbridgeError:
        """Why a cancelled job stopped: the user cancelled it while it waited, or shutdown."""
        if not ticket.running and self._accepting:
            return errors.CancelledJobError(job=ticket.job_id)
        return errors.ShuttingDownError()

    async def _unstarted(self, ticket: _Ticket, chat: Chat, lang: str) -> None:
        """Settle a job whose task was cancelled before its first step (a /cancel or a
        shutdown in the same pass of the loop as its command): none of `_run` ran, so
        nothing else refunds it, tells its user, or wakes whoever waits for it."""
        ticket.started = True
        try:
            await self._fail(
                ticket.job_id, self._stopped(ticket), chat, lang, None, own_key=ticket.own_key
            )
        finally:
            self._forget(ticket)

    def _drawn_unit(self, ticket: _Ticket, result: ImageResult) -> int:
        """The price of one image at the size drawn (the fallback size after a 4K refusal)."""
        if ticket.own_key:
            return 0
        drawn = _size_of(result.fallback_size) if result.fallback_size else None
        if drawn is None:
            return ticket.unit
        # Never more than was asked for, whatever the price table says.
        return min(ticket.unit, price(self.settings, drawn, ticket.quality))

    async def _mark_delivering(self, job_id: int, charge: int, eta_class: str) -> None:
        """Record the charge before the hand-off, so recovery commits a delivered job."""
        try:
            await self.store.mark_delivering(job_id, charge, eta_class=eta_class)
        except Exception:
            # The image must not wait on the database: without the mark, a stop before the
            # commit refunds this job at the next start (the user keeps the image for free).
            log.warning(
                "job %s: could not record its charge before delivery", job_id, exc_info=True
            )

    async def _settle_delivered(
        self, job_id: int, charge: int, result: ImageResult, files: Sequence[OutFile]
    ) -> None:
        """Commit `charge` (refunding the rest) and record the success; never raises."""
        outputs = [
            {"width": f.width, "height": f.height, "bytes": len(f.data), "mime": f.mime}
            for f in files
        ]

        async def settle() -> None:
            # Both are no-ops once done, so a retry after a half-way failure is exact.
            await self.store.commit(job_id, amount=charge)
            await self.store.finish_job(
                job_id,
                status="succeeded",
                usage=result.usage,
                revised_prompt=result.revised_prompt,
                provider=result.provider,
                outputs=outputs,
            )

        await self._ledger_write(job_id, "commit", settle)

    async def _ledger_write(
        self,
        job_id: int,
        what: str,
        write: Callable[[], Awaitable[Any]],
        *,
        later: bool = True,
    ) -> bool:
        """Run a store write, retrying transient failures with backoff for `ledger_retry` s.

        Store writes are idempotent per job (guarded updates), so retrying is safe. Returns
        whether it was written. If not, logs an ERROR and (with `later`) keeps retrying in the
        background while the bot runs; a stop before that leaves it to recovery at the next
        start, which commits delivered jobs and refunds the others.
        """
        deadline = time.monotonic() + self.ledger_retry
        delay = 0.1
        while True:
            try:
                await write()
                return True
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    log.error(
                        "job %s: could not write its %s (%r)%s",
                        job_id,
                        what,
                        exc,
                        "; retrying in the background" if later and is_transient(exc) else "",
                    )
                    if later and is_transient(exc) and self._accepting:
                        self._retry_later(job_id, what, write)
                    return False
                log.warning("job %s: %s not written yet (%r); retrying", job_id, what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LEDGER_RETRY_MAX_DELAY)

    def _retry_later(self, job_id: int, what: str, write: Callable[[], Awaitable[Any]]) -> None:
        async def keep_trying() -> None:
            while True:
                await asyncio.sleep(SETTLE_LATER_EVERY)
                try:
                    await write()
                except Exception as exc:
                    if not is_transient(exc):
                        log.error("job %s: gave up writing its %s (%r)", job_id, what, exc)
                        return
                    continue
                log.info("job %s: its %s is written at last", job_id, what)
                return

        task = asyncio.create_task(keep_trying(), name=f"job-{job_id}-{what}")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    def _release_user(self, user_id: int) -> None:
        left = self._per_user.get(user_id, 1) - 1
        if left > 0:
            self._per_user[user_id] = left
        else:
            self._per_user.pop(user_id, None)

    async def _fail(
        self,
        job_id: int,
        error: errors.DrawbridgeError,
        chat: Chat,
        lang: str,
        status: MessageRef | None,
        *,
        own_key: bool = False,
    ) -> None:
        """Refund (at most once: the ledger guards it), record why, and tell the user."""

        async def record() -> None:
            refunded = await self.store.refund(job_id, error.kind)
            await self.store.finish_job(
                job_id,
                status="cancelled" if isinstance(error, errors.CancelledJobError) else "failed",
                error_kind=error.kind,
                error_detail=error.detail[:500] or None,
            )
            log.debug("job %s refunded: %s", job_id, refunded)

        # Retried, then left to the background and to the next start's recovery (which
        # refunds it): the user must hear about the failure either way.
        await self._ledger_write(job_id, "refund", record)
        text = render_error(lang, error)
        if own_key and error.kind in UPSTREAM_MAY_HAVE_BILLED:
            # "Nothing was charged" covers our credits; the user's own key is another matter.
            text += "\n" + t(lang, "note.own_key_maybe_billed")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                if status is not None and chat.limits.can_edit:
                    await chat.edit_text(status, text)
                else:
                    await chat.send_text(text)

    async def _watch_queue(
        self,
        ticket: _Ticket,
        chat: Chat,
        status: MessageRef,
        lang: str,
        shown: int,
        shown_estimate: Estimate | None,
    ) -> None:
        """Keep "Queued #N" and its estimate true while the job waits (every QUEUE_TICK, the
        first when started: one tick after the line was sent)."""
        queue = self._waiting[ticket.provider]
        while True:
            position = queue.place(ticket)
            if not position:
                return
            estimate = await self._estimate(ticket, position)
            if position != shown or _moved(estimate, shown_estimate):
                shown, shown_estimate = position, estimate
                line = t(lang, "status.queued", position=position, job=ticket.job_id)
                text = self._status_text(lang, ticket, line, estimate)
                await _quietly(chat.edit_text(status, text))
            await asyncio.sleep(QUEUE_TICK)

    async def _tick(
        self,
        chat: Chat,
        sent_status: Callable[[], Awaitable[MessageRef | None]],
        lang: str,
        ticket: _Ticket,
        started: float,
        shown_estimate: Estimate | None,
    ) -> None:
        """Keep "drawing 0:42" current; say at once when the estimate moves or is overrun."""
        status = await sent_status()
        if status is None:
            return
        last_edit = time.monotonic()
        overdue_shown = False
        while True:
            await asyncio.sleep(min(ETA_TICK, STATUS_TICK))
            now = time.monotonic()
            estimate = await self._estimate(ticket, 0)
            overdue = estimate is not None and now - started > estimate.p90
            if (
                now - last_edit < STATUS_TICK
                and overdue == overdue_shown
                and not _moved(estimate, shown_estimate)
            ):
                continue
            last_edit, overdue_shown, shown_estimate = now, overdue, estimate
            elapsed = int(now - started)
            line = t(
                lang,
                "status.drawing",
                job=ticket.job_id,
                elapsed=f"{elapsed // 60}:{elapsed % 60:02d}",
            )
            text = self._status_text(lang, ticket, line, estimate, running=True, overdue=overdue)
            await _quietly(chat.edit_text(status, text))

    # --- estimates ---

    async def _estimate(self, ticket: _Ticket, position: int) -> Estimate | None:
        """The estimate for this job: alone when running, behind the queue while waiting."""
        estimate = await self._class_estimate(ticket.eta_class, ticket.job_id)
        return self._in_queue(ticket, estimate, position)

    async def _class_estimate(self, cls: str, job_id: int | None) -> Estimate | None:
        """The estimate for one job of a class (a store that cannot be read: none).

        Estimates are a courtesy: they never fail a job.
        """
        try:
            return await self.eta.estimate(cls)
        except Exception:
            log.debug("job %s: no estimate for %s", job_id or "(new)", cls, exc_info=True)
            return None

    def _in_queue(
        self, ticket: _Ticket, estimate: Estimate | None, position: int
    ) -> Estimate | None:
        """`estimate` for a job at `position` in its provider's queue (0: running)."""
        if estimate is None or position <= 0:
            return estimate
        running = self._running.get(ticket.provider, 0)
        return estimate.scaled(queue_factor(running + position - 1, ticket.concurrency))

    async def _record_eta(self, ticket: _Ticket, seconds: float) -> None:
        """Add a successful job's upstream time to its class's history (best effort)."""
        try:
            await self.eta.record(ticket.eta_class, seconds)
        except Exception:
            log.debug("job %s: its duration was not recorded", ticket.job_id, exc_info=True)

    def _status_text(
        self,
        lang: str,
        ticket: _Ticket,
        line: str,
        estimate: Estimate | None = None,
        *,
        running: bool = False,
        overdue: bool = False,
    ) -> str:
        """A status message: the state, the estimate when there is one, the price line."""
        eta = ""
        if estimate is not None and overdue:
            eta = t(lang, "eta.overdue", median=clock(estimate.median))
        elif estimate is not None:
            key = "eta.running" if running else "eta.queued"
            eta = t(lang, key, median=clock(estimate.median), p90=clock(estimate.p90))
        return "\n".join(part for part in (line, eta, ticket.ack) if part)

    def _caption(
        self, lang: str, request: ImageRequest, result: ImageResult, ticket: _Ticket, charge: int
    ) -> str:
        prompt = result.revised_prompt or request.prompt
        if len(prompt) > 300:
            prompt = prompt[:297] + "..."
        key = "result.caption_fallback" if result.fallback_size else "result.caption"
        caption = t(
            lang,
            key,
            prompt=prompt,
            size=result.size or request.size or "auto",
            fallback=result.fallback_size or "",
            seconds=round(result.elapsed),
        )
        # What the user pays, when it is less than what was reserved, and why.
        count = len(result.images)
        if count < request.n:
            caption += "\n" + t(lang, "result.fewer_images", count=count, n=request.n)
        if charge < ticket.cost and result.fallback_size:
            caption += "\n" + t(
                lang,
                "result.fallback_charge",
                fallback=result.fallback_size,
                charged=charge,
                refunded=ticket.cost - charge,
            )
        elif charge < ticket.cost:
            caption += "\n" + t(
                lang, "result.partial_charge", charged=charge, refunded=ticket.cost - charge
            )
        return caption

    # --- files kept for reroll, edit-from-result and "original" ---

    def job_dir(self, job_id: int) -> Path:
        """Where a job's references and results are kept for a while."""
        return self.files_dir / str(job_id)

    def _save_references(self, job_id: int, refs: Sequence[Reference]) -> None:
        if not refs:
            return
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        for index, ref in enumerate(refs):
            (folder / f"ref{index + 1}{Path(ref.filename).suffix}").write_bytes(ref.data)

    def _save_results(self, job_id: int, files: Sequence[OutFile]) -> None:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        for index, file in enumerate(files):
            ext = file.filename.rsplit(".", 1)[-1]
            (folder / f"out{index + 1}.{ext}").write_bytes(file.data)

    async def _keep(
        self,
        job_id: int,
        what: str,
        save: Callable[[int, Sequence[T]], None],
        items: Sequence[T],
    ) -> None:
        """Keep a job's files off the event loop; a failure (a full disk) is logged, not fatal."""
        if not items:
            return  # nothing to write: no trip to a thread (most jobs have no references)
        try:
            await asyncio.to_thread(save, job_id, items)
        except OSError as exc:
            log.warning("job %s: could not keep its %s: %s", job_id, what, exc)

    def has_results(self, job_id: int) -> bool:
        """Whether a job's result files are still kept."""
        folder = self.job_dir(job_id)
        return folder.is_dir() and any(folder.glob("out*"))

    async def stored_results(self, job_id: int) -> list[OutFile]:
        """A finished job's result files, if still kept (read off the event loop)."""
        return await asyncio.to_thread(self._read_results, job_id)

    def _read_results(self, job_id: int) -> list[OutFile]:
        folder = self.job_dir(job_id)
        files = []
        for path in sorted(folder.glob("out*")) if folder.is_dir() else []:
            ext = path.suffix.lstrip(".")
            name = f"drawbridge-{job_id}-{path.stem[3:]}.{ext}"
            files.append(OutFile(path.read_bytes(), name, mime_for_format(ext)))
        return files

    async def stored_references(self, job_id: int) -> list[bytes]:
        """A job's prepared reference images, if still kept (read off the event loop)."""
        folder = self.job_dir(job_id)

        def read() -> list[bytes]:
            return [p.read_bytes() for p in sorted(folder.glob("ref*"))] if folder.is_dir() else []

        return await asyncio.to_thread(read)

    def prune_files(self) -> int:
        """Delete kept job files older than `DRAWBRIDGE_KEEP_HOURS`; returns how many folders."""
        if not self.files_dir.is_dir():
            return 0
        cutoff = time.time() - self.settings.keep_hours * 3600
        removed = 0
        for folder in self.files_dir.iterdir():
            try:
                if folder.is_dir() and folder.stat().st_mtime < cutoff:
                    for path in folder.iterdir():
                        path.unlink(missing_ok=True)
                    folder.rmdir()
                    removed += 1
            except OSError as exc:
                # One folder that cannot go (permissions, a race with a reroll) spares the rest.
                log.warning("could not prune %s: %s", folder, exc)
        return removed

    def start_housekeeping(self, every: float | None = None) -> None:
        """Prune kept job files now and every `every` s (default `PRUNE_EVERY`) until shutdown."""
        if self._housekeeper is None:
            interval = PRUNE_EVERY if every is None else every
            self._housekeeper = asyncio.create_task(self._prune_forever(interval), name="prune")

    async def _prune_forever(self, every: float) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.prune_files)
                if removed:
                    log.info("pruned the kept files of %d old job(s)", removed)
            except Exception:
                log.warning("pruning kept job files failed", exc_info=True)
            await asyncio.sleep(every)

    # --- control ---

    async def cancel(self, user_id: int, job_id: int | None = None) -> int | None:
        """Cancel the user's queued job (the newest, or `job_id`); returns its id or None.

        Only queued jobs can be cancelled: a running request may already be billed upstream.
        """
        candidates = [
            tk
            for tk in self._tickets.values()
            if tk.user_id == user_id and not tk.running and (job_id is None or tk.job_id == job_id)
        ]
        if not candidates:
            return None
        ticket = max(candidates, key=lambda tk: tk.job_id)
        if ticket.task is not None:
            ticket.task.cancel()
            await ticket.done.wait()
        return ticket.job_id

    def stop_intake(self) -> None:
        """Refuse new jobs from now on (shutdown has begun)."""
        self._accepting = False

    async def _settle_refused(
        self,
        job_id: int | None,
        kind: str,
        detail: str | None,
        opening: Awaitable[tuple[int, int | Exception]] | None = None,
        job: dict[str, Any] | None = None,
    ) -> None:
        """Record a job that never started, returning any credits it had reserved.

        A job refused before its row was written (`job_id` None) gets one now, saying why;
        one whose `opening` (`Store.open_job`) was under way when it was cancelled is
        settled once that is over, whatever it wrote.
        """
        if job_id is None and opening is not None:
            try:
                job_id, _ = await opening
            except Exception:
                job_id = None  # nothing written
        if job_id is None:
            if job is None:
                return
            try:
                job_id = await self.store.create_job(**job)
            except Exception as exc:
                log.error("a refused job could not be recorded (%r)", exc)
                return
        refused = job_id

        async def record() -> None:
            await self.store.refund(refused, kind)
            await self.store.finish_job(
                refused, status="failed", error_kind=kind, error_detail=detail
            )

        # The original refusal matters more than this record; recovery settles it otherwise.
        await self._ledger_write(refused, "refusal", record)

    def _ended(self, ticket: _Ticket, slot: _ProviderSlot, chat: Chat, lang: str) -> None:
        self._launched(ticket)
        slot.abandon()
        if not ticket.started:
            # Shutdown (or another /cancel) sees this task as it would have the job's own;
            # cancelled before its own first step, it is followed by another the same way.
            ticket.task = asyncio.create_task(
                self._unstarted(ticket, chat, lang), name=f"job-{ticket.job_id}-unstarted"
            )
            ticket.task.add_done_callback(lambda _: self._ended(ticket, slot, chat, lang))

    def _launched(self, ticket: _Ticket) -> None:
        """A starting job's request is sent (or the job ended before it was); once a job."""
        if ticket.launching:
            ticket.launching = False
            self._launching -= 1
            if not self._launching:
                self._launches_sent.set()

    async def _after_launches(self) -> None:
        """Wait until the jobs starting now have sent their requests, LAUNCH_YIELD at most.

        Commands arriving together (a burst) are all queued at once, then every job task
        runs at once: the first status lines of the jobs that must wait (a platform call
        each) would otherwise go before the requests of the jobs that can start.
        """
        if self._launching:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAUNCH_YIELD):
                    await self._launches_sent.wait()

    def _intake_settled(self) -> None:
        self._intake -= 1
        if self._intake == 0:
            self._intake_idle.set()

    async def shutdown(self, grace: float) -> None:
        """Stop intake, let running jobs finish for `grace` seconds, refund the rest."""
        self._accepting = False
        # Commands still being checked or charged either queue or give their credits back.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._intake:
                    self._intake_idle.clear()
                    await self._intake_idle.wait()
        tasks = [tk.task for tk in self._tickets.values() if tk.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=15)
        if self._releases.running:  # slots going back, before the store closes
            await asyncio.wait(self._releases.running, timeout=15)
        # What the last answers showed about their relays (`CapabilityStore.note`), likewise.
        for capabilities in {id(c.capabilities): c.capabilities for c in self.clients}.values():
            await capabilities.flush()
        # Pruning stops; settlements still being retried are left to the next start's recovery
        # (delivered jobs carry their charge, so it commits them).
        chores = [*self._later, *([self._housekeeper] if self._housekeeper else [])]
        if self._later:
            log.warning("%d job settlement(s) left to recovery at the next start", len(self._later))
        for task in chores:
            task.cancel()
        await asyncio.gather(*chores, return_exceptions=True)
        self._housekeeper = None

    async def wait_idle(self) -> None:
        """Wait until every queued and running job has finished and given back its slot
        (tests, benchmarks)."""
        while self._tickets or self._releases.running:
            await asyncio.gather(
                *(tk.done.wait() for tk in list(self._tickets.values())),
                *self._releases.running,
                return_exceptions=True,
            )


class _ProgressRelay:
    """Turns upstream progress into chat previews, throttled, beside the upstream stream.

    A preview upload never holds up the reading of the image's stream: partials are handed to
    one background task, and while it is busy only the newest partial waits (older ones are
    stale). `close()` drops what has not been shown once the final image is in hand.
    """

    def __init__(self, chat: Chat, lang: str, on_sent: Callable[[], None] | None = None) -> None:
        self.chat = chat
        self.lang = lang
        self.preview: MessageRef | None = None
        self.last = 0.0
        self._pending: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        # Called once, when the request's last byte is handed to the connection.
        self._on_sent = on_sent

    async def __call__(self, event: Progress) -> None:
        if event.kind in ("request_sent", "waiting") and self._on_sent is not None:
            on_sent, self._on_sent = self._on_sent, None
            on_sent()
        if event.kind != "partial" or not event.data or not self.chat.limits.can_preview:
            return
        now = time.monotonic()
        if now - self.last < PREVIEW_INTERVAL:
            return
        self.last = now
        self._pending = event.data
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send(), name="preview")

    async def _send(self) -> None:
        while self._pending is not None:
            data, self._pending = self._pending, None
            try:
                jpeg = await to_jpeg_partial(data)
                self.preview = await self.chat.send_preview(self.preview, jpeg)
            except Exception:
                log.debug("preview failed", exc_info=True)

    async def close(self) -> None:
        """Drop previews not yet sent; give one in flight a moment, then cancel it."""
        self._pending = None
        task, self._task = self._task, None
        if task is None or task.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), PREVIEW_FLUSH)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _ByteBudget:
    """Bytes one user may be downloading at once; a download waits until its share is free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.in_use = 0
        # Jobs of this user currently fetching through this budget (it is dropped at 0).
        self.users = 0
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        """Hold `amount` bytes (at most the capacity) for the duration of one download."""
        amount = min(amount, self.capacity)
        while self.in_use + amount > self.capacity:
            self._freed.clear()
            await self._freed.wait()
        self.in_use += amount
        try:
            yield
        finally:
            self.in_use -= amount
            self._freed.set()


def _out_files(job_id: int, result: ImageResult) -> list[OutFile]:
    """The result images as files to send, straight from memory."""
    files = []
    for index, image in enumerate(result.images):
        ext = extension_for_format(image.mime.split("/")[-1])
        name = f"drawbridge-{job_id}-{index + 1}.{ext}"
        files.append(OutFile(image.data, name, image.mime, image.width, image.height))
    return files


def _size_of(text: str) -> Size | None:
    """A `WxH` size string as a Size (None if it is not one)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return Size(int(width), int(height))


async def _deliver(chat: Chat, files: Sequence[OutFile], meta: ResultMeta) -> int:
    """Send the results; returns how many reached the chat (all, or some before a failure).

    A `DeliveryError` whose `delivered` param is above 0 means the chat shows that many of
    the files already; with nothing delivered it is raised on.
    """
    try:
        await chat.send_results(files, meta)
    except errors.DeliveryError as exc:
        delivered = exc.params.get("delivered")
        if isinstance(delivered, int) and 0 < delivered < len(files):
            log.warning(
                "job %s: %d of %d results delivered: %s",
                meta.job_id,
                delivered,
                len(files),
                exc.detail,
            )
            return delivered
        raise
    except Exception as exc:
        raise errors.DeliveryError(type(exc).__name__) from exc
    return len(files)


def _moved(estimate: Estimate | None, shown: Estimate | None) -> bool:
    """Whether the estimate a user sees should be replaced by `estimate`."""
    if estimate is None:
        return shown is not None
    return estimate.differs(shown)


def render_error(lang: str, error: errors.DrawbridgeError) -> str:
    """The user's message for an error, with its parameters."""
    return t(lang, error.key, **error.params)


async def _settle(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Wait for background bookkeeping; its failures are logged, never raised."""
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            log.warning("job bookkeeping failed: %r", outcome)


async def _status(chat: Chat, text: str) -> MessageRef | None:
    """Send a status line; a platform hiccup here must not fail the job."""
    try:
        return await chat.send_text(text)
    except Exception:
        log.debug("status message failed", exc_info=True)
        return None


async def _quietly(awaitable: Any) -> None:
    """Status updates are best effort: a failed edit never fails a job."""
    try:
        await awaitable
    except Exception:
        log.debug("status update failed", exc_info=True)
