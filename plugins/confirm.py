"""Asking before a costly job: requests waiting for a confirmation, and `/confirm` (`/确认`).

A request priced above `DRAWBRIDGE_CONFIRM_ABOVE` credits is held here, in memory, for
`CONFIRM_SECONDS`; nothing is reserved or downloaded meanwhile. Telegram and Discord show a
button (it runs `confirm` with the request's token as text); QQ asks for a reply `/确认`, which
confirms the caller's newest request in that chat. Only the person who asked can confirm.
A restart forgets the requests: a late press is told there is nothing to confirm.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from bot.chat import ConfirmPrompt, Invocation
from bot.jobs import JobRunner, JobSpec, Quote
from plugins.context import Context

CONFIRM_SECONDS = 60.0
"""How long a request waits for its confirmation."""
MAX_PENDING = 1000
"""Requests held at most (the oldest go first): memory stays bounded whatever users do."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A request waiting for its confirmation."""

    token: int
    inv: Invocation
    spec: JobSpec
    extra: tuple[bytes, ...]
    expires: float

    def belongs_to(self, inv: Invocation) -> bool:
        """Whether `inv` comes from the person who asked, in the chat they asked in."""
        return (self.inv.platform, self.inv.user_id, self.inv.chat_id) == (
            inv.platform,
            inv.user_id,
            inv.chat_id,
        )


class Confirmations:
    """The requests waiting for a confirmation, per user and chat, expiring on their own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[int, Pending] = {}

    def add(self, inv: Invocation, spec: JobSpec, extra: tuple[bytes, ...] = ()) -> Pending:
        """Hold a request; its token goes into the confirm button."""
        self._prune()
        # Random, not counted: a button left from before a restart must not match a new one.
        token = secrets.randbelow(10**9) + 1
        while token in self._items:
            token = secrets.randbelow(10**9) + 1
        pending = Pending(token, inv, spec, extra, self._clock() + CONFIRM_SECONDS)
        self._items[token] = pending
        while len(self._items) > MAX_PENDING:
            del self._items[next(iter(self._items))]
        return pending

    def get(self, token: int) -> Pending | None:
        """The request with this token, unless it expired."""
        self._prune()
        return self._items.get(token)

    def newest(self, inv: Invocation) -> Pending | None:
        """The newest request of the caller of `inv` in its chat, unless expired."""
        self._prune()
        mine = [p for p in self._items.values() if p.belongs_to(inv)]
        return mine[-1] if mine else None

    def take(self, pending: Pending) -> bool:
        """Remove a request being confirmed; False when it was taken already (a double press)."""
        return self._items.pop(pending.token, None) is not None

    def _prune(self) -> None:
        now = self._clock()
        for token in [t for t, p in self._items.items() if p.expires <= now]:
            del self._items[token]


_BOOKS: WeakKeyDictionary[JobRunner, Confirmations] = WeakKeyDictionary()


def confirmations(jobs: JobRunner) -> Confirmations:
    """The requests waiting for a confirmation in this process (one book per job runner)."""
    book = _BOOKS.get(jobs)
    if book is None:
        book = _BOOKS[jobs] = Confirmations()
    return book


def needs_confirmation(ctx: Context, quote: Quote) -> bool:
    """Whether a job at this price waits for a confirmation.

    A job the user cannot afford is not held: it is refused at once, as without the setting.
    """
    if quote.left is None or quote.left < 0:
        return False
    return quote.cost > ctx.services.settings.confirm_above


async def ask(ctx: Context, spec: JobSpec, quote: Quote, extra: tuple[bytes, ...] = ()) -> None:
    """Hold the request and ask the caller to confirm it: a button where there are buttons."""
    pending = confirmations(ctx.services.jobs).add(ctx.inv, spec, extra)
    params: dict[str, Any] = {
        "price": quote.render(ctx.lang),
        "limit": ctx.services.settings.confirm_above,
        "seconds": int(CONFIRM_SECONDS),
    }
    chat = ctx.chat
    if isinstance(chat, ConfirmPrompt) and chat.limits.has_buttons:
        await chat.send_confirm(
            ctx.t("confirm.ask_button", **params),
            token=pending.token,
            label=ctx.t("confirm.button"),
        )
        return
    await ctx.reply("confirm.ask_reply", **params)


async def confirm(ctx: Context) -> None:
    """`/confirm` (`/确认`), or a confirm button: start the request that waited for it."""
    book = confirmations(ctx.services.jobs)
    word = ctx.inv.text.strip()
    seconds = int(CONFIRM_SECONDS)
    if word.isdigit():
        pending = book.get(int(word))
        if pending is not None and not pending.belongs_to(ctx.inv):
            await ctx.reply("confirm.not_yours", ephemeral=True)
            return
    else:
        pending = book.newest(ctx.inv)
    if pending is None or not book.take(pending):
        await ctx.reply("confirm.nothing", ephemeral=True, seconds=seconds)
        return
    # The job is checked, charged and reported as if it had just been asked for, from here.
    await ctx.services.jobs.submit(
        inv=pending.inv,
        user=ctx.user,
        chat=ctx.chat,
        spec=pending.spec,
        lang=ctx.lang,
        extra_references=pending.extra,
    )
