"""The QQ platform inside `drawbridge run`: nonebot's OneBot v11 endpoint in our event loop.

nonebot keeps one global driver per process and `nonebot.init` works once, so the driver is
made on first use (or reused when something else, such as nonebug, made it) and everything
of ours that hangs off it (the matcher, the server) is added in `start` and removed in
`stop`. The FastAPI app is served by uvicorn on a socket we bind ourselves, so a taken port
is an ordinary `OSError` from `start` and uvicorn never calls `sys.exit` or touches signals.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import sys

import nonebot
from nonebot.adapters.onebot.utils import get_auth_bearer
from nonebot.adapters.onebot.v11 import Adapter as OneBotAdapter
from nonebot.adapters.onebot.v11 import Message, MessageSegment
from nonebot.drivers import ASGIMixin, Driver, Request, Response
from nonebot.matcher import Matcher

from adapters.qq import redaction
from adapters.qq.chat import SendPacer
from adapters.qq.handler import QQHandler, build_matcher
from bot.config import Settings, is_loopback_host
from bot.platform import Connection
from bot.services import Services
from bot.serving import AppServer, bind
from bot.startup import listen_error

log = logging.getLogger("drawbridge.qq")

WS_PATH = "/onebot/v11/ws"
PACE_SECONDS = 1.0
"""Least time between two image sends in one chat (QQ risk control)."""
HANDLER_GRACE = 5.0
"""Seconds `stop` lets commands being handled (quoted messages, job checks) finish; jobs have
had their own grace period before `drawbridge run` stops the platforms."""
SERVER_GRACE = 8.0
"""Seconds `stop` waits for uvicorn to close connections and run nonebot's shutdown hooks."""
# nonebot's config loader reads `.env` files and keeps every line of them (keys included) in
# a config it logs; drawbridge's own Settings read `.env`, nonebot gets only what we pass.
_NO_ENV_FILES = (os.devnull,)


class QQPlatform:
    """Serves the OneBot v11 reverse WebSocket at `ws://HOST:PORT/onebot/v11/ws`."""

    name = "qq"

    def __init__(
        self, settings: Settings, services: Services, *, pace_seconds: float = PACE_SECONDS
    ) -> None:
        self.settings = settings
        self.services = services
        self.handler = QQHandler(services, SendPacer(pace_seconds))
        self.address: tuple[str, int] | None = None
        self._matcher: type[Matcher] | None = None
        self._server: AppServer | None = None
        # Before nonebot exists: its first log lines may already carry values from `.env`.
        redaction.install(redaction.secrets_of(settings))

    async def start(self) -> None:
        """Listen for OneBot implementations; returns once the endpoint accepts connections."""
        if self._server is not None:
            return
        # Before anything listens: an open endpoint lets anyone speak as any QQ user.
        refuse_if_exposed(self.settings)
        driver = ensure_driver(self.settings)
        if not isinstance(driver, ASGIMixin):
            raise RuntimeError(f"nonebot runs the {driver.type} driver; QQ needs ~fastapi")
        ensure_adapter(driver, self.settings.onebot_access_token)
        redaction.quiet_frame_dumps()
        try:
            sock = bind(self.settings.host, self.settings.port)
        except OSError as exc:
            raise listen_error(
                "QQ (OneBot endpoint)",
                self.settings.host,
                self.settings.port,
                exc,
                host_name="HOST",
                port_name="PORT",
            ) from None
        self.address = sock.getsockname()[:2]
        # nonebot's startup and shutdown hooks run from the app's lifespan.
        self._server = AppServer(
            driver.server_app, name="the OneBot endpoint", lifespan="on", grace=SERVER_GRACE
        )
        self._matcher = build_matcher(self.handler)
        try:
            await self._server.start(sock)
        except BaseException:
            await self.stop()
            raise
        host, port = self.address
        log.info("qq: OneBot v11 endpoint at ws://%s:%d%s", _url_host(host), port, WS_PATH)

    async def notify(self, chat_id: str, text: str) -> None:
        """Post a message in a group or private chat once a OneBot client is connected."""
        kind, _, number = chat_id.partition(":")
        # Right after start NapCat may not have connected yet: wait for it a little.
        async with asyncio.timeout(60):
            while not nonebot.get_bots():  # noqa: ASYNC110 - nonebot offers no event for it
                await asyncio.sleep(0.5)
        bot = next(iter(nonebot.get_bots().values()))
        # A segment list, never a string: OneBot reads a string as CQ code, and `text` holds
        # the user's prompt, where `[CQ:at,qq=all]` would ping everyone.
        message = Message(MessageSegment.text(text))
        if kind == "group":
            await bot.call_api("send_group_msg", group_id=int(number), message=message)
        else:
            await bot.call_api("send_private_msg", user_id=int(number), message=message)

    def connection(self) -> Connection:
        """Connected while a OneBot implementation (NapCat, LLOneBot) holds its WebSocket.

        The endpoint may be up with nobody connected: QQ users then reach nothing.
        """
        if self._server is None:
            return Connection(False, "OneBot endpoint not serving")
        bots = sorted(nonebot.get_bots())
        if not bots:
            return Connection(False, "no OneBot client connected")
        return Connection(True, "OneBot " + ", ".join(bots) + " connected")

    async def wait_ended(self) -> None:
        """Return if the OneBot endpoint stops serving by itself."""
        if self._server is not None:
            await self._server.wait_ended()

    async def stop(self) -> None:
        """Stop taking commands, let those being handled finish, close the endpoint."""
        if self._matcher is not None:
            self._matcher.destroy()
            self._matcher = None
        await self.handler.drain(HANDLER_GRACE)
        server, self._server = self._server, None
        if server is not None:
            await server.stop()


