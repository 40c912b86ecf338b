"""`drawbridge check`: the effective settings, secrets masked, and a free reachability table.

Nothing here spends anything or changes anything: Telegram's `getMe`, Discord's
`GET /users/@me`, a bind-and-close of the OneBot `HOST:PORT`, and each provider's
`GET /v1/models` (`bot.probe`). Each goes through its own proxy setting (`TELEGRAM_PROXY`,
`DISCORD_PROXY`, `DRAWBRIDGE_UPSTREAM_PROXY`) and honours `TELEGRAM_API_SERVER` and
`DISCORD_API_BASE`, as `drawbridge run` would.

The chat platforms are asked over plain HTTPS with httpx: `bot/` imports no chat library.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from bot import probe
from bot.config import ProviderConfig, Settings, env_name, is_loopback_host
from bot.proxies import proxy_from_setting
from bot.secrets import mask_key
from bot.upstream import USER_AGENT
from bot.upstream.transport import upstream_http

TELEGRAM_API: Final = "https://api.telegram.org"
DISCORD_API: Final = "https://discord.com/api/v10"
DEFAULT_DEADLINE: Final = 10.0

# Settings shown masked (keys, tokens, passphrases).
_SECRETS: Final = frozenset(
    {
        "api_key",
        "secret_key",
        "telegram_bot_token",
        "telegram_webhook_secret",
        "onebot_access_token",
        "discord_bot_token",
        "console_password",
        "metrics_token",
    }
)
_PROXIES: Final = frozenset({"upstream_proxy", "telegram_proxy", "discord_proxy"})
_URLS: Final = frozenset(
    {"api_base", "telegram_api_server", "telegram_webhook_url", "discord_api_base", "database_url"}
)

OK: Final = "ok"
FAIL: Final = "FAIL"


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the reachability table."""

    check: str
    target: str
    result: str
    note: str = ""

    @property
    def ok(self) -> bool:
        """This check passed."""
        return self.result == OK


