"""The job runner: from a validated request to delivered images, with credits kept exact.

One job's life: resolve the credential, validate (prompt, size, references) before charging,
reserve credits, wait for a slot on the provider, call the upstream, deliver through the Chat
port, commit. Every failure after the reservation refunds it exactly once (the store's guarded
ledger makes a second refund a no-op), and the job row records why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bot import errors
from bot.chat import Chat, ImageSource, Invocation, MessageRef, OutFile, ResultMeta
from bot.config import ProviderConfig, Settings
from bot.i18n import t
from bot.images import (
    Reference,
    extension_for_format,
    mime_for_format,
    prepare_references,
    to_jpeg_partial,
)
from bot.logs import add_secrets
from bot.sizes import Size
from bot.store import Store, User
from bot.upstream import ImageRequest, ImageResult, Progress, ProviderChain, UpstreamClient

log = logging.getLogger(__name__)

STATUS_TICK = 10.0
"""Seconds between elapsed-time edits of the status message."""
UPSTREAM_MAY_HAVE_BILLED = frozenset(
    {"timeout", "malformed_response", "result_download_failed", "delivery_failed", "shutdown"}
)
"""Failures after the upstream may have made (and billed) the image."""
QUEUE_TICK = 3.0
"""Seconds between checks of a waiting job's queue position."""
PREVIEW_INTERVAL = 3.0
"""Least seconds between two partial previews (platforms rate-limit edits)."""


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

    def options(self) -> dict[str, Any]:
        """The options as stored on the job row (and reused by reroll)."""
        return {
            "size": str(self.size) if self.size else None,
            "n": self.n,
            "quality": self.quality,
            "format": self.output_format,
            "background": self.background,
        }


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
    done: asyncio.Event = field(default_factory=asyncio.Event)


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


