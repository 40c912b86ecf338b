"""Settings from the environment and `.env`, and the upstream providers they describe.

Every setting is listed, with a comment, in `.env.example`. Names are a contract with
operators and outside checks: add new ones, never rename.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from bot.proxies import proxy_setting

MB = 1024 * 1024


def normalize_api_base(base: str) -> str:
    """Return the API root without a trailing `/v1`, so `https://h` and `https://h/v1` agree."""
    base = base.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


class ProviderConfig(BaseModel):
    """One upstream image API (a reseller group, say): where, with which key, and its limits."""

    name: str = "default"
    api_base: str
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
        return normalize_api_base(value)

    def with_key(self, api_key: str) -> ProviderConfig:
        """The same provider used with another key (a user's own)."""
        return self.model_copy(update={"api_key": api_key})


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
    providers_json: list[dict[str, Any]] = Field(
        default_factory=list,
        validation_alias=AliasChoices("DRAWBRIDGE_PROVIDERS", "providers_json"),
    )
    timeout: float = Field(
        default=300.0, validation_alias=AliasChoices("DRAWBRIDGE_TIMEOUT", "timeout")
    )
    concurrency: int = Field(
        default=4, validation_alias=AliasChoices("DRAWBRIDGE_CONCURRENCY", "concurrency")
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

    # --- credits and limits ---
    admins: str = Field(default="", validation_alias=AliasChoices("DRAWBRIDGE_ADMINS", "admins"))
    daily_credits: int = Field(
        default=5, validation_alias=AliasChoices("DRAWBRIDGE_DAILY_CREDITS", "daily_credits")
    )
    timezone: str = Field(
        default="Asia/Shanghai", validation_alias=AliasChoices("DRAWBRIDGE_TIMEZONE", "timezone")
    )
    # JSON object: {"1k": {"low": 1, "medium": 1, "high": 2, "auto": 1}, "2k": ..., "4k": ...}
    prices: dict[str, dict[str, int]] = Field(
        default_factory=dict, validation_alias=AliasChoices("DRAWBRIDGE_PRICES", "prices")
    )
    group_daily_cap: int = Field(
        default=0, validation_alias=AliasChoices("DRAWBRIDGE_GROUP_DAILY_CAP", "group_daily_cap")
    )
    user_max_jobs: int = Field(
        default=2, validation_alias=AliasChoices("DRAWBRIDGE_USER_MAX_JOBS", "user_max_jobs")
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

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.api_base = normalize_api_base(self.api_base) if self.api_base else ""
        return self

    def providers(self) -> list[ProviderConfig]:
        """The configured providers in the order they are tried.

        `DRAWBRIDGE_PROVIDERS` (a JSON list) wins; otherwise one provider is made from
        `DRAWBRIDGE_API_BASE`, `DRAWBRIDGE_API_KEY` and `DRAWBRIDGE_MODEL`. Fields a provider
        leaves out inherit the global settings.
        """
        defaults: dict[str, Any] = {
            "api_base": self.api_base,
            "api_key": self.api_key,
            "model": self.model,
            # DRAWBRIDGE_STREAM=true means "stream where the relay can": learned, not forced.
            "stream": None if self.stream else False,
            "timeout": self.timeout,
            "concurrency": self.concurrency,
        }
        raw = self.providers_json or ([{"name": "default"}] if self.api_base else [])
        result = []
        for index, entry in enumerate(raw):
            merged = {**defaults, "name": f"provider{index + 1}", **entry}
            if merged.get("stream") is None:
                merged["stream"] = defaults["stream"]
            result.append(ProviderConfig.model_validate(merged))
        return result

    def enabled_platforms(self) -> list[str]:
        """Chat platforms whose settings are present, in start order."""
        names = []
        if self.telegram_bot_token:
            names.append("telegram")
        if self.qq_enabled:
            names.append("qq")
        if self.discord_bot_token:
            names.append("discord")
        return names

    def admin_ids(self) -> set[tuple[str, str]]:
        """(platform, user id) pairs named in `DRAWBRIDGE_ADMINS`."""
        pairs = set()
        for item in self.admins.split(","):
            platform, sep, user = item.strip().partition(":")
            if sep and platform and user:
                pairs.add((platform.strip().lower(), user.strip()))
        return pairs

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
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}{path}: {message}")
    return lines or [str(error)]
