"""What each provider can do, learned from its answers and kept across restarts and processes.

A relay may pass image streams or choke on them (one-api, litellm), parse multipart edits or
not (one-api), serve 4K or fall back, answer b64 or url. The client learns these from real
answers and records them here, keyed by provider name, in the store's
`provider_capabilities` table (a JSON object per provider, merged; `drawbridge doctor`
writes the same keys). Reads are cached briefly in memory: the client consults this on every
request, and a change written by another process is seen within `max_age` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from bot.batching import InFlight

if TYPE_CHECKING:
    from bot.store import Store

log = logging.getLogger(__name__)

CACHE_SECONDS: Final = 30.0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One provider's learned capabilities; None everywhere means "not known yet"."""

    stream: bool | None = None
    stream_checked_at: float | None = None  # unix time streaming was last found failing / probed
    edits: bool | None = None
    four_k: bool | None = None
    result: str | None = None  # "b64" | "url", as seen
    balance: float | None = None  # what the relay reports left, in its unit
    balance_checked_at: float | None = None
    models_ok: bool | None = None  # GET /v1/models lists the configured model

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capabilities:
        """From the stored JSON object; unknown keys and odd types are dropped."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            value = data.get(spec.name)
            if value is None:
                continue
            if spec.name == "result":
                if isinstance(value, str):
                    values[spec.name] = value
            elif spec.name.endswith("_at") or spec.name == "balance":
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values[spec.name] = float(value)
            elif isinstance(value, bool):
                values[spec.name] = value
        return cls(**values)


_NAMES: Final = frozenset(spec.name for spec in fields(Capabilities))


class CapabilityStore:
    """Learned capabilities per provider name, over a `Store` (or in memory when it is None).

    Without a store (tests, the CLI without a data dir) what is learned lasts as long as this
    object, which is still enough for one process not to repeat a failure.
    """

    def __init__(self, store: Store | None = None, *, max_age: float = CACHE_SECONDS) -> None:
        self.store = store
        self.max_age = max_age
        self._cache: dict[str, tuple[float, Capabilities]] = {}
        # The read in flight per provider: a burst's first wave (50 requests launched at once,
        # or at once when the cache expires) shares one read instead of 50 store round trips.
        self._reading: InFlight[str, Capabilities] = InFlight()
        self._learned = 0  # counts `learn` calls: a read that overlapped one is stale
        self._writing: dict[str, asyncio.Lock] = {}
        # Per provider, the changes being written: known here already, not in a write's answer.
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._writes: set[asyncio.Future[Capabilities]] = set()

    async def get(self, provider: str) -> Capabilities:
        """What is known about `provider` (cached for `max_age` seconds)."""
        cached = self._cache.get(provider)
        if cached is not None and (
            self.store is None or time.monotonic() - cached[0] < self.max_age
        ):
            return cached[1]
        if self.store is None:
            return Capabilities()
        return await self._reading.run(provider, lambda: self._read(provider))

    async def _read(self, provider: str) -> Capabilities:
        assert self.store is not None
        learned = self._learned
        caps = Capabilities.from_json(await self.store.provider_capabilities(provider))
        if self._learned == learned:  # else `learn` caches what it wrote, newer than this
            self._cache[provider] = (time.monotonic(), caps)
        return caps

    async def learn(self, provider: str, **changes: Any) -> Capabilities:
        """Record `changes` (keys of `Capabilities`; None forgets one) and return the result.

        This process knows them at once (`cached`, `get`), before the write: requests
        answering together (a burst's first wave) learn a thing once, not once each.
        """
        self._check(changes)
        self._remember(provider, changes)
        if self.store is None:
            return self.cached(provider)
        return await self._write(provider, changes)

    def note(self, provider: str, **changes: Any) -> None:
        """`learn`, written in the background: for what an answer already in hand showed,
        which the answer must not wait for. `flush` waits for the writes; one that fails is
        logged (what was learned is an optimisation) and stays known to this process."""
        self._check(changes)
        self._remember(provider, changes)
        if self.store is None:
            return
        write = asyncio.ensure_future(self._write(provider, changes))
        self._writes.add(write)
        write.add_done_callback(partial(self._written, provider))

    async def flush(self) -> None:
        """Wait for the writes `note` started."""
        while self._writes:
            await asyncio.wait(list(self._writes))

    def _check(self, changes: dict[str, Any]) -> None:
        unknown = set(changes) - _NAMES
        if unknown:
            raise ValueError(f"unknown capabilities: {sorted(unknown)}")
        self._learned += 1

    def _remember(self, provider: str, changes: dict[str, Any]) -> None:
        """`changes` over what this process knows, keeping when it was read. Nothing known
        (never read, or read too long ago): left to the write's answer, which has it all."""
        cached = self._cache.get(provider)
        if cached is not None:
            known = {spec.name: getattr(cached[1], spec.name) for spec in fields(Capabilities)}
            known.update(changes)
            self._cache[provider] = (cached[0], Capabilities.from_json(known))
        elif self.store is None:
            self._cache[provider] = (time.monotonic(), Capabilities.from_json(changes))

    async def _write(self, provider: str, changes: dict[str, Any]) -> Capabilities:
        assert self.store is not None
        pending = self._pending.setdefault(provider, [])
        pending.append(changes)
        try:
            # In the order asked: a later change to the same key must land last.
            async with self._writing.setdefault(provider, asyncio.Lock()):
                merged = await self.store.update_provider_capabilities(provider, changes)
        finally:
            pending.remove(changes)
        caps = Capabilities.from_json(merged)
        # The writes still queued behind this one stay known meanwhile.
        for later in pending:
            merged.update(later)
        self._cache[provider] = (time.monotonic(), Capabilities.from_json(merged))
        return caps

    def _written(self, provider: str, write: asyncio.Future[Capabilities]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.warning("%s: cannot record what was learned: %r", provider, write.exception())

    def cached(self, provider: str) -> Capabilities:
        """The last known value without touching the store (empty when never read)."""
        cached = self._cache.get(provider)
        return cached[1] if cached is not None else Capabilities()
