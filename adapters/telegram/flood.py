"""Telegram flood control: pace sends per chat and retry after a 429's `retry_after`.

Telegram allows about one message a second per chat, 20 a minute in a group and 30 a second
overall; beyond that it answers 429 with `retry_after`, which aiogram raises as
`TelegramRetryAfter` without retrying. Every send, edit and delete goes through
`TelegramSender.call`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
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

    # Seconds between two messages (sends or edits) in one chat.
    chat_interval: float = 1.0
    # Messages per `group_window` seconds in a group.
    group_limit: int = 20
    group_window: float = 60.0
    # Seconds between any two messages, across all chats.
    global_interval: float = 1 / 30
    # Retries after a 429, and the longest `retry_after` worth waiting for.
    max_retries: int = 3
    max_retry_after: float = 120.0


@dataclass(slots=True)
class _ChatState:
    next_at: float = 0.0
    recent: deque[float] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Pacer:
    """Spaces messages per chat (and per group minute) so Telegram rarely answers 429."""

    # Forget idle chats once this many are tracked, so memory stays bounded.
    _MAX_TRACKED = 5000

    def __init__(self, policy: FloodPolicy) -> None:
        self.policy = policy
        self._chats: dict[int, _ChatState] = {}
        self._global_next = 0.0
        self._global_lock = asyncio.Lock()

    async def wait(self, chat_id: int) -> None:
        """Return when one more message may go to `chat_id`, and count it."""
        state = self._state(chat_id)
        group = chat_id < 0
        async with state.lock:
            while True:
                now = time.monotonic()
                delay = state.next_at - now
                if group:
                    while state.recent and state.recent[0] <= now - self.policy.group_window:
                        state.recent.popleft()
                    if len(state.recent) >= self.policy.group_limit:
                        delay = max(delay, state.recent[0] + self.policy.group_window - now)
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            now = time.monotonic()
            state.next_at = now + self.policy.chat_interval
            if group:
                state.recent.append(now)
        async with self._global_lock:
            delay = self._global_next - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._global_next = time.monotonic() + self.policy.global_interval

    def defer(self, chat_id: int, seconds: float) -> None:
        """Hold every message to `chat_id` for `seconds` (Telegram said so with a 429)."""
        state = self._state(chat_id)
        state.next_at = max(state.next_at, time.monotonic() + seconds)

    def _state(self, chat_id: int) -> _ChatState:
        state = self._chats.get(chat_id)
        if state is None:
            if len(self._chats) >= self._MAX_TRACKED:
                self._forget_idle()
            state = self._chats[chat_id] = _ChatState()
        return state

    def _forget_idle(self) -> None:
        horizon = time.monotonic() - self.policy.group_window
        for chat_id, state in list(self._chats.items()):
            if state.next_at < horizon and not state.lock.locked():
                if not state.recent or state.recent[-1] < horizon:
                    del self._chats[chat_id]


class TelegramSender:
    """Calls Bot API methods paced per chat, retrying a bounded number of times on 429."""

    def __init__(self, bot: Bot, policy: FloodPolicy | None = None) -> None:
        self.bot = bot
        self.policy = policy or FloodPolicy()
        self.pacer = Pacer(self.policy)

    async def pace(self, chat_id: int) -> None:
        """Wait for this chat's next message slot (for callers that pace themselves)."""
        await self.pacer.wait(chat_id)

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
