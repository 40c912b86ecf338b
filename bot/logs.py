"""Logging set-up with secrets redacted from every record, whatever logger wrote it."""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Settings

_PATTERNS = (
    # API keys: OpenAI/new-api style "sk-...".
    (re.compile(r"sk-[A-Za-z0-9_\-]{6,}"), "sk-***"),
    # Telegram bot tokens "123456:ABC...", also inside URLs ("/bot123456:ABC...").
    (re.compile(r"(?<!\d)\d{5,}:[A-Za-z0-9_\-]{30,}"), "***:***"),
    # Whatever follows /token in a message, in any language alias.
    (re.compile(r"([/／]\s*(?:token|令牌)(?:@\w+)?)\s*[^\s*]\S*"), r"\1 ***"),
    (re.compile(r"(Bearer)\s+\S+", re.IGNORECASE), r"\1 ***"),
)


# Known secret values (shared keys, bot tokens, users' keys once used): redacted verbatim,
# whatever their shape, since not every relay's keys start with "sk-".
_literals: tuple[str, ...] = ()
_literals_lock = threading.Lock()
_MIN_SECRET_LENGTH = 8


def add_secrets(values: Iterable[str]) -> None:
    """Redact these exact values from every log line from now on (short ones are ignored)."""
    global _literals
    with _literals_lock:
        known = set(_literals) | {v for v in values if v and len(v) >= _MIN_SECRET_LENGTH}
        # Longest first, so a key containing another secret is removed whole.
        _literals = tuple(sorted(known, key=len, reverse=True))


def settings_secrets(settings: Settings) -> set[str]:
    """Every secret value in the settings that could end up in a log line verbatim."""
    values = {
        settings.api_key,
        settings.secret_key,
        settings.onebot_access_token,
        settings.telegram_bot_token,
        settings.telegram_webhook_secret,
        settings.discord_bot_token,
    }
    values.update(provider.api_key for provider in settings.providers())
    return {v for v in values if v}


def redact(text: str) -> str:
    """`text` with known secrets, API keys, bot tokens and `/token` arguments replaced."""
    for literal in _literals:
        if literal in text:
            text = text.replace(literal, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True


class RedactingFormatter(logging.Formatter):
    """Redacts the whole formatted record, tracebacks and stack traces included.

    The filter above cleans the message; an exception's text is only rendered here, later.
    """

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr through the redacting filter; quiet noisy libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosqlite's DEBUG lines carry SQL parameters (encrypted keys, prompts).
    for noisy in ("httpx", "httpcore", "aiohttp.access", "aiosqlite", "aiogram.event"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
