"""Keep keys and interaction tokens out of discord.py's logs.

discord.py logs every gateway event at DEBUG, modal submits included, and the /token modal
carries a key in clear. Every INTERACTION_CREATE payload also carries the interaction's
`token`, a credential to answer as the bot in that channel for 15 minutes, which then shows
again in the REST URLs discord.py logs (`/interactions/{id}/{token}/callback`,
`/webhooks/{application id}/{token}`). A filter on each of its loggers blanks text input
values and `token` fields in payloads before a record reaches any handler, then applies the
shared redaction of `bot.logs` (which knows those URLs) to the whole message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bot.logs import redact

_TEXT_INPUT = 4
_MASK = "***"
# Payload fields that are credentials wherever they appear (interactions, webhooks).
_SECRET_FIELDS = frozenset({"token"})


def scrub(value: Any) -> Any:
    """A copy of a gateway payload with text input values and tokens masked."""
    if isinstance(value, Mapping):
        cleaned = {k: _MASK if k in _SECRET_FIELDS else scrub(v) for k, v in value.items()}
        if cleaned.get("type") == _TEXT_INPUT and "value" in cleaned:
            cleaned["value"] = _MASK
        return cleaned
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    return value


class ModalValueFilter(logging.Filter):
    """Rewrites records of discord.py loggers with modal values, tokens and secrets masked."""

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
