"""Logging set-up with secrets redacted from every record, whatever logger wrote it.

Three kinds of values are removed from each line:

- shapes: `sk-` keys, Telegram bot tokens, `Bearer` credentials, Discord interaction and
  webhook tokens inside URLs, and whatever follows `/token` (quoted or not) in the line of
  the message that carried it;
- literals known to be secret: the configured ones (`settings_secrets`, kept for the life of
  the process) and users' keys actually bound and used (`add_secrets` from the job runner; at
  most `MAX_BOUND_KEYS`, oldest forgotten first);
- the argument of the command being handled right now (`redacting`), in the log lines of
  that invocation only.

What a user merely types never becomes a process-wide literal: otherwise anyone could send
`/token <someone's id>` and blank that id, or any word, out of every later log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TextIO, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from bot.config import Settings

_MASK = "***"
# Quote characters a chat message may wrap a key in, as typed ("'", '"', full-width and CJK
# quotes) or as a log line escapes them (`\'`, `\"` in repr() and JSON).
_QUOTE = r"\\?[\"'“”‘’「」『』]"

# (words one of which the lower-cased line must contain, pattern, replacement). The words
# are a cheap test first: most lines hold none of them, and a regex without a literal prefix
# (case-insensitive ones, say) scans the whole line.
_PATTERNS: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # API keys: OpenAI/new-api style "sk-...".
    (("sk-",), re.compile(r"sk-[A-Za-z0-9_\-]{6,}"), "sk-***"),
    # Telegram bot tokens "123456:ABC...", also inside URLs ("/bot123456:ABC...").
    ((":",), re.compile(r"(?<!\d)\d{5,}+:[A-Za-z0-9_\-]{30,}"), "***:***"),
    # Whatever follows /token in a message, in any language alias: a quoted argument up to
    # its closing quote (or the end of the line), else the next word. Not a short word of
    # letters alone: our own prose ("bind their own key with /token can draw") reads on, and
    # no key is one (a key has 16 characters or more; plugins/account.py refuses the rest).
    (
        ("token", "令牌"),
        re.compile(
            rf"([/／]\s*(?:token|令牌)(?:@\w+)?)\s*"
            rf"(?![^\W\d_]{{0,15}}[.,;:!?)\]]*(?:\s|$))"
            rf"(?:{_QUOTE}.*?(?:{_QUOTE}|$)|[^\s*]\S*)",
            re.IGNORECASE | re.MULTILINE,
        ),
        rf"\1 {_MASK}",
    ),
    (("bearer",), re.compile(r"(Bearer)\s+\S+", re.IGNORECASE), rf"\1 {_MASK}"),
    # Discord interaction tokens (valid 15 minutes) in REST paths:
    # /interactions/{id}/{token}/callback and /webhooks/{application id}/{token}[/messages/..].
    (
        ("/interactions/", "/webhooks/"),
        re.compile(r"(/(?:interactions|webhooks)/\d+/)[^/\s?'\"]+"),
        rf"\1{_MASK}",
    ),
)

# --- literal secrets ---------------------------------------------------------------------

MAX_BOUND_KEYS = 2048
"""Users' keys remembered for redaction; past this the least recently used is forgotten."""

_MIN_SECRET_LENGTH = 8
# Users' keys are matched by their first characters, then the rest of the key-like run.
# That keeps the cost per line independent of how many keys are known (one set lookup per
# candidate position instead of one comparison per key).
_KEY_PREFIX = 16
_KEY_CHARS = r"A-Za-z0-9_\-."
_KEY_RUN = re.compile(rf"[{_KEY_CHARS}]{{{_KEY_PREFIX},}}")
# A user's key must look like one to be remembered: long, only key characters, letters and
# digits mixed. Ids (all digits) and words (no digits) are never taken, whoever binds them.
_KEY_SHAPE = re.compile(rf"(?=.*[A-Za-z])(?=.*\d)[{_KEY_CHARS}]{{{_KEY_PREFIX},}}")

_lock = threading.Lock()
# Configured secrets (any shape), as one alternation, longest first so a secret containing
# another is removed whole; rebuilt only when the configuration adds one.
_configured: frozenset[str] = frozenset()
_configured_pattern: re.Pattern[str] | None = None
# First `_KEY_PREFIX` characters of users' keys, least recently used first.
_bound: OrderedDict[str, None] = OrderedDict()
_bound_prefixes: frozenset[str] = frozenset()

# Values of the invocation being handled in this task (see `redacting`).
_current: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "drawbridge_redacting", default=()
)


