"""Calls that many tasks make at the same moment, answered together (see `Batcher`).

A burst of commands (issue 15: 500 at the same instant) asks the store the same few things
for each command. Asked one by one, the last command waits for every trip before its own;
asked together, a burst costs a handful. Used for the intake's reads
(`bot.batched_reads`), the provider slots a burst's jobs take, and its reservations
(`Store.reserve`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from functools import partial
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_BATCH = 256
"""Keys asked in one statement at most."""


class Batcher(Generic[K, V]):
    """Calls queued while a batch is answered go in the next; each distinct key asked once.

    A value `fetch` gives as an exception is raised to that key's callers alone.
    """

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, V | Exception]]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._queue: list[tuple[K, asyncio.Future[V | None]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        """The value for `key` (None when the store has none)."""
        return await self.ask(key)

    def ask(self, key: K) -> asyncio.Future[V | None]:
        """`get`, asked now and answered by the future (no task: a burst's commands ask
        several things at once for the price of one step). A caller that gives up on the
        answer cancels the future."""
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(), name="batched-reads")
        return future

    async def drained(self) -> None:
        """Wait until every call asked so far is answered."""
        while self._draining is not None:
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        try:
            while self._queue:
                size = self._max_batch
                batch, self._queue = self._queue[:size], self._queue[size:]
                try:
                    found = await self._fetch(list(dict.fromkeys(key for key, _ in batch)))
                except Exception as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                except BaseException:
                    for _, future in [*batch, *self._queue]:
                        future.cancel()
                    self._queue = []
                    raise
                for key, future in batch:
                    if not future.done():
                        value = found.get(key)
                        if isinstance(value, Exception):
                            future.set_exception(value)
                        else:
                            future.set_result(value)
        finally:
            self._draining = None


class InFlight(Generic[K, V]):
    """One call per key at a time: whoever asks for a key while its call runs shares it.

    For what many commands need at the same moment and one call answers for all (a burst's
    first wave reading a relay's capabilities, a new user's later commands waiting for the
    write that makes the user).
    """

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """`call()`'s answer, from the call already running for `key` if there is one."""
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(call())
            running.add_done_callback(partial(self._done, key))
        # Shielded: one caller giving up does not cancel the call the others wait for.
        return await asyncio.shield(running)

    def _done(self, key: K, done: asyncio.Future[V]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # its callers may all be gone: retrieved here