def _without_userinfo(url: str) -> str:
    """A URL without `user:password@` (a relay URL may carry basic-auth credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _shown(field: str, value: Any) -> str:
    if field in _SECRETS:
        return mask_key(str(value)) if value else "(not set)"
    if field in _PROXIES:
        proxy = proxy_from_setting(str(value))
        return proxy.address if proxy is not None else "(none)"
    if field in _URLS:
        return _without_userinfo(str(value)) if value else "(default)"
    if isinstance(value, Path):
        return str(value)
    return str(value) if value != "" else "(empty)"


def configuration_lines(settings: Settings) -> list[str]:
    """Every setting by its environment name, then the providers built from them, masked."""
    lines = []
    for field in Settings.model_fields:
        if field == "providers_json":
            continue  # shown below as the providers it makes
        lines.append(f"{env_name(field)} = {_shown(field, getattr(settings, field))}")
    providers = settings.providers()
    if not providers:
        lines.append("providers: none (set DRAWBRIDGE_API_BASE or DRAWBRIDGE_PROVIDERS)")
    for index, provider in enumerate(providers):
        source = f"DRAWBRIDGE_PROVIDERS[{index}]" if settings.providers_json else "single"
        key = mask_key(provider.api_key) if provider.api_key else "(none: users bind their own)"
        lines.append(
            f"provider {provider.name} ({source}): {_without_userinfo(provider.api_base)} "
            f"key {key} model {provider.model}"
        )
    return lines


def _failure(exc: BaseException, deadline: float) -> str:
    # The type only: an exception's text may quote a URL, and Telegram's URLs hold the token.
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"no answer within {deadline:g}s"
    return f"cannot connect ({type(exc).__name__})"


def _hint(*names: str) -> str:
    return "check the network and " + ", ".join(names)


async def check_telegram(settings: Settings, *, deadline: float = DEFAULT_DEADLINE) -> Row:
    """`getMe` with `TELEGRAM_BOT_TOKEN`, through `TELEGRAM_PROXY`, at `TELEGRAM_API_SERVER`."""
    base = (settings.telegram_api_server or TELEGRAM_API).rstrip("/")
    target = _without_userinfo(base)
    names = ["TELEGRAM_PROXY"] + (["TELEGRAM_API_SERVER"] if settings.telegram_api_server else [])
    url = f"{base}/bot{settings.telegram_bot_token}/getMe"
    try:
        status, body = await _get(url, {}, settings.telegram_proxy, deadline)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return Row("telegram", target, FAIL, f"{_failure(exc, deadline)}: {_hint(*names)}")
    if status == 401:
        return Row("telegram", target, FAIL, "401: TELEGRAM_BOT_TOKEN was refused")
    result = body.get("result") if isinstance(body, dict) else None
    if status == 200 and isinstance(result, dict) and body.get("ok") is True:
        return Row("telegram", target, OK, f"@{result.get('username', '?')}")
    return Row("telegram", target, FAIL, f"getMe answered HTTP {status}: {_hint(*names)}")


async def check_discord(settings: Settings, *, deadline: float = DEFAULT_DEADLINE) -> Row:
    """`GET /users/@me` with `DISCORD_BOT_TOKEN`, through `DISCORD_PROXY`, at
    `DISCORD_API_BASE`."""
    base = (settings.discord_api_base or DISCORD_API).rstrip("/")
    target = _without_userinfo(base)
    names = ["DISCORD_PROXY"] + (["DISCORD_API_BASE"] if settings.discord_api_base else [])
    headers = {"Authorization": f"Bot {settings.discord_bot_token}"}
    try:
        status, body = await _get(f"{base}/users/@me", headers, settings.discord_proxy, deadline)
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        return Row("discord", target, FAIL, f"{_failure(exc, deadline)}: {_hint(*names)}")
    if status == 401:
        return Row("discord", target, FAIL, "401: DISCORD_BOT_TOKEN was refused")
    if status == 200 and isinstance(body, dict) and "id" in body:
        return Row("discord", target, OK, str(body.get("username", "")))
    return Row("discord", target, FAIL, f"/users/@me answered HTTP {status}: {_hint(*names)}")


async def _get(url: str, headers: dict[str, str], proxy: str, deadline: float) -> tuple[int, Any]:
    """One GET through `proxy` (empty: none); the status and the JSON body (None if not JSON)."""
    async with (
        asyncio.timeout(deadline),
        # No proxy from the environment: aiogram and discord.py (aiohttp) read none either.
        httpx.AsyncClient(proxy=proxy or None, timeout=deadline, trust_env=False) as http,
    ):
        response = await http.get(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


def check_onebot_bind(settings: Settings) -> Row:
    """Whether the OneBot endpoint's `HOST:PORT` can be bound right now (bound, then closed).

    Also the rule `drawbridge run` enforces before binding: a `HOST` beyond this machine
    needs `ONEBOT_ACCESS_TOKEN` (or `QQ_ALLOW_NO_TOKEN=true`), else anyone could act as any
    QQ user.
    """
    host, port = settings.host, settings.port
    target = f"{host}:{port}"
    exposed = not (settings.onebot_access_token or is_loopback_host(host))
    if exposed and not settings.qq_allow_no_token:
        return Row(
            "qq (OneBot)",
            target,
            FAIL,
            "run refuses a non-loopback HOST without ONEBOT_ACCESS_TOKEN "
            "(or QQ_ALLOW_NO_TOKEN=true behind a firewall)",
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As the QQ platform binds it, so a port in TIME_WAIT counts as free here too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return Row("qq (OneBot)", target, FAIL, f"cannot bind ({reason}): check PORT and HOST")
    return Row("qq (OneBot)", target, OK, "free to bind")


async def check_provider(
    http: httpx.AsyncClient, provider: ProviderConfig, *, deadline: float = DEFAULT_DEADLINE
) -> Row:
    """`GET /v1/models` with the provider's key (free); without a key only reachability."""
    check = f"provider {provider.name}"
    target = _without_userinfo(provider.api_base)
    found = await probe.probe_models(http, provider, deadline=deadline)
    hint = "check the network and DRAWBRIDGE_UPSTREAM_PROXY"
    if found.outcome == probe.UNREACHABLE:
        return Row(check, target, FAIL, f"{found.detail}: {hint}")
    if not provider.api_key:
        # Users bring their own keys (/token): that the API answers is all there is to know.
        return Row(check, target, OK, "reachable; no shared key, users bind their own")
    if found.outcome == probe.INVALID_KEY:
        return Row(check, target, FAIL, f"key refused ({found.detail or found.status})")
    if found.outcome != probe.OK:
        return Row(check, target, FAIL, f"not a model list ({found.detail})")
    if found.has_model is False:
        return Row(check, target, FAIL, f"{provider.model} is not in the key's model list")
    return Row(check, target, OK, f"key accepted, {provider.model} listed")


