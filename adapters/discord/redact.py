"""Keep what users type into modals (an API key for /token) out of discord.py's logs.

discord.py logs every gateway event at DEBUG, modal submits included, and the /token modal
carries a key in clear. A filter on each of its loggers blanks the values of text inputs
before a record reaches any handler, then applies the shared redaction of `bot.logs`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bot.logs import redact

_TEXT_INPUT = 4
_MASK = "***"


def scrub(value: Any) -> Any:
    """A copy of a gateway payload with every text input's value masked."""
    if isinstance(value, Mapping):
        cleaned = {k: scrub(v) for k, v in value.items()}
        if cleaned.get("type") == _TEXT_INPUT and "value" in cleaned:
            cleaned["value"] = _MASK
        return cleaned
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    return value


class ModalValueFilter(logging.Filter):
    """Rewrites records of discord.py loggers with modal values and secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = scrub(record.args)
        elif record.args:
            record.args = tuple(scrub(a) for a in record.args)
        try:
            message = record.getMessage()
        except Exception:
            return True
        record.msg = redact(message)
        record.args = None
        return True


_FILTER = ModalValueFilter()


def install() -> None:
    """Attach the filter to every discord.py logger (idempotent; call after importing discord)."""
    for name in list(logging.root.manager.loggerDict):
        if name != "discord" and not name.startswith("discord."):
            continue
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