def ensure_driver(settings: Settings) -> Driver:
    """nonebot's driver, initialised from our settings if this process has none yet."""
    try:
        driver = nonebot.get_driver()
    except ValueError:
        # Before init, which logs: its lines then come out through `bot.logs` in our format,
        # not through nonebot's own stdout sink in its own.
        quiet_nonebot_banner()
        redaction.forward_to_stdlib()
        nonebot.init(
            _env_file=_NO_ENV_FILES,
            driver="~fastapi",
            # nonebot validates HOST as an IP; we bind the socket ourselves, so a host name
            # only needs a placeholder here.
            host=settings.host if _is_ip(settings.host) else "127.0.0.1",
            port=settings.port,
            log_level=settings.log_level.upper(),
        )
        driver = nonebot.get_driver()
        # nonebot.init installed its own patcher over ours.
        redaction.install()
    return driver


class NonebotBannerFilter(logging.Filter):
    """Drops nonebot's "Current Env: prod" line.

    It names nonebot's `.env.{environment}` file set, which drawbridge never reads (nonebot
    gets only what we pass it): to an operator it reads as a setting of ours they never made.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.getMessage().startswith("Current Env:"))


def quiet_nonebot_banner() -> None:
    """Install `NonebotBannerFilter` on the logger nonebot's lines are forwarded to (once)."""
    # nonebot's log patcher names every core record "nonebot" (plugins by their id).
    target = logging.getLogger("nonebot")
    if not any(isinstance(f, NonebotBannerFilter) for f in target.filters):
        target.addFilter(NonebotBannerFilter())


