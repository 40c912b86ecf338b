"""Honest ETAs: what recent similar jobs took upstream, or no estimate at all.

Jobs are alike when they went to the same provider at the same size tier, quality and kind
(`eta_class`). An estimate is the median and the 90th percentile of the upstream time of the
last `HISTORY` successful jobs of the class; a queued job adds the jobs ahead of it divided by
the provider's concurrency. With fewer than `MIN_SAMPLES` jobs there is no estimate: a guess
shown as an estimate is worse than none.

A relay's speed changes in steps (a busy hour, a new channel behind it). A median over 50
jobs would take 25 jobs to follow such a step, so when the last `SHIFT_RUN` jobs all fall
clearly outside what the older history spans, the older history is dropped and the estimate
starts again from the new level.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from bot.sizes import Size

HISTORY = 50
"""Similar successful jobs an estimate is made from."""
MIN_SAMPLES = 3
"""Fewer similar jobs than this: no estimate."""
SHIFT_RUN = 5
"""Consecutive jobs outside the older history's range that mark a new level of latency."""
SHIFT_MARGIN = 1.2
"""How far (as a factor) outside the older p10..p90 such a job must be."""
CHANGE = 0.2
"""A status is edited when its estimate moves by more than this fraction."""


class DurationSource(Protocol):
    """Where past upstream durations come from (the Store)."""

    async def upstream_durations(self, eta_class: str, limit: int) -> list[float]:
        """Upstream seconds of the last `limit` successful jobs of a class, oldest first."""
        ...


@dataclass(frozen=True, slots=True)
class Estimate:
    """How long a job is expected to take: usually `median` seconds, at most about `p90`."""

    median: float
    p90: float
    samples: int

    def scaled(self, factor: float) -> Estimate:
        """This estimate for `factor` jobs' worth of time (a queue ahead, plus this one)."""
        return Estimate(self.median * factor, self.p90 * factor, self.samples)

    def differs(self, other: Estimate | None, by: float = CHANGE) -> bool:
        """Whether `other` (what the user was shown) is more than `by` away from this."""
        if other is None:
            return True
        return _moved(other.median, self.median, by) or _moved(other.p90, self.p90, by)


def eta_class(provider: str, size: Size | None, quality: str | None, kind: str) -> str:
    """The class of jobs alike for estimates: provider, size tier, quality and kind."""
    tier = size.tier if size is not None else "auto"
    return f"{provider}|{tier}|{quality or 'auto'}|{kind}"


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def estimate_of(samples: list[float]) -> Estimate | None:
    """The estimate from these durations, or None when there are too few to tell."""
    if len(samples) < MIN_SAMPLES:
        return None
    ordered = sorted(samples)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return Estimate(median, percentile(ordered, 0.9), len(ordered))


def queue_factor(ahead: int, concurrency: int) -> float:
    """How many jobs' worth of time a queued job waits and runs: its own plus those ahead
    of it shared out over the provider's slots."""
    return 1.0 + max(0, ahead) / max(1, concurrency)


def shifted(samples: list[float]) -> bool:
    """Whether the newest `SHIFT_RUN` samples all lie clearly outside the older ones' range."""
    older, recent = samples[:-SHIFT_RUN], samples[-SHIFT_RUN:]
    if len(older) < MIN_SAMPLES or len(recent) < SHIFT_RUN:
        return False
    low, high = percentile(older, 0.1), percentile(older, 0.9)
    return all(x > high * SHIFT_MARGIN for x in recent) or all(
        x * SHIFT_MARGIN < low for x in recent
    )


class EtaBook:
    """Recent upstream durations per job class, loaded from the store once, kept in memory."""

    def __init__(self, source: DurationSource) -> None:
        self._source = source
        self._history: dict[str, deque[float]] = {}
        # Each class's estimate from its history as it is now: asked at every job's start and
        # by every waiting job's ticker, changed only when a job of the class is recorded.
        self._estimates: dict[str, Estimate | None] = {}
        self._lock = asyncio.Lock()

    async def _samples(self, cls: str) -> deque[float]:
        history = self._history.get(cls)
        if history is None:
            async with self._lock:
                history = self._history.get(cls)
                if history is None:
                    loaded = await self._source.upstream_durations(cls, HISTORY)
                    history = self._history[cls] = deque(loaded, maxlen=HISTORY)
        return history

    async def estimate(self, cls: str) -> Estimate | None:
        """The estimate for one more job of this class, or None without enough history."""
        if cls in self._estimates:
            return self._estimates[cls]
        found = self._estimates[cls] = estimate_of(list(await self._samples(cls)))
        return found

    async def record(self, cls: str, seconds: float) -> None:
        """A job of this class succeeded after `seconds` upstream."""
        history = await self._samples(cls)
        self._estimates.pop(cls, None)
        history.append(max(0.0, seconds))
        if shifted(list(history)):
            # The relay changed pace: the older history describes a relay that is gone.
            recent = list(history)[-SHIFT_RUN:]
            history.clear()
            history.extend(recent)


def _moved(before: float, now: float, by: float) -> bool:
    if before <= 0:
        return now > 0
    return abs(now - before) / before > by


def clock(seconds: float) -> str:
    """`m:ss` for a duration (rounded up: "about 0:00" would promise too much)."""
    whole = max(1, math.ceil(seconds))
    return f"{whole // 60}:{whole % 60:02d}"
