"""An ASGI app served by uvicorn's `Server.serve()` inside drawbridge's own event loop.

The QQ endpoint (nonebot's FastAPI app) and the operator console are served this way:
- on a socket bound here (`bind`), so a taken port is an ordinary `OSError` before anything
  starts, which the platform turns into a `bot.startup.listen_error` line; uvicorn itself never
  gets to call `sys.exit`;
- without uvicorn's signal handlers: `drawbridge run` owns SIGINT and SIGTERM and the order of
  the shutdown;
- stopped within a grace period, then forced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for `host:port` (IPv6 when the host has a colon); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


class AppServer:
    """One ASGI app on one bound socket, as a task of the running loop.

    `name` says what is served in log lines and errors ("the OneBot endpoint"); `lifespan` is
    uvicorn's ("on" runs the app's startup and shutdown hooks, as nonebot needs); `grace` is how
    long `stop` waits for connections to close before it forces them.
    """

    def __init__(
        self,
        app: Any,
        *,
        name: str,
        lifespan: Literal["auto", "on", "off"] = "off",
        grace: float = 5.0,
    ) -> None:
        self.name = name
        self.grace = grace
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan=lifespan,
            timeout_graceful_shutdown=max(1, int(grace) - 2),
        )
        self._server = _Server(config)
        self._serving: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`; returns once connections are accepted (raises if it died first)."""
        self._serving = asyncio.create_task(self._serve(sock), name=self.name)
        while not self._server.started:
            if self._serving.done():
                failure = None if self._serving.cancelled() else self._serving.exception()
                await self.stop()
                raise RuntimeError(f"{self.name} did not start") from failure
            await asyncio.sleep(0.02)

    async def wait_ended(self) -> None:
        """Return when serving ends (by itself, or after `stop`)."""
        if self._serving is not None:
            await asyncio.wait({self._serving})

    async def stop(self) -> None:
        """Close the listener and the connections: gracefully within `grace`, then forced."""
        serving, self._serving = self._serving, None
        if serving is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(serving), timeout=self.grace)
        except TimeoutError:
            self._server.force_exit = True
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving
        except Exception:
            log.warning("%s stopped with an error", self.name, exc_info=True)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._server.serve(sockets=[sock])
        except SystemExit as exc:
            # uvicorn exits the process when the app's startup fails; a task must not.
            raise RuntimeError(f"uvicorn gave up serving {self.name}") from exc
        finally:
            sock.close()
