"""The port each chat platform implements so `drawbridge run` can start and stop it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Connection:
    """Whether a platform is connected to its chat service now, as `/healthz` reports it.

    `detail` is a few words for an operator ("OneBot 10001 connected", "getUpdates failing:
    TelegramNetworkError"), never a secret.
    """

    connected: bool
    detail: str = ""


class Platform(Protocol):
    """A connected chat platform inside `drawbridge run`'s event loop."""

    name: str

    async def start(self) -> None:
        """Connect and begin serving; return once ready to receive commands (or raise)."""
        ...

    async def stop(self) -> None:
        """Stop taking commands and close connections; safe to call twice."""
        ...

    async def notify(self, chat_id: str, text: str) -> None:
        """Post `text` in a chat on the bot's own initiative (a job a restart interrupted).

        `chat_id` is the `Invocation.chat_id` the adapter gave; raises if it cannot send.
        """
        ...

    async def wait_ended(self) -> None:
        """Return if the platform's connection ends by itself after `start` (never while it
        is healthy), so `drawbridge run` can stop and let a supervisor restart it."""
        ...

    def connection(self) -> Connection:
        """Whether commands can reach the bot through this platform right now.

        Cheap and synchronous: `/healthz` asks every platform on each probe. A platform that
        reconnects by itself (a OneBot client gone, polling failing) reports False meanwhile.
        """
        ...
