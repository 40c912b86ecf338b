"""Telegram flood control: pace sends per chat, keep room for results, honour `retry_after`.

Telegram allows about one message a second per chat (short bursts pass), 20 a minute in a
group and 30 a second overall; beyond that it answers 429 with `retry_after`, which aiogram
raises as `TelegramRetryAfter` without retrying. Every send, edit and delete goes through
`TelegramSender`.

Two kinds of message share each chat's budget. Results and answers must arrive, so they wait
for a slot and are retried after a 429. Status edits and partial previews are only worth
showing while they are current: they take a *spare* slot, one that leaves `reserve` slots
free, never while a result waits in the same chat, and they are not retried after a 429. So
a busy chat drops its previews, never its results, and a result that arrives just after a
preview does not wait out that preview's pace.

Waiting is per chat: a chat held by a 429 holds nothing but itself. The global budget is a
token bucket that nobody holds a lock on while sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError, TelegramRetryAfter
from aiogram.methods import TelegramMethod

log = logging.getLogger(__name__)

T = TypeVar("T")

# A 429 whose JSON lacks `parameters.retry_after` reaches us as a plain `TelegramAPIError`;
# its description still says "Too Many Requests: retry after N".
_TOO_MANY = re.compile(r"too many requests", re.I)
_RETRY_AFTER = re.compile(r"retry after (\d+(?:\.\d+)?)", re.I)
# The wait when a 429 names no time at all.
DEFAULT_RETRY_AFTER = 1.0


@dataclass(frozen=True, slots=True)
class FloodPolicy:
    """How fast the bot may talk, and how long it waits out a 429."""

    # Seconds between two messages (sends or edits) in one chat, once its burst is spent.
    chat_interval: float = 1.0
    # Messages one chat may get back to back; Telegram lets short bursts pass.
    chat_burst: int = 3
    # Messages per `group_window` seconds in a group.
    group_limit: int = 20
    group_window: float = 60.0
    # Seconds between any two messages across all chats, once `global_burst` is spent.
    global_interval: float = 1 / 30
    global_burst: int = 10
    # Slots (per chat, per group window and globally) that previews and status edits leave
    # free, so a result never queues behind them.
    reserve: int = 1
    # Retries after a 429, and the longest `retry_after` worth waiting for.
    max_retries: int = 3
    max_retry_after: float = 120.0


class _Bucket:
    """`capacity` messages back to back, then one per `interval` seconds."""

    __slots__ = ("at", "capacity", "interval", "tokens")

    def __init__(self, capacity: int, interval: float) -> None:
        self.capacity = float(max(1, capacity))
        self.interval = interval
        self.tokens = self.capacity
        self.at = time.monotonic()

    def delay(self, now: float, keep: int) -> float:
        """Seconds until one token can be taken with `keep` left behind."""
        self._refill(now)
        if self.interval <= 0:
            return 0.0
        missing = 1 + min(keep, self.capacity - 1) - self.tokens
        return max(0.0, missing * self.interval)

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1

    def drain(self, now: float, seconds: float) -> None:
        """Owe `seconds` worth of tokens: after them, one message, then the usual pace."""
        self._refill(now)
        if self.interval > 0:
            self.tokens = min(self.tokens, 1.0) - seconds / self.interval

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity

    def _refill(self, now: float) -> None:
        if self.interval <= 0:
            self.tokens = self.capacity
        elif now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) / self.interval)
        self.at = max(self.at, now)


@dataclass(slots=True)
class _ChatState:
    bucket: _Bucket
    # No message at all before this (a 429's retry_after).
    held_until: float = 0.0
    recent: deque[float] = field(default_factory=deque)
    # Waiters that must deliver (results, answers); spare waiters give way to them.
    urgent: int = 0
    waiting: int = 0
    # Set and replaced whenever something a waiter depends on changes.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def poke(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Pacer:
    """Hands out message slots per chat (and per group minute, and globally)."""

    # Forget idle chats once this many are tracked, so memory stays bounded.
    _MAX_TRACKED = 5000

    def __init__(self, policy: FloodPolicy) -> None:
        self.policy = policy
        self._chats: dict[int, _ChatState] = {}
        self._global = _Bucket(policy.global_burst, policy.global_interval)

    async def wait(
        self, chat_id: int, *, spare: bool = False, wanted: Callable[[], bool] | None = None
    ) -> bool:
        """Wait for a slot in `chat_id` and take it; False if `wanted()` turned False first.

        A `spare` slot leaves the reserve free and is never taken while a non-spare waiter
        waits in the same chat. `wanted` is checked again whenever `poke` is called.
        """
        state = self._state(chat_id)
        state.waiting += 1
        if not spare:
            state.urgent += 1
        try:
            while True:
                if wanted is not None and not wanted():
                    return False
                now = time.monotonic()
                delay = self._delay(state, chat_id, spare, now)
                if delay <= 0:
                    self._take(state, chat_id, now)
                    return True
                changed = state.changed
                timeout = None if math.isinf(delay) else delay
                try:
                    await asyncio.wait_for(changed.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            state.waiting -= 1
            if not spare:
                state.urgent -= 1
                # Spare waiters held back by this one may go now.
                state.poke()

    def take_spare(self, chat_id: int) -> bool:
        """Take a spare slot in `chat_id` if one is free right now, without waiting."""
        state = self._state(chat_id)
        now = time.monotonic()
        if self._delay(state, chat_id, True, now) > 0:
            return False
        self._take(state, chat_id, now)
        return True

    def defer(self, chat_id: int, seconds: float) -> None:
        """Hold every message to `chat_id` for `seconds` (Telegram said so with a 429)."""
        state = self._state(chat_id)
        now = time.monotonic()
        state.held_until = max(state.held_until, now + seconds)
        state.bucket.drain(now, seconds)
        state.poke()

    def poke(self, chat_id: int) -> None:
        """Make the waiters in `chat_id` check `wanted` again."""
        state = self._chats.get(chat_id)
        if state is not None:
            state.poke()

    def _delay(self, state: _ChatState, chat_id: int, spare: bool, now: float) -> float:
        if spare and state.urgent:
            return math.inf
        keep = self.policy.reserve if spare else 0
        delay = max(state.held_until - now, state.bucket.delay(now, keep))
        if chat_id < 0:
            window = self.policy.group_window
            while state.recent and state.recent[0] <= now - window:
                state.recent.popleft()
            allowed = max(1, self.policy.group_limit - keep)
            if len(state.recent) >= allowed:
                # The oldest message that must leave the window before one more may go.
                delay = max(delay, state.recent[len(state.recent) - allowed] + window - now)
        if delay > 0:
            return delay
        return self._global.delay(now, keep)

    def _take(self, state: _ChatState, chat_id: int, now: float) -> None:
        state.bucket.take(now)
        if chat_id < 0:
            state.recent.append(now)
        self._global.take(now)

    def _state(self, chat_id: int) -> _ChatState:
        state = self._chats.get(chat_id)
        if state is None:
            if len(self._chats) >= self._MAX_TRACKED:
                self._forget_idle()
            bucket = _Bucket(self.policy.chat_burst, self.policy.chat_interval)
            state = self._chats[chat_id] = _ChatState(bucket)
        return state

    def _forget_idle(self) -> None:
        now = time.monotonic()
        horizon = now - self.policy.group_window
        for chat_id, state in list(self._chats.items()):
            if state.waiting or state.held_until > now or not state.bucket.full(now):
                continue
            if not state.recent or state.recent[-1] < horizon:
                del self._chats[chat_id]


class Skipped(Exception):
    """A spare call did not run: no spare slot, no longer wanted, or the chat is in a 429."""


class TelegramSender:
    """Calls Bot API methods paced per chat, retrying a bounded number of times on 429."""

    def __init__(self, bot: Bot, policy: FloodPolicy | None = None) -> None:
        self.bot = bot
        self.policy = policy or FloodPolicy()
        self.pacer = Pacer(self.policy)

    async def call(
        self,
        method: TelegramMethod[T],
        *,
        chat_id: int | None = None,
        paced: bool = True,
        request_timeout: int | None = None,
    ) -> T:
        """Run `method`; pace it in `chat_id` unless `paced` is False (deletes, actions).

        A 429 holds the chat for `retry_after` seconds and the call is tried again, at most
        `max_retries` times; a longer `retry_after` than `max_retry_after` is raised at once.
        Only this chat waits: other chats' calls go on meanwhile.
        """
        attempt = 0
        while True:
            if chat_id is not None and (paced or attempt > 0):
                await self.pacer.wait(chat_id)
            try:
                return await self.bot(method, request_timeout=request_timeout)
            except TelegramAPIError as exc:
                retry_after = _retry_after(exc)
                attempt += 1
                if (
                    retry_after is None
                    or attempt > self.policy.max_retries
                    or retry_after > self.policy.max_retry_after
                ):
                    if retry_after is not None and chat_id is not None:
                        self.pacer.defer(chat_id, retry_after)
                    raise
                log.warning(
                    "telegram: 429 on %s, retrying in %ss (attempt %d)",
                    method.__api_method__,
                    retry_after,
                    attempt,
                )
                if chat_id is not None:
                    self.pacer.defer(chat_id, retry_after)
                else:
                    await asyncio.sleep(retry_after)

    async def call_spare(
        self,
        method: TelegramMethod[T] | Callable[[], TelegramMethod[T]],
        *,
        chat_id: int,
        wait: bool = False,
        wanted: Callable[[], bool] | None = None,
        request_timeout: int | None = None,
    ) -> T:
        """Run `method` once in a spare slot of `chat_id`, for what may be dropped.

        Without `wait`, only a slot free right now will do. With it, waits for one while
        `wanted()` holds; `method` may then be a function building the call from what is
        current once the slot is there. A 429 holds the chat and is not retried. Raises
        `Skipped` when the call did not run.
        """
        if wait:
            if not await self.pacer.wait(chat_id, spare=True, wanted=wanted):
                raise Skipped("no longer wanted")
        elif (wanted is not None and not wanted()) or not self.pacer.take_spare(chat_id):
            raise Skipped("no spare slot")
        built = method if isinstance(method, TelegramMethod) else method()
        try:
            return await self.bot(built, request_timeout=request_timeout)
        except TelegramAPIError as exc:
            retry_after = _retry_after(exc)
            if retry_after is None:
                raise
            self.pacer.defer(chat_id, retry_after)
            log.info(
                "telegram: 429 on %s, dropped; chat held %ss", built.__api_method__, retry_after
            )
            raise Skipped("429") from exc


def _retry_after(exc: TelegramAPIError) -> float | None:
    """Seconds to wait when `exc` is a 429, else None."""
    if isinstance(exc, TelegramRetryAfter):
        return float(exc.retry_after)
    message = exc.message or ""
    if type(exc) is not TelegramAPIError or not _TOO_MANY.search(message):
        # Subclasses are other statuses (400, 403, 5xx, network), never a 429.
        return None
    found = _RETRY_AFTER.search(message)
    return float(found.group(1)) if found else DEFAULT_RETRY_AFTER
