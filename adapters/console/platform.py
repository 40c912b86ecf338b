"""The console as a platform of `drawbridge run`: uvicorn's `Server.serve()` in the bot's loop.

It listens on its own port (`DRAWBRIDGE_CONSOLE_HOST`:`DRAWBRIDGE_CONSOLE_PORT`), never on
nonebot's: the console then works the same with or without QQ, and a QQ restart or a OneBot
flood never takes it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from adapters.console.app import Console
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings
from bot.logs import add_secrets
from bot.services import Services

log = logging.getLogger(__name__)

SERVER_GRACE = 5.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: `drawbridge run` owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen; returns once the console accepts connections."""
        if self._serving is not None:
            return
        host, port = self.settings.console_host, self.settings.console_port
        try:
            sock = _bind(host, port)
        except OSError as exc:
            raise RuntimeError(
                f"the console cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "check DRAWBRIDGE_CONSOLE_HOST and DRAWBRIDGE_CONSOLE_PORT"
            ) from None
        self.address = sock.getsockname()[:2]
        config = uvicorn.Config(
            self.console.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=3,
        )
        self._server = _Server(config)
        self._serving = asyncio.create_task(self._serve(self._server, sock), name="console")
        while not self._server.started:
            if self._serving.done():
                failure = None if self._serving.cancelled() else self._serving.exception()
                await self.stop()
                raise RuntimeError("the console did not start") from failure
            await asyncio.sleep(0.02)
        bound_host, bound_port = self.address
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info("console: http://%s:%d/", shown, bound_port)

    async def notify(self, chat_id: str, text: str) -> None:
        """The console has no chats: nothing is ever announced here."""
        raise LookupError("the console has no chats")

    async def wait_ended(self) -> None:
        """Return if the server stops by itself."""
        if self._serving is not None:
            await asyncio.wait({self._serving})

    async def stop(self) -> None:
        """Close the listener and the connections."""
        self.logs.detach()
        serving, server = self._serving, self._server
        self._serving = self._server = None
        if serving is None or server is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(serving), timeout=SERVER_GRACE)
        except TimeoutError:
            server.force_exit = True
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving
        except Exception:
            log.warning("console: stopped with an error", exc_info=True)

    @staticmethod
    async def _serve(server: _Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:
            raise RuntimeError("uvicorn gave up serving the console") from exc
        finally:
            sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock
