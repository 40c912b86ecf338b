"""Logging set-up with secrets redacted from every record, whatever logger wrote it."""

from __future__ import annotations

import logging
import re
import sys

_PATTERNS = (
    # API keys: OpenAI/new-api style "sk-...".
    (re.compile(r"sk-[A-Za-z0-9_\-]{6,}"), "sk-***"),
    # Telegram bot tokens "123456:ABC...".
    (re.compile(r"\b\d{5,}:[A-Za-z0-9_\-]{30,}\b"), "***:***"),
    # Whatever follows /token in a message, in any language alias.
    (re.compile(r"([/／]\s*(?:token|令牌)(?:@\w+)?)\s*[^\s*]\S*"), r"\1 ***"),
    (re.compile(r"(Bearer)\s+\S+", re.IGNORECASE), r"\1 ***"),
)


def redact(text: str) -> str:
    """`text` with API keys, bot tokens and `/token` arguments replaced."""
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


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr through the redacting filter; quiet noisy libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosqlite's DEBUG lines carry SQL parameters (encrypted keys, prompts).
    for noisy in ("httpx", "httpcore", "aiohttp.access", "aiosqlite", "aiogram.event"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
