"""Settings from the environment and `.env`, and the upstream providers they describe.

Every setting is listed, with a comment, in `.env.example`. Names are a contract with
operators and outside checks: add new ones, never rename.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from bot.groups import parse_groups
from bot.proxies import proxy_setting

MB = 1024 * 1024


API_BASE_FORM: Final = "must be an http:// or https:// URL such as https://api.example.com/v1"
PROVIDERS_FORM: Final = (
    'a JSON list of objects such as [{"name": "a", "api_base": "https://api.example.com", '
    '"api_key": "sk-..."}] (see .env.example)'
)
PRICES_FORM: Final = (
    "a JSON object of size tier -> quality -> credits (a whole number, 0 or more), such as "
    '{"1k": {"low": 1, "high": 2}, "4k": {"default": 4}}; tiers 1k, 2k, 4k or default, '
    "qualities low, medium, high, auto or default"
)
UPSTREAM_PRICES_FORM: Final = (
    "a JSON object of provider name -> size tier -> quality -> what one image costs you "
    '(a number, 0 or more), such as {"default": {"1k": {"low": 0.006, "high": 0.211}, '
    '"default": {"default": 0.1}}}; tiers 1k, 2k, 4k or default, qualities low, medium, '
    "high, auto or default"
)
ADMINS_FORM: Final = (
    "comma-separated platform:user_id pairs such as telegram:123456789,qq:12345678 "
    "(platforms: telegram, qq, discord)"
)
_PLATFORM_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
PRICE_TIERS: Final = ("1k", "2k", "4k", "default")
PRICE_QUALITIES: Final = ("low", "medium", "high", "auto", "default")
LOG_LEVELS: Final = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
CONSOLE_MIN_PASSWORD: Final = 12
DATABASE_URL_SCHEMES: Final = ("postgresql://", "postgres://", "sqlite:///")


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an address) only listens on this machine.

    127.0.0.0/8, ::1 (bracketed or not) and `localhost`; any other name counts as exposed.
    The one rule for the OneBot endpoint, the console and `drawbridge check`.
    """
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_api_base(base: str) -> str:
    """Return the API root without a trailing `/v1`, so `https://h` and `https://h/v1` agree."""
    base = base.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


def api_base_setting(value: str) -> str:
    """A normalised API base; raises `ValueError` (without echoing it) unless http(s) + host.

    Without a scheme httpx would refuse every request at the first /draw, long after start.
    """
    base = normalize_api_base(value)
    try:
        parts = urlsplit(base)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(API_BASE_FORM) from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise ValueError(API_BASE_FORM)
    return base


def _json_setting(value: Any, form: str) -> Any:
    # These settings are decoded here rather than by pydantic-settings, whose decode error
    # stops at the first bad setting and says nothing of the others.
    if not isinstance(value, str | bytes):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        where = ""
        if isinstance(exc, json.JSONDecodeError):
            # Position and reason only: the text itself may hold a key.
            where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise ValueError(f"is not valid JSON{where}; must be {form}") from None