class JobRunner:
    """Runs image jobs with per-provider concurrency, per-user limits and a bounded queue."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clients: Sequence[UpstreamClient],
    ) -> None:
        self.settings = settings
        self.store = store
        self.clients = list(clients)
        self._chain = ProviderChain(self.clients) if self.clients else None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, deque[_Ticket]] = {}
        self._tickets: dict[int, _Ticket] = {}
        self._per_user: dict[int, int] = {}
        # Jobs admitted but still being validated or charged (not yet in a queue).
        self._intake = 0
        self._intake_idle = asyncio.Event()
        self._accepting = True
        self.files_dir = settings.data_dir / "jobs"

    # --- intake ---

    def _credential(self, own_key: str | None) -> _Credential:
        providers = [c.provider for c in self.clients]
        if own_key:
            if not providers:
                raise errors.NotConfiguredError("no provider for a personal key")
            primary = providers[0].with_key(own_key)
            # A personal key is used only on the first provider: never spend it elsewhere.
            client = UpstreamClient(primary, http=self.clients[0].http)
            return _Credential(ProviderChain([client]), primary, True)
        if self._chain is None or not any(p.api_key for p in providers):
            raise errors.NotConfiguredError("no shared key")
        return _Credential(self._chain, providers[0], False)

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
        job_id = await self.store.create_job(
            user_id=user.id,
            platform=inv.platform,
            chat_id=inv.chat_id,
            group_key=inv.group_id,
            kind=spec.kind,
            prompt=spec.prompt,
            options=spec.options(),
            ref_count=len(spec.references) + len(extra_references),
            own_key=bool(own_key),
        )
        # Count the job against the user's and the queue's limits before any await, so two
        # commands arriving together cannot both slip under a limit.
        admitted = False
        try:
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
            references = await self._validate(spec, cred.primary, extra_references)
            cost = 0 if cred.own_key else price(self.settings, spec.size, spec.quality) * spec.n
            await self.store.reserve(
                job_id,
                user_id=user.id,
                cost=cost,
                day=today(self.settings),
                daily_allowance=self.settings.daily_credits,
                group_key=None if cred.own_key else inv.group_id,
                group_cap=self.settings.group_daily_cap,
            )
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
            await asyncio.shield(self._settle_refused(job_id, kind, detail))
            raise
        finally:
            if admitted:
                self._intake_settled()

        ticket = _Ticket(job_id, user.id, cred.primary.name, own_key=cred.own_key)
        queue = self._waiting.setdefault(ticket.provider, deque())
        queue.append(ticket)
        self._tickets[job_id] = ticket
        slot = self._slot(cred.primary)
        position = len(queue) if slot.locked() else 0
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
            self._run(ticket, cred, request, chat, lang, position, references),
            name=f"job-{job_id}",
        )
        return job_id

    async def _validate(
        self, spec: JobSpec, provider: ProviderConfig, extra: Sequence[bytes]
    ) -> list[Reference]:
        prompt = spec.prompt.strip()
        if not prompt:
            raise errors.EmptyPromptError()
        if len(prompt) > self.settings.max_prompt_chars:
            raise errors.PromptTooLongError(
                f"{len(prompt)} chars", length=len(prompt), limit=self.settings.max_prompt_chars
            )
        if not 1 <= spec.n <= self.settings.max_n:
            raise errors.BadOptionError(f"n={spec.n}", option="n", value=spec.n)
        if spec.kind != "edit":
            return []
        count = len(spec.references) + len(extra)
        if count == 0:
            raise errors.NoReferenceImageError()
        if count > provider.max_references:
            raise errors.TooManyReferencesError(count=count, limit=provider.max_references)
        # Chat platforms' image links expire: fetch them all at once, now.
        fetched = await asyncio.gather(
            *(source.fetch(self.settings.max_input_bytes) for source in spec.references)
        )
        raw = [*extra, *fetched]
        return await prepare_references(
            raw, max_count=provider.max_references, max_bytes=provider.max_reference_bytes
        )

    def _slot(self, provider: ProviderConfig) -> asyncio.Semaphore:
        slot = self._slots.get(provider.name)
        if slot is None:
            slot = self._slots[provider.name] = asyncio.Semaphore(provider.concurrency)
        return slot

    # --- running ---

    async def _run(
        self,
        ticket: _Ticket,
        cred: _Credential,
        request: ImageRequest,
        chat: Chat,
        lang: str,
        position: int,
        references: Sequence[Reference],
    ) -> None:
        job_id = ticket.job_id
        started = time.monotonic()
        ticker: asyncio.Task[None] | None = None
        progress = _ProgressRelay(chat, lang)
        status: MessageRef | None = None
        # Bookkeeping that must not delay the upstream call; settled before commit or refund.
        side: list[asyncio.Task[Any]] = []
        try:
            status = await _status(
                chat,
                t(lang, "status.queued", position=position, job=job_id)
                if position
                else t(lang, "status.started", job=job_id),
            )
            await asyncio.to_thread(self._save_references, job_id, references)
            if position and status is not None and chat.limits.can_edit:
                ticker = asyncio.create_task(self._watch_queue(ticket, chat, status, lang))
            async with self._slot(cred.primary):
                if ticker is not None:
                    ticker.cancel()
                    ticker = None
                self._waiting[ticket.provider].remove(ticket)
                ticket.running = True
                side.append(asyncio.create_task(self.store.mark_running(job_id, cred.primary.name)))
                if status is not None and chat.limits.can_edit and position:
                    text = t(lang, "status.started", job=job_id)
                    side.append(asyncio.create_task(_quietly(chat.edit_text(status, text))))
                if status is not None and chat.limits.can_edit:
                    ticker = asyncio.create_task(self._tick(chat, status, lang, job_id))
                result = await cred.chain.run(request, progress)
                await _settle(side)
                if ticker is not None:
                    ticker.cancel()
                if status is not None and chat.limits.can_edit:
                    await _quietly(chat.edit_text(status, t(lang, "status.uploading", job=job_id)))
                files = await asyncio.to_thread(self._save_results, job_id, result)
                caption = self._caption(lang, request, result)
                try:
                    await chat.send_results(
                        files, ResultMeta(job_id, caption, result.revised_prompt)
                    )
                except errors.DeliveryError:
                    raise
                except Exception as exc:
                    raise errors.DeliveryError(type(exc).__name__) from exc
                await self.store.commit(job_id)
                await self.store.finish_job(
                    job_id,
                    status="succeeded",
                    usage=result.usage,
                    revised_prompt=result.revised_prompt,
                    provider=result.provider,
                    outputs=[
                        {"width": f.width, "height": f.height, "bytes": len(f.data), "mime": f.mime}
                        for f in files
                    ],
                )
                ticket.outcome = "succeeded"
                if status is not None:
                    await _quietly(chat.delete(status))
                log.info(
                    "job %s done in %.1fs by %s (%d images)",
                    job_id,
                    time.monotonic() - started,
                    result.provider,
                    len(files),
                )
        except asyncio.CancelledError:
            stopped: errors.DrawbridgeError = (
                errors.CancelledJobError(job=job_id)
                if not ticket.running and self._accepting
                else errors.ShuttingDownError()
            )
            await asyncio.shield(_settle(side))
            await asyncio.shield(
                self._fail(job_id, stopped, chat, lang, status, own_key=ticket.own_key)
            )
            raise
        except errors.DrawbridgeError as exc:
            log.info("job %s failed: %s (%s)", job_id, exc.kind, exc.detail[:200])
            await _settle(side)
            await self._fail(job_id, exc, chat, lang, status, own_key=ticket.own_key)
        except Exception as exc:
            log.exception("job %s crashed", job_id)
            await _settle(side)
            await self._fail(
                job_id,
                errors.DrawbridgeError(type(exc).__name__),
                chat,
                lang,
                status,
                own_key=ticket.own_key,
            )
        finally:
            if ticker is not None:
                ticker.cancel()
            if progress.preview is not None and ticket.outcome != "succeeded":
                # A partial preview of a job that failed would look like a result.
                await _quietly(chat.delete(progress.preview))
            with contextlib.suppress(ValueError):
                self._waiting.get(ticket.provider, deque()).remove(ticket)
            self._tickets.pop(job_id, None)
            self._release_user(ticket.user_id)
            ticket.done.set()

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
        try:
            refunded = await self.store.refund(job_id, error.kind)
            await self.store.finish_job(
                job_id,
                status="cancelled" if isinstance(error, errors.CancelledJobError) else "failed",
                error_kind=error.kind,
                error_detail=error.detail[:500] or None,
            )
            log.debug("job %s refunded: %s", job_id, refunded)
        except Exception:
            # The next start's recovery refunds it; the user must hear about the failure now.
            log.exception("job %s: could not record its failure", job_id)
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
        self, ticket: _Ticket, chat: Chat, status: MessageRef, lang: str
    ) -> None:
        """Keep "Queued #N" true while the job waits."""
        queue = self._waiting[ticket.provider]
        shown = queue.index(ticket) + 1 if ticket in queue else 0
        while True:
            await asyncio.sleep(QUEUE_TICK)
            try:
                position = queue.index(ticket) + 1
            except ValueError:
                return
            if position != shown:
                shown = position
                text = t(lang, "status.queued", position=position, job=ticket.job_id)
                await _quietly(chat.edit_text(status, text))

    async def _tick(self, chat: Chat, status: MessageRef, lang: str, job_id: int) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(STATUS_TICK)
            elapsed = int(time.monotonic() - started)
            await _quietly(
                chat.edit_text(
                    status,
                    t(
                        lang,
                        "status.drawing",
                        job=job_id,
                        elapsed=f"{elapsed // 60}:{elapsed % 60:02d}",
                    ),
                )
            )

    def _caption(self, lang: str, request: ImageRequest, result: ImageResult) -> str:
        prompt = result.revised_prompt or request.prompt
        if len(prompt) > 300:
            prompt = prompt[:297] + "..."
        key = "result.caption_fallback" if result.fallback_size else "result.caption"
        return t(
            lang,
            key,
            prompt=prompt,
            size=result.size or request.size or "auto",
            fallback=result.fallback_size or "",
            seconds=round(result.elapsed),
        )

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

    def _save_results(self, job_id: int, result: ImageResult) -> list[OutFile]:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, image in enumerate(result.images):
            ext = extension_for_format(image.mime.split("/")[-1])
            name = f"drawbridge-{job_id}-{index + 1}.{ext}"
            (folder / f"out{index + 1}.{ext}").write_bytes(image.data)
            files.append(OutFile(image.data, name, image.mime, image.width, image.height))
        return files

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
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                for path in folder.iterdir():
                    path.unlink(missing_ok=True)
                folder.rmdir()
                removed += 1
        return removed

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

    async def _settle_refused(self, job_id: int, kind: str, detail: str | None) -> None:
        """Record a job that never started, returning any credits it had reserved."""
        try:
            await self.store.refund(job_id, kind)
            await self.store.finish_job(
                job_id, status="failed", error_kind=kind, error_detail=detail
            )
        except Exception:
            # The original refusal matters more; recovery at the next start settles the row.
            log.exception("job %s: could not record its refusal", job_id)

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
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=15)

    async def wait_idle(self) -> None:
        """Wait until every queued and running job has finished (tests, benchmarks)."""
        while self._tickets:
            await asyncio.gather(
                *(tk.done.wait() for tk in list(self._tickets.values())), return_exceptions=True
            )


class _ProgressRelay:
    """Turns upstream progress into chat previews, throttled."""

    def __init__(self, chat: Chat, lang: str) -> None:
        self.chat = chat
        self.lang = lang
        self.preview: MessageRef | None = None
        self.last = 0.0

    async def __call__(self, event: Progress) -> None:
        if event.kind != "partial" or not event.data or not self.chat.limits.can_preview:
            return
        now = time.monotonic()
        if now - self.last < PREVIEW_INTERVAL:
            return
        self.last = now
        try:
            jpeg = await to_jpeg_partial(event.data)
            self.preview = await self.chat.send_preview(self.preview, jpeg)
        except Exception:
            log.debug("preview failed", exc_info=True)


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
