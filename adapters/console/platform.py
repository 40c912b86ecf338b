"""The console as a platform of `drawbridge run`: uvicorn's `Server.serve()` in the bot's loop.

It listens on its own port (`DRAWBRIDGE_CONSOLE_HOST`:`DRAWBRIDGE_CONSOLE_PORT`), never on
nonebot's: the console then works the same with or without QQ, and a QQ restart or a OneBot
flood never takes it down.
"""

from __future__ import annotations

import logging

from adapters.console.app import Console
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings
from bot.logs import add_secrets
from bot.platform import Connection
from bot.services import Services
from bot.serving import AppServer, bind
from bot.startup import listen_error

log = logging.getLogger(__name__)

SERVER_GRACE = 5.0
"""Seconds `stop` waits for open connections (an htmx poll, a CSV download) to close."""


class ConsolePlatform:
    """Serves the console pages, /metrics and /healthz."""

    name = "console"

    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        # bot.logs.settings_secrets predates these two: redact them in every log line too.
        add_secrets([settings.console_password, settings.metrics_token], configured=True)
        self.logs = LogBuffer()
        # Collecting from now on: the log page shows the start-up lines too.
        self.logs.attach()
        self.console = Console(settings, services, self.logs)
        self.address: tuple[str, int] | None = None
        self._server: AppServer | None = None

    async def start(self) -> None:
        """Listen; returns once the console accepts connections."""
        if self._server is not None:
            return
        host, port = self.settings.console_host, self.settings.console_port
        try:
            sock = bind(host, port)
        except OSError as exc:
            raise listen_error(
                "the console",
                host,
                port,
                exc,
                host_name="DRAWBRIDGE_CONSOLE_HOST",
                port_name="DRAWBRIDGE_CONSOLE_PORT",
            ) from None
        self.address = sock.getsockname()[:2]
        self._server = AppServer(self.console.app, name="the console", grace=SERVER_GRACE)
        try:
            await self._server.start(sock)
        except BaseException:
            await self.stop()
            raise
        bound_host, bound_port = self.address
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info("console: http://%s:%d/", shown, bound_port)

    async def notify(self, chat_id: str, text: str) -> None:
        """The console has no chats: nothing is ever announced here."""
        raise LookupError("the console has no chats")

    def connection(self) -> Connection:
        """The console is up while it serves (it is what answers /healthz)."""
        return Connection(self._server is not None, "serving" if self._server else "stopped")

    async def wait_ended(self) -> None:
        """Return if the server stops by itself."""
        if self._server is not None:
            await self._server.wait_ended()

    async def stop(self) -> None:
        """Close the listener and the connections."""
        self.logs.detach()
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