def add_secrets(values: Iterable[str], *, configured: bool = False) -> None:
    """Redact these exact values from every log line from now on.

    `configured=True` is for secrets from the settings (`settings_secrets`): any value of 8
    characters or more, kept for the life of the process. Otherwise the values are users'
    keys in use (the job runner adds a bound key when it uses it): only key-shaped values are
    taken, and at most `MAX_BOUND_KEYS` are kept.
    """
    global _configured, _configured_pattern, _bound_prefixes
    with _lock:
        if configured:
            merged = _configured | {v for v in values if v and len(v) >= _MIN_SECRET_LENGTH}
            if merged != _configured:
                _configured = frozenset(merged)
                ordered = sorted(_configured, key=len, reverse=True)
                _configured_pattern = re.compile("|".join(re.escape(v) for v in ordered))
            return
        changed = False
        for value in values:
            if not value or not _KEY_SHAPE.fullmatch(value):
                continue
            prefix = value[:_KEY_PREFIX]
            if prefix in _bound:
                _bound.move_to_end(prefix)
                continue
            _bound[prefix] = None
            changed = True
            while len(_bound) > MAX_BOUND_KEYS:
                _bound.popitem(last=False)
        if changed:
            _bound_prefixes = frozenset(_bound)


def secret_counts() -> tuple[int, int]:
    """How many configured secrets and users' keys are redacted verbatim (for tests, stats)."""
    return len(_configured), len(_bound_prefixes)


@contextlib.contextmanager
def redacting(*values: str) -> Iterator[None]:
    """Redact `values` from the log lines written inside this block (this task only).

    For what a user sent with a command (a key with `/token`): hidden in that invocation's
    own lines, and never in anyone else's.
    """
    extra = tuple(v for v in values if v and len(v) >= _MIN_SECRET_LENGTH)
    token = _current.set(_current.get() + extra)
    try:
        yield
    finally:
        _current.reset(token)


_T = TypeVar("_T")


def redacts_argument(
    argument: Callable[[_T], str],
) -> Callable[[Callable[[_T], Awaitable[None]]], Callable[[_T], Awaitable[None]]]:
    """Decorate a command handler so `argument(ctx)` is redacted while it runs (`redacting`)."""

    def decorate(handler: Callable[[_T], Awaitable[None]]) -> Callable[[_T], Awaitable[None]]:
        @functools.wraps(handler)
        async def wrapper(ctx: _T) -> None:
            value = argument(ctx)
            with redacting(value):
                try:
                    await handler(ctx)
                except Exception as exc:
                    # The caller logs a crash after this block has ended: the exception
                    # carries the value to the formatter that renders its traceback.
                    _tag_exception(exc, value)
                    raise

        return wrapper

    return decorate


_EXCEPTION_VALUES = "_drawbridge_redact"


def _tag_exception(exc: BaseException, value: str) -> None:
    try:
        setattr(exc, _EXCEPTION_VALUES, (*getattr(exc, _EXCEPTION_VALUES, ()), value))
    except AttributeError:
        pass  # an exception type with __slots__: nothing to carry the value in


def _exception_values(record: logging.LogRecord) -> tuple[str, ...]:
    exc = record.exc_info[1] if record.exc_info else None
    values: tuple[str, ...] = getattr(exc, _EXCEPTION_VALUES, ())
    return values


def settings_secrets(settings: Settings) -> set[str]:
    """Every secret value in the settings that could end up in a log line verbatim."""
    values = {
        settings.api_key,
        settings.secret_key,
        settings.onebot_access_token,
        settings.telegram_bot_token,
        settings.telegram_webhook_secret,
        settings.discord_bot_token,
        settings.console_password,
        settings.metrics_token,
    }
    values.update(provider.api_key for provider in settings.providers())
    # A proxy's password may surface in a library's error message with the URL.
    # So may the database's, in asyncpg's.
    for proxy in (
        settings.telegram_proxy,
        settings.discord_proxy,
        settings.upstream_proxy,
        settings.database_url,
    ):
        password = urlsplit(proxy).password if proxy else None
        if password and len(password) >= 4:
            values.add(password)
    return {v for v in values if v}


def _mask_bound_keys(text: str, prefixes: frozenset[str]) -> str:
    def mask(run: re.Match[str]) -> str:
        word = run.group()
        for start in range(len(word) - _KEY_PREFIX + 1):
            if word[start : start + _KEY_PREFIX] in prefixes:
                return word[:start] + _MASK
        return word

    return _KEY_RUN.sub(mask, text)


def redact(text: str) -> str:
    """`text` with known secrets, API keys, bot tokens and `/token` arguments replaced."""
    for value in _current.get():
        if value in text:
            text = text.replace(value, _MASK)
    pattern = _configured_pattern
    if pattern is not None:
        text = pattern.sub(_MASK, text)
    prefixes = _bound_prefixes
    if prefixes:
        text = _mask_bound_keys(text, prefixes)
    lowered = text.lower()
    for words, shape, replacement in _PATTERNS:
        if any(word in lowered for word in words):
            text = shape.sub(replacement, text)
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
        with redacting(*_exception_values(record)):
            return redact(super().format(record))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Every line's shape, ours and our libraries' alike: nonebot's loguru records are forwarded
into `logging` (adapters/qq/redaction.py) and come out in it too."""


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr) through the redacting filter; quiet noisy libraries."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosqlite's DEBUG lines carry SQL parameters (encrypted keys, prompts).
    for noisy in ("httpx", "httpcore", "aiohttp.access", "aiosqlite", "aiogram.event"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
