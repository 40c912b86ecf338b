"""Keys out of every log line nonebot and its web server write.

nonebot logs each incoming message (`Message 42 from 1@[群:2] '/token sk-...'`) through
loguru, and its config loader traces unparsable `.env` values verbatim. A loguru *patcher*
sees every record before any sink formats it, whatever sink a user or test adds later, so
that is where keys are removed: the shared patterns of `bot.logs.redact`, the QQ spellings of
`/token` it does not know, and the literal secret values from our settings.

`nonebot.init` replaces the core patcher with its own, so `install` runs before it (for the
records nonebot writes while loading its config) and again after it. Below nonebot, the
websockets library dumps every frame at DEBUG; `quiet_frame_dumps` drops those lines.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loguru import logger

from bot.config import Settings
from bot.logs import add_secrets, redact, settings_secrets

if TYPE_CHECKING:
    from loguru import Message, Record

# "／令牌 key", "/令牌key", "/token@bot key": the command name, then the rest of that line
# up to a quote or CQ-code bracket (log lines show messages quoted or as CQ codes).
_TOKEN_COMMAND = re.compile(r"([/／]\s*(?:token|令牌)(?:@\w+)?)[^\n\"'\]]+", re.IGNORECASE)
_MASK = "***"
# Short values would blank out ordinary words; real keys and tokens are long.
_MIN_SECRET_LENGTH = 8


def secrets_of(settings: Settings) -> set[str]:
    """Every secret value in the settings that could end up in a log line verbatim."""
    return {v for v in settings_secrets(settings) if len(v) >= _MIN_SECRET_LENGTH}


class Redactor:
    """Removes keys from text; also a loguru patcher (`redactor(record)`)."""

    def add_secrets(self, values: Iterable[str]) -> None:
        """Also mask these configured secret values from now on (in every log, not only QQ's)."""
        add_secrets(values, configured=True)

    def redact(self, text: str) -> str:
        """`text` with keys, tokens and `/token` arguments replaced."""
        # The shared rules first: they know quoted arguments (`/token 'key'`), which the
        # rule below, made for unquoted multi-word arguments, would cut at the quote.
        text = redact(text)
        return _TOKEN_COMMAND.sub(rf"\1 {_MASK}", text)

    def __call__(self, record: Record) -> None:
        record["message"] = self.redact(record["message"])
        exception = record["exception"]
        if exception is not None and exception.value is not None:
            text = str(exception.value)
            cleaned = self.redact(text)
            if cleaned != text:
                # Swap in an exception without the key, and drop the frames: a sink with
                # `diagnose=True` would print their local variables, which likely hold it too.
                kind = exception.type.__name__ if exception.type else "Exception"
                stand_in = RedactedError(f"{kind}: {cleaned}")
                record["exception"] = type(exception)(RedactedError, stand_in, None)


class RedactedError(Exception):
    """Stands in, in a log record, for an exception whose text contained a key."""


REDACTOR = Redactor()
"""The process-wide redactor: loguru has one core patcher per process."""


def install(secrets: Iterable[str] = ()) -> None:
    """Make every loguru record pass through `REDACTOR` (after nonebot's own patcher)."""
    REDACTOR.add_secrets(secrets)
    nonebot_patcher = _nonebot_patcher()

    def patch(record: Record) -> None:
        if nonebot_patcher is not None:
            nonebot_patcher(record)
        REDACTOR(record)

    logger.configure(patcher=patch)


_FORWARD_LOCK = threading.Lock()
_forwarding_sink: int | None = None


def forward_to_stdlib() -> None:
    """Send nonebot's loguru records through `logging`, so the process has one log stream.

    Removes nonebot's default stdout sink; `bot.logs` decides format, level and redaction.
    Safe to call twice.
    """
    global _forwarding_sink
    with _FORWARD_LOCK:
        if _forwarding_sink is not None:
            return
        from nonebot.log import logger_id

        try:
            logger.remove(logger_id)
        except ValueError:
            pass  # already removed by someone who configured loguru themselves
        # loguru's levels between stdlib's, named as nonebot users know them.
        logging.addLevelName(5, "TRACE")
        logging.addLevelName(25, "SUCCESS")
        _forwarding_sink = logger.add(_emit_to_stdlib, level=0, format="{message}", diagnose=False)


class FrameDumpFilter(logging.Filter):
    """Drops the websockets library's frame dumps (`< TEXT '{...}' [453 bytes]`).

    At DEBUG it logs every frame, shortened to its head and tail: raw chat messages, and the
    tail of a `/token` message is the key.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg in ("< %s", "> %s"))


def quiet_frame_dumps() -> None:
    """Install `FrameDumpFilter` on the logger uvicorn hands to websockets (once)."""
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, FrameDumpFilter) for f in target.filters):
        target.addFilter(FrameDumpFilter())


def _emit_to_stdlib(message: Message) -> None:
    record = message.record
    target = logging.getLogger(record["name"] or "nonebot")
    level = record["level"].no
    if not target.isEnabledFor(level):
        return
    exception = record["exception"]
    exc_info: Any = None
    if exception is not None:
        exc_info = (exception.type, exception.value, exception.traceback)
    target.log(level, "%s", record["message"], exc_info=exc_info)


def _nonebot_patcher() -> Any:
    # nonebot's patcher only shortens module names to plugin ids; keep it when it exists.
    import nonebot

    return getattr(nonebot, "_log_patcher", None)