async def check_database(settings: Settings, *, deadline: float = DEFAULT_DEADLINE) -> Row:
    """DRAWBRIDGE_DATABASE_URL's PostgreSQL answers, and its schema is one this version runs
    (read only: nothing is migrated or written)."""
    from bot.store.migrations import POSTGRES_MIGRATIONS
    from bot.store.postgres import PostgresEngine

    url = settings.database_url
    target = _without_userinfo(url)
    try:
        async with asyncio.timeout(deadline):
            engine = await PostgresEngine.open(url, migrate=False, min_size=1, max_size=1)
            try:
                version = await engine.schema_version()
            finally:
                await engine.close()
    except TimeoutError:
        return Row(
            "database", target, FAIL, f"no answer in {deadline:.0f}s: check DRAWBRIDGE_DATABASE_URL"
        )
    except Exception as exc:
        return Row("database", target, FAIL, f"{type(exc).__name__}: check DRAWBRIDGE_DATABASE_URL")
    latest = len(POSTGRES_MIGRATIONS)
    if version > latest:
        return Row(
            "database", target, FAIL, f"schema {version} is newer than this drawbridge ({latest})"
        )
    if version < latest:
        return Row(
            "database",
            target,
            OK,
            f"schema {version}: run (or db upgrade) applies {latest - version} migration(s)",
        )
    return Row("database", target, OK, f"schema {version}, up to date")


async def reachability(settings: Settings, *, deadline: float = DEFAULT_DEADLINE) -> list[Row]:
    """Every check for what the settings configure, run at once; rows in a fixed order."""
    rows: list[Row] = []
    if not settings.chat_platforms():
        rows.append(
            Row(
                "platforms",
                "-",
                FAIL,
                "none configured: set TELEGRAM_BOT_TOKEN, QQ_ENABLED=true or DISCORD_BOT_TOKEN",
            )
        )
    if settings.qq_enabled:
        rows.append(check_onebot_bind(settings))
    async with upstream_http(settings.upstream_proxy) as http:
        waits: list[Any] = []
        if settings.telegram_bot_token:
            waits.append(check_telegram(settings, deadline=deadline))
        if settings.discord_bot_token:
            waits.append(check_discord(settings, deadline=deadline))
        waits += [check_provider(http, p, deadline=deadline) for p in settings.providers()]
        if settings.database_url.startswith(("postgresql://", "postgres://")):
            waits.append(check_database(settings, deadline=deadline))
        rows += await asyncio.gather(*waits)
    return rows


def render(rows: list[Row]) -> str:
    """The table as plain text, then a one-line verdict."""
    header = Row("check", "target", "result", "note")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("check", "target")]
    widths.append(max(len(r.result) for r in [header, *rows]))

    def fmt(row: Row) -> str:
        cells = (row.check, row.target, row.result)
        head = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        return f"{head}  {row.note}".rstrip()

    rule = Row("-" * widths[0], "-" * widths[1], "-" * widths[2], "----")
    lines = [fmt(header), fmt(rule), *(fmt(r) for r in rows)]
    failed = sum(not r.ok for r in rows)
    lines += ["", "all reachable" if not failed else f"{failed} check(s) failed"]
    return "\n".join(lines)


async def run_check(
    settings: Settings, *, out: TextIO | None = None, deadline: float = DEFAULT_DEADLINE
) -> int:
    """`drawbridge check`: 0 when every check passed, else 1 (bad settings never get here)."""
    stream = out or sys.stdout
    print("Effective configuration (secrets masked):", file=stream)
    for line in configuration_lines(settings):
        print(f"  {line}", file=stream)
    print(file=stream)
    rows = await reachability(settings, deadline=deadline)
    print(render(rows), file=stream)
    return 0 if rows and all(r.ok for r in rows) else 1
