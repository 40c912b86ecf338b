"""Translations: every user-facing string goes through `t`.

Catalogs live in `bot/locales/<lang>.py` as one `MESSAGES` dict each; both languages carry
every key with the same `{placeholders}` (a test checks).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping
from typing import Any

from bot.locales import en, zh

log = logging.getLogger(__name__)

CATALOGS: Mapping[str, Mapping[str, str]] = {"en": en.MESSAGES, "zh": zh.MESSAGES}
LANGUAGES = tuple(CATALOGS)
DEFAULT_LANG = "zh"


def normalize_lang(locale: str | None, default: str = DEFAULT_LANG) -> str:
    """Map a platform locale (`zh-CN`, `zh_TW`, `en-US`, `ru`) to a catalog language."""
    if not locale:
        return default
    code = locale.replace("_", "-").split("-", 1)[0].lower()
    if code in CATALOGS:
        return code
    # Users whose client speaks neither language read English more often than Chinese.
    return "en"


class _Lenient(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def t(lang: str, key: str, **params: Any) -> str:
    """The message `key` in `lang`, with `params` filled in; falls back to English, then the key."""
    catalog = CATALOGS.get(lang) or CATALOGS["en"]
    template = catalog.get(key)
    if template is None:
        template = CATALOGS["en"].get(key)
        if template is None:
            log.warning("missing i18n key %s", key)
            return key
    # str.format_map is the C formatter (string.Formatter is the same grammar in Python, and
    # several times slower: every status line and price line comes through here).
    return template.format_map(_Lenient(params))


def placeholders(template: str) -> set[str]:
    """Names of the `{placeholders}` in a template (for catalog consistency checks)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}