class OneBotEndpoint(OneBotAdapter):
    """nonebot's OneBot v11 adapter, with the access token required on every route and
    compared in constant time.

    nonebot's own check compares with `!=`, whose time tells a remote guesser how many
    leading characters were right, and guards the WebSocket routes only. The forms accepted
    stay nonebot's: an `Authorization` header with the `Bearer` or `Token` scheme (this
    adapter version reads no query string).
    """

    def _check_access_token(self, request: Request) -> Response | None:
        expected = self.onebot_config.onebot_access_token
        if not expected:
            return None
        token = get_auth_bearer(request.headers.get("authorization"))
        if token is not None and hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
        ):
            return None
        reason = "Authorization Header is invalid" if token else "Missing Authorization Header"
        log.warning("qq: refused a OneBot connection: %s", reason)
        return Response(403, content=reason)

    def _check_signature(self, request: Request) -> Response | None:
        # The one check nonebot's HTTP POST route makes, looked up on the instance, so the
        # access token goes here too: without it, an event posted under a connected bot's
        # X-Self-ID is handled as if that implementation sent it (a forged admin `/grant`).
        refused = self._check_access_token(request)
        if refused is not None:
            return refused
        # nonebot's own compares the HMAC with `!=`; same answers, in constant time.
        secret = self.onebot_config.onebot_secret
        if not secret:
            return None
        signature = request.headers.get("x-signature")
        if not signature:
            return Response(401, content="Missing Signature", request=request)
        if request.content is None:
            return Response(400, content="Missing Content", request=request)
        body = request.content
        body = body if isinstance(body, bytes) else str(body).encode("utf-8")
        expected = "sha1=" + hmac.new(secret.encode("utf-8"), body, "sha1").hexdigest()
        if not hmac.compare_digest(
            signature.encode("utf-8", "surrogateescape"), expected.encode("ascii")
        ):
            log.warning("qq: refused a OneBot HTTP event: bad signature")
            return Response(403, content="Signature is invalid")
        return None


def ensure_adapter(driver: Driver, access_token: str) -> OneBotAdapter:
    """The OneBot v11 adapter, registered once, checking `access_token` on connections."""
    try:
        adapter = nonebot.get_adapter(OneBotAdapter)
    except ValueError:
        driver.register_adapter(OneBotEndpoint)
        adapter = nonebot.get_adapter(OneBotAdapter)
    if not isinstance(adapter, OneBotEndpoint):
        # Registered by someone else first (a test harness): the token check is ours anyway.
        adapter.__class__ = OneBotEndpoint
    # Set here rather than through nonebot.init, whose config is logged in full.
    adapter.onebot_config = adapter.onebot_config.model_copy(
        update={"onebot_access_token": access_token or None}
    )
    return adapter


def exposure_message(settings: Settings) -> str:
    """The one line `drawbridge run` prints when it refuses an open OneBot endpoint."""
    return (
        f"error: refusing to serve QQ on HOST={settings.host} without ONEBOT_ACCESS_TOKEN: "
        f"anyone who reaches port {settings.port} could act as any QQ user, admins included. "
        "Set ONEBOT_ACCESS_TOKEN (the same token in NapCat/LLOneBot) or HOST=127.0.0.1; "
        "QQ_ALLOW_NO_TOKEN=true starts anyway (only behind a firewall)."
    )


def refuse_if_exposed(settings: Settings) -> None:
    """Exit with code 2 when anyone beyond this machine could connect without a token.

    Loopback (127.0.0.0/8, ::1, localhost) or a token is safe. `QQ_ALLOW_NO_TOKEN=true`
    (a firewall or an authenticating proxy in front) turns the refusal into a loud warning.
    A `SystemExit` rather than an exception: this is the operator's setting to fix, and a
    traceback would only hide the one line that says how.
    """
    if settings.onebot_access_token or is_loopback_host(settings.host):
        return
    if not settings.qq_allow_no_token:
        print(exposure_message(settings), file=sys.stderr, flush=True)
        raise SystemExit(2)
    log.warning(
        "!!! qq: the OneBot endpoint listens on %s without ONEBOT_ACCESS_TOKEN "
        "(QQ_ALLOW_NO_TOKEN=true): anyone who can reach port %d can act as any QQ user. "
        "Set ONEBOT_ACCESS_TOKEN (and the same token in NapCat/LLOneBot) or HOST=127.0.0.1. !!!",
        settings.host,
        settings.port,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