class ProviderConfig(BaseModel):
    """One upstream image API (a reseller group, say): where, with which key, and its limits.

    Unknown fields are refused, not ignored: a misspelt limit would silently not apply.
    `base_url` (the openai SDK's name) is accepted for `api_base`.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "default"
    api_base: str = Field(validation_alias=AliasChoices("api_base", "base_url"))
    api_key: str = ""
    model: str = "gpt-image-2"
    # True: always stream (failures are reported as they are). False: never. None: stream
    # unless the relay is found unable to (learned per provider; DRAWBRIDGE_STREAM=true).
    stream: bool | None = None
    partial_images: int = Field(default=2, ge=0, le=3)
    max_references: int = Field(default=16, ge=1, le=16)
    max_reference_bytes: int = Field(default=20 * MB, ge=64 * 1024)
    # Largest decoded result accepted (b64 or downloaded url).
    max_result_bytes: int = Field(default=64 * MB, ge=MB)
    # Seconds to wait for one image request (generation can take minutes).
    timeout: float = Field(default=300.0, gt=0)
    connect_timeout: float = Field(default=15.0, gt=0)
    # Requests in flight at once on this provider.
    concurrency: int = Field(default=4, ge=1, le=1000)
    # Only for relays that want it; gpt-image models reject `response_format`.
    response_format: str | None = None
    # Retry once at a 2K size of the same shape when the provider rejects a 4K size.
    size_fallback: bool = True
    # Attempts for requests that surely did not run (connect error, 429 retry-after, 502/503).
    max_retries: int = Field(default=2, ge=0, le=5)

    @field_validator("api_base")
    @classmethod
    def _base(cls, value: str) -> str:
        return api_base_setting(value)

    def with_key(self, api_key: str) -> ProviderConfig:
        """The same provider used with another key (a user's own)."""
        return self.model_copy(update={"api_key": api_key})


# What a `DRAWBRIDGE_PROVIDERS` entry inherits, from the `Settings` field of the same name.
_INHERITED: Final = ("api_base", "api_key", "model", "stream", "timeout", "concurrency")


def _provider_fields(entry: dict[str, Any], inherited: dict[str, Any], name: str) -> dict[str, Any]:
    """One `DRAWBRIDGE_PROVIDERS` entry over the settings it inherits, ready for validation."""
    entry = dict(entry)
    if "base_url" in entry:
        # Merged naively, an inherited api_base would win over the entry's own base_url.
        if "api_base" in entry:
            raise ValueError("set api_base or base_url (the same thing), not both")
        entry["api_base"] = entry.pop("base_url")
    defaults = dict(inherited)
    # DRAWBRIDGE_STREAM=true means "stream where the relay can": learned, not forced.
    defaults["stream"] = None if inherited.get("stream", True) else False
    if not defaults.get("api_base"):
        defaults.pop("api_base", None)
    merged = {**defaults, "name": name, **entry}
    if merged.get("stream") is None:
        merged["stream"] = defaults["stream"]
    return merged


def _provider_entry(entry: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    # Checked merged with what it inherits, as `Settings.providers` will build it, so a bad
    # entry stops the start here instead of raising inside the first command that needs it.
    inherited: dict[str, Any] = {key: info.data[key] for key in _INHERITED if key in info.data}
    ProviderConfig.model_validate(_provider_fields(entry, inherited, "provider"))
    return entry


class Settings(BaseSettings):
    """All of drawbridge's settings. Field aliases are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
        # `DRAWBRIDGE_PROVIDERS=` (empty, as in .env.example) means "not set", not invalid JSON.
        env_ignore_empty=True,
    )

    # --- upstream ---
    api_base: str = Field(
        default="", validation_alias=AliasChoices("DRAWBRIDGE_API_BASE", "api_base")
    )
    api_key: str = Field(default="", validation_alias=AliasChoices("DRAWBRIDGE_API_KEY", "api_key"))
    model: str = Field(
        default="gpt-image-2", validation_alias=AliasChoices("DRAWBRIDGE_MODEL", "model")
    )
    stream: bool = Field(default=True, validation_alias=AliasChoices("DRAWBRIDGE_STREAM", "stream"))
    timeout: float = Field(
        default=300.0, gt=0, validation_alias=AliasChoices("DRAWBRIDGE_TIMEOUT", "timeout")
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        le=1000,
        validation_alias=AliasChoices("DRAWBRIDGE_CONCURRENCY", "concurrency"),
    )
    # After the settings its entries inherit: each entry is checked, merged, when settings load.
    providers_json: Annotated[
        list[Annotated[dict[str, Any], AfterValidator(_provider_entry)]], NoDecode
    ] = Field(
        default_factory=list,
        validation_alias=AliasChoices("DRAWBRIDGE_PROVIDERS", "providers_json"),
    )
    default_size: str = Field(
        default="1024x1024",
        validation_alias=AliasChoices("DRAWBRIDGE_DEFAULT_SIZE", "default_size"),
    )
    max_prompt_chars: int = Field(
        default=4000,
        validation_alias=AliasChoices("DRAWBRIDGE_MAX_PROMPT_CHARS", "max_prompt_chars"),
    )
    max_n: int = Field(default=4, validation_alias=AliasChoices("DRAWBRIDGE_MAX_N", "max_n"))

    # --- storage ---
    data_dir: Path = Field(
        default=Path("./data"), validation_alias=AliasChoices("DRAWBRIDGE_DATA_DIR", "data_dir")
    )
    secret_key: str = Field(
        default="", validation_alias=AliasChoices("DRAWBRIDGE_SECRET_KEY", "secret_key")
    )
    # postgresql://user:pass@host/db: one database for several processes (asyncpg). Empty:
    # SQLite in DRAWBRIDGE_DATA_DIR. sqlite:///path names a SQLite file elsewhere.
    database_url: str = Field(
        default="", validation_alias=AliasChoices("DRAWBRIDGE_DATABASE_URL", "database_url")
    )
    # Seconds without a heartbeat after which another process recovers this one's jobs.
    process_timeout: float = Field(
        default=60.0,
        gt=0,
        validation_alias=AliasChoices("DRAWBRIDGE_PROCESS_TIMEOUT", "process_timeout"),
    )

    # --- credits and limits ---
    admins: str = Field(default="", validation_alias=AliasChoices("DRAWBRIDGE_ADMINS", "admins"))
    daily_credits: int = Field(
        default=5, validation_alias=AliasChoices("DRAWBRIDGE_DAILY_CREDITS", "daily_credits")
    )
    timezone: str = Field(
        default="Asia/Shanghai", validation_alias=AliasChoices("DRAWBRIDGE_TIMEZONE", "timezone")
    )
    # JSON object: {"1k": {"low": 1, "medium": 1, "high": 2, "auto": 1}, "2k": ..., "4k": ...}
    prices: Annotated[dict[str, dict[str, Annotated[int, Field(ge=0)]]], NoDecode] = Field(
        default_factory=dict, validation_alias=AliasChoices("DRAWBRIDGE_PRICES", "prices")
    )
    # What each provider charges per image, for the console's estimated upstream cost:
    # {"provider": {"1k": {"low": 0.006, "high": 0.211}, "default": {"default": 0.1}}}
    upstream_prices: Annotated[
        dict[str, dict[str, dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]]]],
        NoDecode,
    ] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("DRAWBRIDGE_UPSTREAM_PRICES", "upstream_prices"),
    )
    group_daily_cap: int = Field(
        default=0, validation_alias=AliasChoices("DRAWBRIDGE_GROUP_DAILY_CAP", "group_daily_cap")
    )
    # Where the bot answers at all: "qq:123,telegram:-100...,discord:<server id>"; empty:
    # everywhere. DRAWBRIDGE_PRIVATE=false turns private chats off.
    groups: str = Field(default="", validation_alias=AliasChoices("DRAWBRIDGE_GROUPS", "groups"))
    private: bool = Field(
        default=True, validation_alias=AliasChoices("DRAWBRIDGE_PRIVATE", "private")
    )
    user_max_jobs: int = Field(
        default=2, validation_alias=AliasChoices("DRAWBRIDGE_USER_MAX_JOBS", "user_max_jobs")
    )
    # A job priced above this many credits waits for the user's confirmation (button or /确认).
    confirm_above: int = Field(
        default=10,
        ge=0,
        validation_alias=AliasChoices("DRAWBRIDGE_CONFIRM_ABOVE", "confirm_above"),
    )
    queue_size: int = Field(
        default=100, validation_alias=AliasChoices("DRAWBRIDGE_QUEUE_SIZE", "queue_size")
    )
    shutdown_grace: float = Field(
        default=30.0, validation_alias=AliasChoices("DRAWBRIDGE_SHUTDOWN_GRACE", "shutdown_grace")
    )
    default_lang: str = Field(
        default="zh", validation_alias=AliasChoices("DRAWBRIDGE_DEFAULT_LANG", "default_lang")
    )
    image_hosts: str = Field(
        default="multimedia.nt.qq.com.cn,gchat.qpic.cn,c2cpicdw.qpic.cn,p.qpic.cn",
        validation_alias=AliasChoices("DRAWBRIDGE_IMAGE_HOSTS", "image_hosts"),
    )
    max_input_bytes: int = Field(
        default=20 * MB,
        validation_alias=AliasChoices("DRAWBRIDGE_MAX_INPUT_BYTES", "max_input_bytes"),
    )
    # Reference-image bytes one user may be downloading at once (each download counts for
    # DRAWBRIDGE_MAX_INPUT_BYTES, the most it may bring), over all their jobs.
    user_download_bytes: int = Field(
        default=64 * MB,
        ge=1,
        validation_alias=AliasChoices("DRAWBRIDGE_USER_DOWNLOAD_BYTES", "user_download_bytes"),
    )
    # Pixels all reference images of one /edit may declare together, refused from their
    # headers before any decode. Decoding time grows with pixels (references are decoded one
    # at a time, so memory does not). 832 MP is sixteen images at the per-image limit
    # (bot.images.MAX_PIXELS, 52 MP): sixteen 50 MP phone photos always fit.
    max_job_pixels: int = Field(
        default=832_000_000,
        ge=1,
        validation_alias=AliasChoices("DRAWBRIDGE_MAX_JOB_PIXELS", "max_job_pixels"),
    )
    keep_hours: float = Field(
        default=72.0, validation_alias=AliasChoices("DRAWBRIDGE_KEEP_HOURS", "keep_hours")
    )
    log_level: str = Field(
        default="INFO", validation_alias=AliasChoices("DRAWBRIDGE_LOG_LEVEL", "log_level")
    )
    # auto: uvloop where installed (it is a dependency, except on Windows), else asyncio's.
    event_loop: str = Field(
        default="auto", validation_alias=AliasChoices("DRAWBRIDGE_EVENT_LOOP", "event_loop")
    )

    # --- proxies: http://, https:// or socks5:// URLs, user:password@ allowed ---
    # The image API; empty: HTTPS_PROXY / NO_PROXY from the environment apply as usual.
    upstream_proxy: str = Field(
        default="",
        validation_alias=AliasChoices("DRAWBRIDGE_UPSTREAM_PROXY", "upstream_proxy"),
    )
    # The Telegram Bot API (requests and file downloads).
    telegram_proxy: str = Field(
        default="", validation_alias=AliasChoices("TELEGRAM_PROXY", "telegram_proxy")
    )
    # Discord's REST API and gateway.
    discord_proxy: str = Field(
        default="", validation_alias=AliasChoices("DISCORD_PROXY", "discord_proxy")
    )

    @field_validator("upstream_proxy", "telegram_proxy", "discord_proxy")
    @classmethod
    def _proxy(cls, value: str) -> str:
        # Refused at start: a typo here would otherwise show up as a connect error, or as
        # traffic quietly leaving without the proxy the operator counted on.
        return proxy_setting(value)

    # --- Telegram ---
    telegram_bot_token: str = Field(
        default="", validation_alias=AliasChoices("TELEGRAM_BOT_TOKEN", "telegram_bot_token")
    )
    telegram_api_server: str = Field(
        default="", validation_alias=AliasChoices("TELEGRAM_API_SERVER", "telegram_api_server")
    )
    telegram_api_local: bool = Field(
        default=False, validation_alias=AliasChoices("TELEGRAM_API_LOCAL", "telegram_api_local")
    )
    telegram_webhook_url: str = Field(
        default="", validation_alias=AliasChoices("TELEGRAM_WEBHOOK_URL", "telegram_webhook_url")
    )
    telegram_webhook_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("TELEGRAM_WEBHOOK_HOST", "telegram_webhook_host"),
    )
    telegram_webhook_port: int = Field(
        default=8443,
        validation_alias=AliasChoices("TELEGRAM_WEBHOOK_PORT", "telegram_webhook_port"),
    )
    telegram_webhook_secret: str = Field(
        default="",
        validation_alias=AliasChoices("TELEGRAM_WEBHOOK_SECRET", "telegram_webhook_secret"),
    )

    # --- QQ (nonebot2 + OneBot v11); HOST/PORT/ONEBOT_ACCESS_TOKEN are nonebot's own ---
    qq_enabled: bool = Field(
        default=False, validation_alias=AliasChoices("QQ_ENABLED", "qq_enabled")
    )
    host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("HOST", "host"))
    port: int = Field(default=8080, validation_alias=AliasChoices("PORT", "port"))
    onebot_access_token: str = Field(
        default="", validation_alias=AliasChoices("ONEBOT_ACCESS_TOKEN", "onebot_access_token")
    )
    # true: serve a non-loopback HOST without ONEBOT_ACCESS_TOKEN (something else guards it).
    qq_allow_no_token: bool = Field(
        default=False, validation_alias=AliasChoices("QQ_ALLOW_NO_TOKEN", "qq_allow_no_token")
    )

    # --- Discord ---
    discord_bot_token: str = Field(
        default="", validation_alias=AliasChoices("DISCORD_BOT_TOKEN", "discord_bot_token")
    )
    # Another Discord REST base / gateway URL (a proxy or a test double); empty: Discord's own.
    discord_api_base: str = Field(
        default="", validation_alias=AliasChoices("DISCORD_API_BASE", "discord_api_base")
    )
    discord_gateway_url: str = Field(
        default="", validation_alias=AliasChoices("DISCORD_GATEWAY_URL", "discord_gateway_url")
    )
    discord_guild_ids: str = Field(
        default="", validation_alias=AliasChoices("DISCORD_GUILD_IDS", "discord_guild_ids")
    )

    # --- operator console (adapters/console): served by `drawbridge run` when a password is set
    console_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("DRAWBRIDGE_CONSOLE_HOST", "console_host"),
    )
    console_port: int = Field(
        default=8790,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("DRAWBRIDGE_CONSOLE_PORT", "console_port"),
    )
    # The public base URL (one-time login links; https makes the session cookie Secure).
    console_url: str = Field(
        default="", validation_alias=AliasChoices("DRAWBRIDGE_CONSOLE_URL", "console_url")
    )
    # After host: its check reads the host.
    console_password: str = Field(
        default="",
        validation_alias=AliasChoices("DRAWBRIDGE_CONSOLE_PASSWORD", "console_password"),
    )
    # Bearer token /metrics asks for; empty: /metrics is served only with the console, open.
    metrics_token: str = Field(
        default="", validation_alias=AliasChoices("DRAWBRIDGE_METRICS_TOKEN", "metrics_token")
    )

    @field_validator("console_url")
    @classmethod
    def _console_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value:
            parts = urlsplit(value)
            if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
                raise ValueError("must be the console's public http:// or https:// base URL")
        return value

    @field_validator("console_password")
    @classmethod
    def _console_password(cls, value: str, info: ValidationInfo) -> str:
        # Anyone who can reach a non-loopback port can guess at the password: a short one
        # there is refused at start rather than found out later.
        if value and len(value) < CONSOLE_MIN_PASSWORD:
            if not is_loopback_host(str(info.data.get("console_host", "127.0.0.1"))):
                raise ValueError(
                    f"must be at least {CONSOLE_MIN_PASSWORD} characters when "
                    "DRAWBRIDGE_CONSOLE_HOST is not loopback"
                )
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(DATABASE_URL_SCHEMES):
            raise ValueError(
                "must be postgresql://user:password@host:port/database, sqlite:///path, "
                "or empty for SQLite in DRAWBRIDGE_DATA_DIR"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        # Checked here, not at the first /draw: an unknown zone would otherwise start fine and
        # then fail every command that needs "today" with an internal error.
        name = value.strip()
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                "must be an IANA time zone name such as Asia/Shanghai, Europe/Berlin or UTC"
            ) from None
        return name

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return api_base_setting(value) if value.strip() else ""

    @field_validator("telegram_api_server", "discord_api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if value:
            parts = urlsplit(value)
            if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL, or empty for the default")
        return value

    @field_validator("providers_json", "prices", "upstream_prices", mode="before")
    @classmethod
    def _json(cls, value: Any, info: ValidationInfo) -> Any:
        return _json_setting(value, _FORMS[info.field_name or "providers_json"])

    @field_validator("upstream_prices")
    @classmethod
    def _upstream_prices(
        cls, value: dict[str, dict[str, dict[str, float]]]
    ) -> dict[str, dict[str, dict[str, float]]]:
        # A misspelt tier or quality would silently leave those images unpriced.
        for tiers in value.values():
            for tier, table in tiers.items():
                if tier.strip().lower() not in PRICE_TIERS or any(
                    q.strip().lower() not in PRICE_QUALITIES for q in table
                ):
                    raise ValueError(f"must be {UPSTREAM_PRICES_FORM}")
        return {
            provider.strip(): {
                tier.strip().lower(): {q.strip().lower(): price for q, price in table.items()}
                for tier, table in tiers.items()
            }
            for provider, tiers in value.items()
        }

    def upstream_price(self, provider: str, tier: str, quality: str) -> float | None:
        """What one image of `provider` at size `tier` (1k, 2k, 4k) and `quality` costs, from
        DRAWBRIDGE_UPSTREAM_PRICES (a tier's or quality's `default` fills in), or None."""
        tiers = self.upstream_prices.get(provider)
        if tiers is None:
            return None
        table = tiers.get(tier, tiers.get("default"))
        if table is None:
            return None
        return table.get(quality, table.get("default"))

    @field_validator("prices")
    @classmethod
    def _prices(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        # A misspelt tier or quality would silently cost the default 1 credit.
        tiers = {tier.strip().lower(): table for tier, table in value.items()}
        for table in tiers.values():
            if any(q.strip().lower() not in PRICE_QUALITIES for q in table):
                raise ValueError(f"must be {PRICES_FORM}")
        if any(tier not in PRICE_TIERS for tier in tiers):
            raise ValueError(f"must be {PRICES_FORM}")
        return {t: {q.strip().lower(): n for q, n in table.items()} for t, table in tiers.items()}

    @field_validator("admins")
    @classmethod
    def _admins(cls, value: str) -> str:
        # A bare id would otherwise be skipped without a word, and the operator locked out.
        bad = []
        items = [item.strip() for item in value.split(",") if item.strip()]
        for number, item in enumerate(items, 1):
            platform, sep, user = item.partition(":")
            # The platform's shape, not a fixed list: a new platform is one more adapter.
            if not sep or not _PLATFORM_NAME.fullmatch(platform.strip()) or not user.strip():
                bad.append(str(number))
        if bad:
            which = ("entry " if len(bad) == 1 else "entries ") + ", ".join(bad)
            raise ValueError(f"{which} is not platform:user_id; must be {ADMINS_FORM}")
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: str) -> str:
        parse_groups(value)  # a typo must stop the start, not silence a group
        return value

    @field_validator("discord_guild_ids")
    @classmethod
    def _guild_ids(cls, value: str) -> str:
        if any(not g.isdigit() for g in value.replace(" ", "").split(",") if g):
            raise ValueError("must be comma-separated numeric guild ids, or empty for global")
        return value

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: str) -> str:
        choice = value.strip().lower()
        if choice not in ("auto", "asyncio", "uvloop"):
            raise ValueError("must be auto, asyncio or uvloop")
        return choice

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.strip().upper()

    def providers(self) -> list[ProviderConfig]:
        """The configured providers in the order they are tried.

        `DRAWBRIDGE_PROVIDERS` (a JSON list) wins; otherwise one provider is made from
        `DRAWBRIDGE_API_BASE`, `DRAWBRIDGE_API_KEY` and `DRAWBRIDGE_MODEL`. Fields a provider
        leaves out inherit the global settings.
        """
        inherited: dict[str, Any] = {key: getattr(self, key) for key in _INHERITED}
        raw = self.providers_json or ([{"name": "default"}] if self.api_base else [])
        return [
            ProviderConfig.model_validate(_provider_fields(entry, inherited, f"provider{i + 1}"))
            for i, entry in enumerate(raw)
        ]

    def keyless_provider_lines(self) -> list[str]:
        """One line per provider with no key, naming the setting that gives it one.

        An error where nobody can bind their own key with /token (`draw`, `edit`, and `check`
        with no chat platform): those providers could only ever answer 401.
        """
        if not self.providers_json:
            if self.api_base and not self.api_key:
                return [
                    "DRAWBRIDGE_API_KEY: not set, but DRAWBRIDGE_API_BASE is; without a chat "
                    "platform (where users bind their own keys) the shared key is the only one"
                ]
            return []
        return [
            f"DRAWBRIDGE_PROVIDERS[{index}].api_key: not set (nor DRAWBRIDGE_API_KEY); without "
            "a chat platform (where users bind their own keys) the shared key is the only one"
            for index, provider in enumerate(self.providers())
            if not provider.api_key
        ]

    def enabled_platforms(self) -> list[str]:
        """Chat platforms whose settings are present, in start order."""
        names = []
        if self.telegram_bot_token:
            names.append("telegram")
        if self.qq_enabled:
            names.append("qq")
        if self.discord_bot_token:
            names.append("discord")
        if self.console_password:
            # Not a chat platform, but started the same way: it serves with no chat configured.
            names.append("console")
        return names

    def database(self) -> str:
        """The store's URL: DRAWBRIDGE_DATABASE_URL, else SQLite in the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'drawbridge.sqlite3'}"

    def chat_platforms(self) -> list[str]:
        """The enabled platforms where users chat (the console is not one: nobody binds a key
        or draws there)."""
        return [name for name in self.enabled_platforms() if name != "console"]

    def admin_ids(self) -> set[tuple[str, str]]:
        """(platform, user id) pairs named in `DRAWBRIDGE_ADMINS`."""
        pairs = set()
        for item in self.admins.split(","):
            platform, sep, user = item.strip().partition(":")
            if sep and platform and user:
                pairs.add((platform.strip().lower(), user.strip()))
        return pairs

    def group_allow_list(self) -> frozenset[str]:
        """The `platform:id` entries of `DRAWBRIDGE_GROUPS`; empty means every group."""
        return parse_groups(self.groups)

    def image_host_list(self) -> list[str]:
        """Hosts reference images may be downloaded from (QQ)."""
        return [h.strip().lower() for h in self.image_hosts.split(",") if h.strip()]

    def discord_guilds(self) -> list[int]:
        """Guild ids to sync slash commands to; empty means global."""
        return [int(g) for g in self.discord_guild_ids.replace(" ", "").split(",") if g]


def env_name(field: str) -> str:
    """The environment variable an operator sets for a `Settings` field (or alias) name."""
    return _ENV_NAMES.get(field.lower(), field)


def _env_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else []
        env = next((c for c in choices if isinstance(c, str) and c.isupper()), field.upper())
        names[field.lower()] = env
        for choice in choices:
            if isinstance(choice, str):
                names[choice.lower()] = env
    return names


_ENV_NAMES = _env_names()
# Any name a problem's location may use (field, alias, environment name) -> the field.
_FIELDS: Final = {
    name: field
    for field, info in Settings.model_fields.items()
    for name in (
        field,
        *(
            str(c).lower()
            for c in (
                info.validation_alias.choices
                if isinstance(info.validation_alias, AliasChoices)
                else []
            )
        ),
    )
}
_PROVIDER_FIELDS: Final = ", ".join(
    "api_base (or base_url)" if name == "api_base" else name for name in ProviderConfig.model_fields
)
_FIELD_IN_MESSAGE = re.compile(r'field "(\w+)"')


def settings_error_lines(error: ValidationError | SettingsError) -> list[str]:
    """One line per problem with the settings, naming the environment variable to fix.

    For a terminal, instead of a traceback. Input values are left out: the setting at fault
    may hold a key.
    """
    if isinstance(error, SettingsError):
        # pydantic-settings names the field of a value it could not parse (bad JSON, say).
        found = _FIELD_IN_MESSAGE.search(str(error))
        name = env_name(found.group(1)) if found else "settings"
        return [f"{name}: cannot be parsed (lists and tables are JSON; see .env.example)"]
    lines = []
    for problem in error.errors(include_input=False, include_url=False):
        where = [str(part) for part in problem["loc"]]
        name = env_name(where[0]) if where else "settings"
        path = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in where[1:])
        message = _problem_message(where, str(problem["type"]), str(problem["msg"]))
        lines.append(f"{name}{path}: {message}")
    return lines or [str(error)]


# The form a setting takes, said when its value is not even of the right kind.
_FORMS: Final = {
    "timeout": "a number of seconds such as 300 (no unit)",
    "shutdown_grace": "a number of seconds such as 30 (no unit)",
    "keep_hours": "a number of hours such as 72 (no unit)",
    "providers_json": PROVIDERS_FORM,
    "prices": PRICES_FORM,
    "upstream_prices": UPSTREAM_PRICES_FORM,
}
_KINDS: Final = {
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "int_type": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "dict_type": "a JSON object",
    "list_type": "a JSON list",
    "string_type": "text",
}


def _problem_message(where: list[str], kind: str, message: str) -> str:
    field = _FIELDS.get(where[0].lower(), where[0].lower()) if where else ""
    if where[:1] and field == "providers_json" and len(where) >= 2:
        if kind == "extra_forbidden":
            return f"unknown field; a provider entry takes {_PROVIDER_FIELDS}"
        if kind == "missing" and where[-1] == "api_base":
            return "required (or set DRAWBRIDGE_API_BASE for every entry to inherit)"
        if kind == "dict_type" and len(where) == 2:
            return 'must be a JSON object, such as {"api_base": "https://..."}'
    if kind in _KINDS:
        form = _FORMS.get(field) if len(where) == 1 else None
        return f"must be {form or _KINDS[kind]}"
    if kind == "missing":
        return "required"
    message = message.removeprefix("Value error, ")
    return message.replace("Input should be", "must be", 1)
